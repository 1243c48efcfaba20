"""The benchmark's inputs: Gemma-2-shaped random models and PEFT-style LoRA runs on them.

A setup is an init plus RL runs of several checkpoints, bf16, sharded at 100 MB like the Hub's
smaller models. It is generated once, streamed block by block through warpmerge's own shard
planner and writer (so memory stays small even for a 2B model), and cached in the work folder
under a key of its parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from warpmerge.demo import DEMO_CONFIG, gemma2_shapes
from warpmerge.shards import OutTensor, plan_shards
from warpmerge.writer import ShardedWriter

EVERY = 100  # optimizer steps between saved checkpoints
SHARD_BYTES = 100 * 10**6  # input shards: at most 100 MB, as the Hub's smaller models
BLOCK = 1 << 25  # a tensor is generated in row blocks of at most this many elements
DISK_MARGIN = 5 * 10**9  # free bytes left over after a setup and its outputs, or it is skipped

# the demo's Gemma 2 config at the benchmark size
BASE_CONFIG = dict(DEMO_CONFIG, vocab_size=32000, hidden_size=1024, intermediate_size=4096,
                   num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=128, query_pre_attn_scalar=128, sliding_window=4096,
                   max_position_embeddings=8192)

# name -> (config overrides, runs, checkpoints per run)
SIZES: dict[str, tuple[dict, int, int]] = {
    "tiny": ({"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 1024,
              "num_hidden_layers": 2}, 2, 3),
    "small": ({"num_hidden_layers": 2}, 2, 3),
    "default": ({}, 2, 3),
    "large": ({"num_hidden_layers": 24}, 2, 3),
    "xlarge": ({"num_hidden_layers": 40}, 2, 3),
    # the memory goal: a 512 MiB bf16 embedding, 5 inputs, two eta values
    "mem512": ({"vocab_size": 262144, "num_hidden_layers": 2}, 2, 2),
    # Gemma-2-2B's shapes: 2.61B parameters, 5.2 GB per model, 36.6 GB for 7 inputs
    "2b": ({"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
            "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
            "head_dim": 256, "query_pre_attn_scalar": 256}, 2, 3),
}

@dataclass(frozen=True)
class Setup:
    name: str
    cfg: dict
    runs: int
    checkpoints: int
    seed: int = 0

    @property
    def key(self) -> str:
        text = json.dumps([self.cfg, self.runs, self.checkpoints, self.seed, 2], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    @property
    def run_names(self) -> list[str]:
        return [f"run-{chr(ord('a') + r)}" for r in range(self.runs)]

    @property
    def steps(self) -> list[int]:
        return [(t + 1) * EVERY for t in range(self.checkpoints)]

    def checkpoint_dirs(self, root: Path) -> list[list[Path]]:
        return [[root / run / f"step-{s}" for s in self.steps] for run in self.run_names]

    def input_dirs(self, root: Path) -> list[Path]:
        return [root / "init"] + [c for run in self.checkpoint_dirs(root) for c in run]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return gemma2_shapes(self.cfg)

    @property
    def params(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values())

    @property
    def n_inputs(self) -> int:
        return 1 + self.runs * self.checkpoints

    @property
    def disk_bytes(self) -> int:
        return 2 * self.params * self.n_inputs


def make_setup(name: str) -> Setup:
    if name not in SIZES:
        raise ValueError(f"unknown size {name!r} (known: {', '.join(SIZES)})")
    overrides, runs, ckpts = SIZES[name]
    return Setup(name, {**BASE_CONFIG, **overrides}, runs, ckpts)


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _uniform(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-variance uniform noise in float32 (several times faster than normal draws)."""
    x = rng.random(n, dtype=np.float32)
    x -= 0.5
    x *= math.sqrt(12.0)
    return x


def _bf16(x: np.ndarray):
    import torch

    return torch.from_numpy(x).to(torch.bfloat16)


