"""The exceptions warpmerge raises, each carrying the process exit code of the contract.

The CLI turns any WarpError into one line on stderr and its exit code; everything else is a bug
and gets a traceback.
"""

from __future__ import annotations


class WarpError(Exception):
    """Base class: a failure we expected and can explain in one line."""

    exit_code = 1


class ConfigError(WarpError):
    """The config or the command line is wrong (exit 2, before any output is written)."""

    exit_code = 2


class InputError(WarpError):
    """An input model is missing, malformed or incompatible (exit 2, before any output)."""

    exit_code = 2


class RunError(WarpError):
    """Something failed while running: I/O, disk full, interrupted (exit 1)."""

    exit_code = 1


class HubError(WarpError):
    """The Hub, the network or authentication failed (exit 3)."""

    exit_code = 3


class Interrupted(RunError):
    """Ctrl-C or SIGTERM: raised by the CLI's signal handlers in place of KeyboardInterrupt,
    which the command-line framework would otherwise turn into a silent exit."""

    def __init__(self) -> None:
        super().__init__("interrupted; nothing was written")
