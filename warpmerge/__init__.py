"""warpmerge: WARP (Weight Averaged Rewarded Policies) merging, fused and streamed.

    import warpmerge
    result = warpmerge.run("warp.yaml")      # or warpmerge.run(warpmerge.WarpConfig(...))
    result.outputs                            # one folder per η
    print(warpmerge.plan("warp.yaml"))        # what --dry-run prints; writes nothing
    report = warpmerge.front(models, init=..., prompts=..., reward=...)   # the WARP front

Names are imported on first use, so that `warpmerge --help` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "run": "api",
    "plan": "api",
    "Plan": "planner",
    "WarpConfig": "config",
    "load_config": "config",
    "ema": "ops",
    "slerp": "ops",
    "liti": "ops",
    "front": "kl_reward",  # the module is not named front: importing it would shadow this name
    "FrontReport": "kl_reward",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'warpmerge' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
