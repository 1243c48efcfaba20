"""The resume journal: what an interrupted run had finished, so `--resume` need not redo it.

An append-only JSON-lines file in the staging folder. The first line fingerprints the merge
(version, config, the header hashes of every input); then one line per finished shard (its
size and CRC-32, computed while writing) and per finished group (its SLERP coefficients). A
line cut short by a kill is ignored. A resumed run re-verifies every shard it keeps, so the
result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .planner import Plan
from .writer import file_crc32

NAME = ".warpmerge-journal.jsonl"


def fingerprint(plan: Plan) -> str:
    config = plan.config.to_dict()
    config.pop("check", None)  # what runs after the merge may change between tries
    config.pop("front", None)
    config["output"].pop("push_to_hub", None)
    config["output"]["path"] = str(plan.output_root)
    data = {
        "version": __version__,
        "config": config,
        # headers, sizes and modification times: a file replaced since is not resumed
        "inputs": [[(f.header_sha256, f.size, _mtime(c.path / f.name)) for f in c.files]
                   for c in plan.inputs.all],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


@dataclass
class Journal:
    path: Path
    shards: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (size, crc32)
    groups: dict[int, dict[str, Any]] = field(default_factory=dict)  # group index -> result

    @classmethod
    def load(cls, path: Path, expected: str) -> Journal | None:
        """The journal of an interrupted run of this same merge, or None."""
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return None
        journal = cls(path)
        for i, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                if i == 0:  # no fingerprint: this journal could be any merge's
                    return None
                continue  # the last line, cut short by a kill
            if i == 0:
                if not isinstance(entry, dict) or entry.get("fingerprint") != expected:
                    return None
            elif entry.get("kind") == "shard":
                journal.shards[entry["path"]] = (entry["size"], entry["crc32"])
            elif entry.get("kind") == "group":
                journal.groups[entry["index"]] = entry["result"]
        return journal if lines else None

    def verified_shards(self, roots: list[Path]) -> set[Path]:
        """Recorded shards still on disk with the recorded size and CRC.

        Shard keys are '<root index>/<path in that staging root>'.
        """
        good = set()
        for key, (size, crc) in self.shards.items():
            index, _, rel = key.partition("/")
            if not index.isdigit() or int(index) >= len(roots):
                continue
            path = roots[int(index)] / rel
            if path.is_file() and path.stat().st_size == size and file_crc32(path) == crc:
                good.add(path)
        return good

    def start(self, fp: str) -> None:
        self.path.write_text(json.dumps({"fingerprint": fp}) + "\n")

    def _append(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def shard_done(self, rel: str, size: int, crc: int) -> None:
        self.shards[rel] = (size, crc)
        self._append({"kind": "shard", "path": rel, "size": size, "crc32": crc})

    def group_done(self, index: int, result: dict[str, Any]) -> None:
        self.groups[index] = result
        self._append({"kind": "group", "index": index, "result": result})