def generate(setup: Setup, root: Path, log: bool = True) -> None:
    """Write the init and every checkpoint as sharded bf16 safetensors, block by block.

    Each run drifts from the init by small steps along its own random direction plus a shared
    one, so task vectors are far from collinear (as in real RL runs). Every block of rows has
    its own seeded generator, so the data does not depend on the sharding, and memory stays at
    a few blocks whatever the model (a 2B model's embedding is 590M elements).
    """
    import torch

    shapes = setup.shapes()
    layout = plan_shards([OutTensor(n, torch.bfloat16, s) for n, s in shapes.items()],
                         SHARD_BYTES)
    partial = root.with_name(root.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    pdirs = setup.input_dirs(partial)
    writers = []
    for d in pdirs:
        d.mkdir(parents=True)
        writers.append(ShardedWriter(d, layout))
    t0 = time.perf_counter()
    for name, shape in shapes.items():
        for w in writers:
            w.begin_tensor(name)
        scale = 0.1 if len(shape) == 1 else shape[-1] ** -0.5
        row = math.prod(shape[1:])
        rows_per_block = max(1, BLOCK // row)
        for b, first in enumerate(range(0, shape[0], rows_per_block)):
            n = (min(shape[0], first + rows_per_block) - first) * row
            rng = _rng(setup.seed, name, *([b] if b else []))
            init = _uniform(rng, n)
            init *= scale
            common = _uniform(rng, n)
            common *= 0.3
            writers[0].write(_bf16(init))
            k = 1
            for _ in range(setup.runs):
                cur = init.copy()
                for _ in range(setup.checkpoints):
                    step = _uniform(rng, n)
                    step += common
                    step *= 0.02 * scale
                    cur += step
                    writers[k].write(_bf16(cur))
                    k += 1
            del init, common, cur, step
    for w, d in zip(writers, pdirs, strict=True):
        w.finish()
        (d / "config.json").write_text(json.dumps(setup.cfg, indent=2) + "\n")
    os.sync()
    info = {**asdict(setup), "params": setup.params,
            "inputs": [str(p) for p in setup.input_dirs(root)],
            "seconds": round(time.perf_counter() - t0, 1)}
    (partial / "setup.json").write_text(json.dumps(info, indent=2) + "\n")
    if root.exists():
        shutil.rmtree(root)
    partial.rename(root)
    if log:
        print(f"  generated {setup.name} in {info['seconds']} s", flush=True)


def setup_root(setup: Setup, workdir: Path) -> Path:
    return workdir / "setups" / f"{setup.name}-{setup.key}"


def ensure_setup(setup: Setup, workdir: Path) -> Path:
    root = setup_root(setup, workdir)
    if not (root / "setup.json").exists():
        print(f"Generating the {setup.name} setup ({setup.params / 1e6:.0f}M parameters x "
              f"{setup.n_inputs} inputs, {setup.disk_bytes / 1e9:.1f} GB) in {root} ...",
              flush=True)
        generate(setup, root)
    return root


def disk_too_small(setup: Setup, workdir: Path) -> str | None:
    """Why this setup cannot be run in `workdir`, if it cannot: its inputs plus two outputs
    (warpmerge's staging folder and the floor's file) and a margin must fit."""
    workdir.mkdir(parents=True, exist_ok=True)
    cached = (setup_root(setup, workdir) / "setup.json").exists()
    need = (0 if cached else setup.disk_bytes) + 2 * 2 * setup.params + DISK_MARGIN
    free = shutil.disk_usage(workdir).free
    if free < need:
        return (f"needs {need / 1e9:.0f} GB free in {workdir} ({free / 1e9:.0f} GB free): "
                "skipped (--workdir elsewhere?)")
    return None


def input_bytes(setup: Setup, root: Path) -> int:
    return sum(f.stat().st_size for d in setup.input_dirs(root) for f in d.glob("*.safetensors"))


# --- LoRA setup ------------------------------------------------------------------------------

LORA_RANK, LORA_ALPHA = 16, 32
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def adapter_config(init: Path) -> dict:
    """adapter_config.json as PEFT (0.x) saves it for a plain LoRA on every projection."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(init),
        "r": LORA_RANK, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(p.split(".")[1] for p in PROJECTIONS),
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "layers_pattern": None, "revision": None,
    }


def lora_dirs(setup: Setup, root: Path) -> list[list[Path]]:
    return [[root / run / f"checkpoint-{s}" for s in setup.steps] for run in setup.run_names]


def generate_lora(setup: Setup, init: Path, root: Path) -> None:
    """PEFT-style LoRA checkpoints (r 16, alpha 32, all 7 projections) of `setup`'s runs.

    A and B are float32, as a LoRA trained in fp32 saves them (PEFT saves the adapter's own
    dtype). B starts at zero in PEFT and grows as training goes; here each run's A and B drift
    by random steps, so that ΔW = 2·B@A is of the size of the full setup's drift.
    """
    import torch
    from safetensors.torch import save_file

    shapes = setup.shapes()
    partial = root.with_name(root.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    for r, run_dirs in enumerate(lora_dirs(setup, partial)):
        a_cur: dict[str, np.ndarray] = {}
        b_cur: dict[str, np.ndarray] = {}
        for t, (d, step) in enumerate(zip(run_dirs, setup.steps, strict=True)):
            tensors = {}
            for layer in range(setup.cfg["num_hidden_layers"]):
                for proj in PROJECTIONS:
                    name = f"model.layers.{layer}.{proj}"
                    out_f, in_f = shapes[name + ".weight"]
                    rng = _rng(setup.seed, "lora", r, t, name)
                    a_step = _uniform(rng, LORA_RANK * in_f) * in_f ** -0.5
                    b_step = _uniform(rng, out_f * LORA_RANK) * 0.002
                    a_cur[name] = a_cur[name] + 0.1 * a_step if name in a_cur else a_step
                    b_cur[name] = b_cur.get(name, 0) + b_step
                    key = f"base_model.model.{name}"
                    tensors[key + ".lora_A.weight"] = torch.from_numpy(
                        a_cur[name].reshape(LORA_RANK, in_f))
                    tensors[key + ".lora_B.weight"] = torch.from_numpy(
                        b_cur[name].reshape(out_f, LORA_RANK))
            d.mkdir(parents=True)
            save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
            (d / "adapter_config.json").write_text(json.dumps(adapter_config(init), indent=2))
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step}) + "\n")
    (partial / "setup.json").write_text(json.dumps({"init": str(init), "rank": LORA_RANK,
                                                     "alpha": LORA_ALPHA}) + "\n")
    if root.exists():
        shutil.rmtree(root)
    partial.rename(root)
