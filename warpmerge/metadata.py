"""The files around the weights: config.json, tokenizer files, warpmerge.json, model card."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .modelfolder import HEAD_NAME, MODEL_FILES, Checkpoint
from .planner import Plan


def build_provenance(plan: Plan, groups: list[dict[str, Any]]) -> dict[str, Any]:
    """What warpmerge.json records: enough to reproduce the merge and compare the result."""
    run_of = {id(c): name for name, run in zip(plan.run_names, plan.runs, strict=True)
              for c in run}
    inputs = [
        {
            "role": "init" if c is plan.init else "checkpoint",
            "run": run_of.get(id(c)),
            "ref": _shown_ref(plan, c),
            "repo_id": c.repo_id,
            "revision": c.revision,
            "commit": c.commit,
            "files": [{"name": f.name, "size": f.size, "header_sha256": f.header_sha256}
                      for f in c.files],
        }
        for c in plan.inputs.all
    ]
    return {
        "warpmerge_version": __version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": plan.config.to_dict(),
        "inputs": inputs,
        "runs": [
            {"name": n, "weight": p.weight, "checkpoints": len(r), "steps": s,
             "ema_coefficients": list(a)}
            for n, p, r, s, a in zip(plan.run_names, plan.config.runs, plan.runs,
                                     plan.inputs.steps, plan.contributions, strict=True)
        ],
        "groups": groups,
        "check": None,
    }


def _shown_ref(plan: Plan, c: Checkpoint) -> str:
    """A Hub id as written; a local path relative to the config's folder, never absolute."""
    if c.repo_id is not None:
        return c.ref
    try:
        return c.path.resolve().relative_to(plan.config.base_dir).as_posix()
    except ValueError:
        return c.path.name


def write_model_files(plan: Plan, folder: Path) -> None:
    """config.json (dtype updated), and the tokenizer and generation files of the init."""
    src = plan.init.path
    cfg = dict(plan.model_config) if plan.model_config is not None else None
    if cfg is not None:
        if plan.config.output.dtype:
            for key in [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]:
                cfg[key] = plan.config.output.dtype
        if HEAD_NAME not in plan.init.tensors and "tie_word_embeddings" in cfg:
            cfg["tie_word_embeddings"] = True
        (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if plan.config.output.copy_tokenizer:
        for name in MODEL_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, folder / name)


def write_provenance(plan: Plan, folder: Path, provenance: dict[str, Any]) -> None:
    """warpmerge.json and the README.md card made from it."""
    from .card import render_card

    (folder / "warpmerge.json").write_text(json.dumps(provenance, indent=2) + "\n")
    (folder / "README.md").write_text(render_card(provenance, license=plan.license))
