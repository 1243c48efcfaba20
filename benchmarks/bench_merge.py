#!/usr/bin/env python
"""Benchmark warpmerge's fused WARP merge against mergekit and against an I/O floor.

A Gemma-2-shaped random setup (an init and RL runs of several checkpoints, bfloat16, sharded at
100 MB) is generated once per size and cached in the work folder. Then, alternating the methods
across repeats and taking medians, it measures:

  warpmerge        `python -m warpmerge run` (EMA, SLERP per tensor, LITI eta 0.3, bf16 out)
  warpmerge-layer  the same with the default layer granularity
  mergekit         the same merge with `mergekit-yaml`: one `linear` per run with the EMA
                   weights, `nuslerp` with the init as base, a `linear` for LITI (float32
                   intermediates on disk, bf16 out)
  floor            a plain script that reads every input tensor once with safetensors and
                   writes one model of the output's size
  floor-fastexit   the same script, ending as warpmerge's command does: os._exit, without
                   the interpreter's teardown (about 0.6 s of torch's modules)

Each one is a subprocess; wall time is taken around it and its peak anonymous memory (RssAnon,
the process and its children) is sampled every 10 ms. It prints the table, the ratios and how
closely mergekit's output agrees with warpmerge's (and both with the float64 reference in
reference.py). `--lora` measures a merge of LoRA adapter runs (see bench_lora); where the time
goes inside warpmerge is profile_merge.py's job.

    python benchmarks/bench_merge.py                       # the default size, 3 repeats
    python benchmarks/bench_merge.py --sizes small,default,large --plot docs/performance.png
    python benchmarks/bench_merge.py --sizes none --memory-case --lora
    python benchmarks/bench_merge.py --sizes 2b --cold --repeats 2 --skip-mergekit \\
        --methods warpmerge,floor --workdir /work/bench-data

Needs the `bench` extra (mergekit, matplotlib); without mergekit that method is skipped, without
matplotlib the plot is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if (REPO / "warpmerge" / "__init__.py").is_file() and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # measure this checkout, whatever else is pip-installed

# benchmarks/ is on sys.path as the script's own folder
import measure  # noqa: E402
import reference  # noqa: E402
from measure import (  # noqa: E402
    BenchError,
    Measure,
    alternate,
    clear,
    drop_caches,
    run_measured,
    sub_env,
    summarize,
)
from setups import (  # noqa: E402
    EVERY,
    LORA_RANK,
    SIZES,
    Setup,
    disk_too_small,
    ensure_setup,
    generate_lora,
    input_bytes,
    lora_dirs,
    make_setup,
)

from warpmerge.modelfolder import open_checkpoint  # noqa: E402

MU, ETA = 0.01, 0.3  # EMA rate (checkpoints setups.EVERY steps apart) and LITI's eta
METHODS = ("warpmerge", "warpmerge-layer", "mergekit", "floor", "floor-fastexit")

# The I/O floor: start Python and torch, read every tensor of every input once with safetensors,
# write one model of the output's size (the init's bytes) and fsync it, as warpmerge does.
FLOOR_SCRIPT = r"""
import json, os, sys
import torch
from safetensors import safe_open

def shard_files(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = dict.fromkeys(json.load(f)["weight_map"].values())
        return [os.path.join(folder, n) for n in names]
    return [os.path.join(folder, "model.safetensors")]

out_path, inputs = sys.argv[1], sys.argv[2:]
where = []
for folder in inputs:
    handles = {}
    for path in shard_files(folder):
        h = safe_open(path, framework="pt")
        handles.update((k, h) for k in h.keys())
    where.append(handles)
names = list(where[0])
header, offset = {"__metadata__": {"format": "pt"}}, 0
for n in names:
    s = where[0][n].get_slice(n)
    shape, dtype = s.get_shape(), s.get_dtype()
    size = 2 * (torch.Size(shape).numel())
    header[n] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
    offset += size
body = json.dumps(header, separators=(",", ":")).encode()
body += b" " * (-len(body) % 8)
with open(out_path, "wb", buffering=0) as f:
    f.write(len(body).to_bytes(8, "little") + body)
    for n in names:
        tensors = [w[n].get_tensor(n) for w in where]
        f.write(memoryview(tensors[0].contiguous().view(torch.uint8).numpy()))
        del tensors
    os.fsync(f.fileno())
"""
# The floor with warpmerge's exit (warpmerge/cli.py, entry): no teardown of torch's modules.
FLOOR_FASTEXIT_SCRIPT = FLOOR_SCRIPT + "sys.stdout.flush()\nos._exit(0)\n"


# Method (a)'s first step, as a plain script: one adapter checkpoint made into a full model.
# ΔW = (alpha / r)·B @ A is added to the init in float32 and cast to the init's dtype; the
# output has the init's shards, index and config, and is fsynced.
MAKE_FULL_SCRIPT = r"""
import json, os, shutil, sys
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

init, adapter, out = sys.argv[1:4]
cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
scale = cfg["lora_alpha"] / cfg["r"]
lora = safe_open(os.path.join(adapter, "adapter_model.safetensors"), framework="pt")
keys = set(lora.keys())
os.makedirs(out)
index = os.path.join(init, "model.safetensors.index.json")
if os.path.exists(index):
    files = list(dict.fromkeys(json.load(open(index))["weight_map"].values()))
    shutil.copy(index, out)
else:
    files = ["model.safetensors"]
shutil.copy(os.path.join(init, "config.json"), out)
for name in files:
    tensors = load_file(os.path.join(init, name))
    for n, w in tensors.items():
        key = "base_model.model." + n[: -len(".weight")]
        if key + ".lora_A.weight" in keys:
            a = lora.get_tensor(key + ".lora_A.weight").float()
            b = lora.get_tensor(key + ".lora_B.weight").float()
            tensors[n] = (w.float() + scale * (b @ a)).to(w.dtype)
    path = os.path.join(out, name)
    save_file(tensors, path, metadata={"format": "pt"})
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
"""


def source_fingerprint() -> str:
    """Which warpmerge was measured: git commit, plus a hash of the package's sources."""
    import warpmerge

    pkg = Path(warpmerge.__file__).parent
    print(f"warpmerge imported from {pkg}")
    h = hashlib.sha256()
    for f in sorted(pkg.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    try:
        commit = subprocess.run(["git", "-C", str(pkg), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(pkg), "status", "--porcelain", "."],
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", ""
    return f"{warpmerge.__version__} {commit}{'+dirty' if dirty else ''} src {h.hexdigest()[:12]}"


def find_mergekit(arg: str | None) -> str | None:
    if arg:
        return arg if Path(arg).exists() or shutil.which(arg) else None
    found = shutil.which("mergekit-yaml")
    if found:
        return found
    venv = Path("/tmp/mk-venv/bin/mergekit-yaml")
    return str(venv) if venv.exists() else None


# --- configs -------------------------------------------------------------------------------

def warp_config(init: Path, run_names: list[str], runs: list[list[Path]], granularity: str,
                etas: list[float]) -> str:
    """A warpmerge config (YAML): EMA (mu 0.01, every 100), SLERP, LITI, bf16 out."""
    import yaml

    doc = {
        "init": str(init),
        "policies": [{"name": n, "checkpoints": [str(c) for c in run]}
                     for n, run in zip(run_names, runs, strict=True)],
        "ema": {"mu": MU, "every": EVERY},
        "slerp": {"granularity": granularity},
        "liti": {"eta": etas if len(etas) > 1 else etas[0]},
        "output": {"path": "out", "dtype": "bfloat16", "shard_size": "5GB",
                   "copy_tokenizer": False},
    }
    return yaml.safe_dump(doc, sort_keys=False)


def write_configs(setup: Setup, root: Path, cfg_dir: Path, mk_dtype: str,
                  etas: list[float] | None = None) -> dict[str, Path]:
    """The warpmerge configs (tensor and layer granularity) and the mergekit pipeline."""
    import yaml

    cfg_dir.mkdir(parents=True, exist_ok=True)
    runs = setup.checkpoint_dirs(root)
    paths: dict[str, Path] = {}
    for gran in ("tensor", "layer"):
        p = paths[f"wm-{gran}"] = cfg_dir / f"warp-{gran}.yaml"
        p.write_text(warp_config(root / "init", setup.run_names, runs, gran, etas or [ETA]))
    coefs = reference.ema_weights(setup.steps, MU)
    mk_dir = cfg_dir / "mergekit"
    mk_dir.mkdir(exist_ok=True)
    for name, run in zip(setup.run_names, runs, strict=True):
        models = [{"model": str(root / "init"), "parameters": {"weight": 1.0 - sum(coefs)}}]
        models += [{"model": str(c), "parameters": {"weight": a}}
                   for c, a in zip(run, coefs, strict=True)]
        doc = {"merge_method": "linear", "parameters": {"normalize": False}, "models": models,
               "dtype": mk_dtype, "out_dtype": mk_dtype}
        (mk_dir / f"ema-{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return paths


def mergekit_stages(setup: Setup, root: Path, cfg_dir: Path, out: Path, mk_dtype: str,
                    mk_bin: str) -> list[list[str]]:
    """per-run linear (EMA) -> nuslerp with the init as base -> linear (LITI), on disk."""
    import yaml

    if setup.runs != 2:
        raise BenchError("the mergekit pipeline needs exactly 2 runs (nuslerp takes two models)")
    mk_dir = cfg_dir / "mergekit"
    inter = out.parent / (out.name + "-intermediate")
    stages = []
    opts = ["--no-copy-tokenizer", "--quiet"]
    for name in setup.run_names:
        stages.append([mk_bin, str(mk_dir / f"ema-{name}.yaml"), str(inter / name), *opts])
    slerp = {"merge_method": "nuslerp", "base_model": str(root / "init"),
             "models": [{"model": str(inter / n), "parameters": {"weight": 1.0}}
                        for n in setup.run_names],
             "parameters": {"nuslerp_flatten": True},
             "dtype": mk_dtype, "out_dtype": mk_dtype}
    (mk_dir / "slerp.yaml").write_text(yaml.safe_dump(slerp, sort_keys=False))
    stages.append([mk_bin, str(mk_dir / "slerp.yaml"), str(inter / "slerp"), *opts])
    liti = {"merge_method": "linear", "parameters": {"normalize": False},
            "models": [{"model": str(root / "init"), "parameters": {"weight": 1.0 - ETA}},
                       {"model": str(inter / "slerp"), "parameters": {"weight": ETA}}],
            "dtype": "float32", "out_dtype": "bfloat16"}
    (mk_dir / "liti.yaml").write_text(yaml.safe_dump(liti, sort_keys=False))
    stages.append([mk_bin, str(mk_dir / "liti.yaml"), str(out), *opts])
    return stages


def bench_size(setup: Setup, args: argparse.Namespace, repeats: int) -> dict:
    """Alternate the methods `repeats` times on one setup; medians of time and peak memory."""
    workdir: Path = args.workdir
    root = ensure_setup(setup, workdir)
    cfg_dir = workdir / "configs" / setup.name
    out_dir = workdir / "out" / setup.name
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_configs(setup, root, cfg_dir, args.mk_dtype)
    py = args.python
    env = sub_env(None)
    inputs = setup.input_dirs(root)

    def warpmerge(gran: str, target: Path, *extra: str) -> tuple[list[list[str]], Path]:
        return ([[py, "-m", "warpmerge", "run", str(paths[f"wm-{gran}"]), "--out", str(target),
                  "--force", "--quiet", *extra]], target)

    commands: dict[str, tuple[list[list[str]], Path]] = {
        "warpmerge": warpmerge("tensor", out_dir / "warpmerge"),
        "warpmerge-layer": warpmerge("layer", out_dir / "warpmerge-layer"),
        "floor": ([[py, "-c", FLOOR_SCRIPT, str(out_dir / "floor.safetensors"),
                    *map(str, inputs)]], out_dir / "floor.safetensors"),
        "floor-fastexit": ([[py, "-c", FLOOR_FASTEXIT_SCRIPT,
                             str(out_dir / "floor-fe.safetensors"), *map(str, inputs)]],
                           out_dir / "floor-fe.safetensors"),
    }
    if args.mergekit_bin and not args.skip_mergekit:
        stages = mergekit_stages(setup, root, cfg_dir, out_dir / "mergekit", args.mk_dtype,
                                 args.mergekit_bin)
        commands["mergekit"] = (stages, out_dir / "mergekit")
    methods = [m for m in METHODS if m in commands and m in args.methods]
    for n in args.threads:  # the thread sweep: tensor groups, --threads n
        commands[f"warpmerge-t{n}"] = warpmerge("tensor", out_dir / f"warpmerge-t{n}",
                                                "--threads", str(n))
        methods.append(f"warpmerge-t{n}")
    log = workdir / "logs" / f"{setup.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    if not args.cold:  # warm the page cache: every measurement below reads from memory
        clear(commands["floor"][1])
        run_measured(commands["floor"][0], log, env)
    results: dict[str, list[Measure]] = {m: [] for m in methods}
    how = None
    for r, m in alternate(methods, repeats):
        if m not in results:
            continue
        stages, target = commands[m]
        clear(target)
        if args.cold:
            how = drop_caches(inputs)
        try:
            res = run_measured(stages, log, env)
        except BenchError as exc:
            if m != "mergekit":
                raise
            # e.g. a mergekit that does not work with these torch/transformers versions
            print(f"  mergekit failed ({exc}); leaving it out from here on", flush=True)
            args.mergekit_bin = None
            del results[m]
            continue
        results[m].append(res)
        print(f"  {setup.name} repeat {r + 1}/{repeats} {m:<16} {res.seconds:7.2f} s  "
              f"cpu {res.cpu:7.2f} s  peak anon {res.peak / 2**20:6.0f} MiB  "
              f"load {res.load:.1f}", flush=True)
        if setup.disk_bytes > 10**10:  # a big setup: do not leave its outputs around
            clear(target)
    summary: dict = {"size": setup.name, "params": setup.params, "inputs": setup.n_inputs,
                     "input_bytes": input_bytes(setup, root), "repeats": repeats,
                     "page_cache": f"cold ({how})" if args.cold else "warm",
                     "methods": summarize(results)}
    if ("mergekit" in results and "warpmerge" in results and not args.no_agreement
            and (args.agreement_all or setup.name == args.agreement_size)):
        print("  comparing outputs ...", flush=True)
        summary["agreement"] = agreement(setup, root, out_dir / "warpmerge",
                                         out_dir / "mergekit")
    return summary


# --- LoRA runs -----------------------------------------------------------------------------

def bench_lora(args: argparse.Namespace, repeats: int) -> dict:
    """A merge of LoRA runs (r 16 on all 7 projections, 2 runs x 3 checkpoints, on the init of
    the --lora-size setup, `default` unless told).

      (a) full     each adapter made into a full checkpoint first (MAKE_FULL_SCRIPT, timed
                   apart as `making`), then `warpmerge run` on the full checkpoints
      (b) floor    read the init, write one model (FLOOR_SCRIPT on the init alone)
      (c) adapters `warpmerge run` on the adapter checkpoints themselves

    A warpmerge that cannot read adapters makes (c) "not supported", and (a), (b) still run.
    """
    setup = make_setup(args.lora_size)
    base = ensure_setup(setup, args.workdir)
    init = base / "init"
    root = args.workdir / "setups" / f"lora-r{LORA_RANK}-{setup.name}-{setup.key}"
    if not (root / "setup.json").exists():
        print(f"Generating LoRA adapters in {root} ...", flush=True)
        generate_lora(setup, init, root)
    adapters = lora_dirs(setup, root)
    work = args.workdir / "out" / "lora"
    cfg_dir = args.workdir / "configs" / "lora"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    full = [[work / "full" / c.parent.name / c.name for c in run] for run in adapters]
    cfg_full, cfg_lora = cfg_dir / "warp-full.yaml", cfg_dir / "warp-adapters.yaml"
    cfg_full.write_text(warp_config(init, setup.run_names, full, "layer", [ETA]))
    cfg_lora.write_text(warp_config(init, setup.run_names, adapters, "layer", [ETA]))
    py, env = args.python, sub_env(None)
    log = args.workdir / "logs" / "lora.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")

    def warpmerge(cfg: Path, out: Path) -> list[list[str]]:
        return [[py, "-m", "warpmerge", "run", str(cfg), "--out", str(out), "--force", "--quiet"]]

    making = [[py, "-c", MAKE_FULL_SCRIPT, str(init), str(a), str(f)]
              for run_a, run_f in zip(adapters, full, strict=True)
              for a, f in zip(run_a, run_f, strict=True)]
    commands = {"(a) full checkpoints": (warpmerge(cfg_full, work / "a"), work / "a"),
                "(b) floor: init + one model": (
                    [[py, "-c", FLOOR_SCRIPT, str(work / "floor.safetensors"), str(init)]],
                    work / "floor.safetensors"),
                "(c) adapters": (warpmerge(cfg_lora, work / "c"), work / "c")}
    unsupported = None
    clear(work / "c")
    probe = subprocess.run(warpmerge(cfg_lora, work / "c")[0], capture_output=True, text=True,
                           env=env, timeout=measure.TIMEOUT_S)
    if probe.returncode:
        lines = (probe.stderr or probe.stdout).strip().splitlines() or ["(no message)"]
        unsupported = lines[-1][:300]
        print(f"  (c) not supported by this warpmerge: {unsupported}", flush=True)
        del commands["(c) adapters"]
    run_measured([[py, "-c", FLOOR_SCRIPT, str(work / "warm.safetensors"), str(init)]], log, env)
    clear(work / "warm.safetensors")
    results: dict[str, list[Measure]] = {m: [] for m in ["making", *commands]}
    for r in range(repeats):
        clear(work / "full")
        res = run_measured(making, log, env)
        results["making"].append(res)
        print(f"  lora repeat {r + 1}/{repeats} {'making 6 full checkpoints':<30} "
              f"{res.seconds:7.2f} s  cpu {res.cpu:7.2f} s", flush=True)
        k = r % len(commands)
        for m in list(commands)[k:] + list(commands)[:k]:
            stages, target = commands[m]
            clear(target)
            res = run_measured(stages, log, env)
            results[m].append(res)
            print(f"  lora repeat {r + 1}/{repeats} {m:<30} {res.seconds:7.2f} s  "
                  f"cpu {res.cpu:7.2f} s  peak anon {res.peak / 2**20:6.0f} MiB  "
                  f"load {res.load:.1f}", flush=True)
    clear(work / "full")
    adapter_bytes = sum(p.stat().st_size for run in adapters for c in run
                        for p in c.glob("*.safetensors"))
    return {"params": setup.params, "rank": LORA_RANK, "adapter_bytes": adapter_bytes,
            "size": setup.name, "init_bytes": input_bytes(setup, base) // setup.n_inputs,
            "repeats": repeats, "unsupported": unsupported, "methods": summarize(results)}


def print_lora(report: dict) -> None:
    ms = report["methods"]
    print(f"\nLoRA runs: r {report['rank']} on all 7 projections, 2 runs x 3 checkpoints on the "
          f"{report['size']} setup ({report['adapter_bytes'] / 1e6:.0f} MB of adapters), median of "
          f"{report['repeats']}")
    for m, r in ms.items():
        print(f"  {m:<30} {r['seconds']:8.2f} s  cpu {r['cpu']:7.2f} s  "
              f"peak anon {mib(r['peak_anon']):>6} MiB")
    floor = ms["(b) floor: init + one model"]["seconds"]
    a = ms["(a) full checkpoints"]["seconds"]
    print(f"  (a) / (b) floor: {a / floor:.2f}x  (making the full checkpoints: "
          f"{ms['making']['seconds']:.2f} s more)")
    if "(c) adapters" in ms:
        c = ms["(c) adapters"]["seconds"]
        print(f"  (c) / (b) floor: {c / floor:.2f}x  (goal <= 1.5x);  (a) / (c): {a / c:.2f}x "
              f"without making (goal >= 3x), {(a + ms['making']['seconds']) / c:.2f}x with it")
    else:
        print(f"  (c) adapters: not supported by this warpmerge ({report['unsupported']})")


# --- agreement -----------------------------------------------------------------------------

def _tensors(folder: Path):
    """name -> a function giving that tensor (read through warpmerge's model-folder reader)."""
    ckpt = open_checkpoint(folder, str(folder))
    return {n: (lambda info=info: ckpt.read(info, 0, info.numel).reshape(info.shape))
            for n, info in ckpt.tensors.items()}


def _ulp(ref):
    """The spacing of bf16 numbers at each value (8 significant bits).

    Measured at max(|ref|, rms of the tensor): near zero, bf16 is so dense that any rounding
    difference in the float32 arithmetic would count as thousands of ulps.
    """
    import torch

    _, exp = torch.frexp(ref)  # |ref| = m * 2**exp with 0.5 <= m < 1
    exp = torch.where(ref == 0, torch.full_like(exp, -125), exp)
    return torch.ldexp(torch.ones_like(ref), (exp - 8).clamp(min=-133))


def agreement(setup: Setup, root: Path, wm_dir: Path, mk_dir: Path) -> dict:
    """Element-wise comparison of the two bf16 outputs, and of each with a float64 reference."""
    import torch

    wm, mk = _tensors(wm_dir), _tensors(mk_dir)
    init_m = _tensors(root / "init")
    run_m = [[_tensors(c) for c in run] for run in setup.checkpoint_dirs(root)]
    weights = [reference.ema_weights(setup.steps, MU)] * setup.runs
    names = [n for n in wm if n in mk]
    stats = {"tensors": len(names), "only_warpmerge": sorted(set(wm) - set(mk)),
             "only_mergekit": sorted(set(mk) - set(wm)), "elements": 0, "differ": 0,
             "max_abs": 0.0, "max_ulp": 0, "diff_sq": 0.0, "out_sq": 0.0, "update_sq": 0.0,
             "wm_vs_ref_differ": 0, "mk_vs_ref_differ": 0, "wm_vs_ref_max_ulp": 0,
             "mk_vs_ref_max_ulp": 0, "worst_tensor": None}
    for n in names:
        a, b = wm[n](), mk[n]()
        if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16 or a.shape != b.shape:
            raise BenchError(f"{n}: warpmerge {a.dtype} {tuple(a.shape)}, "
                             f"mergekit {b.dtype} {tuple(b.shape)}")
        init = init_m[n]().double()
        ref = reference.warp(init, [[c[n]() for c in run] for run in run_m], weights, ETA)
        ref16 = ref.to(torch.bfloat16)
        af, bf = a.double(), b.double()
        diff = (af - bf).abs()
        stats["elements"] += a.numel()
        stats["differ"] += int((a.view(torch.int16) != b.view(torch.int16)).sum())
        mx = float(diff.max()) if a.numel() else 0.0
        if mx > stats["max_abs"]:
            stats["max_abs"], stats["worst_tensor"] = mx, n
        stats["diff_sq"] += float((diff * diff).sum())
        stats["out_sq"] += float((af * af).sum())
        stats["update_sq"] += float(((af - init) ** 2).sum())
        ulp = _ulp(torch.maximum(ref.abs(), ref.pow(2).mean().sqrt()))  # at the tensor's scale
        for key, x in (("wm", af), ("mk", bf)):
            stats[f"{key}_vs_ref_differ"] += int((x != ref16.double()).sum())
            stats[f"{key}_vs_ref_max_ulp"] = max(stats[f"{key}_vs_ref_max_ulp"],
                                                 float(((x - ref).abs() / ulp).max()))
        stats["max_ulp"] = max(stats["max_ulp"], float((diff / ulp).max()))
    stats["rel_err"] = math.sqrt(stats["diff_sq"] / stats["out_sq"]) if stats["out_sq"] else 0
    stats["rel_err_update"] = (math.sqrt(stats["diff_sq"] / stats["update_sq"])
                               if stats["update_sq"] else 0)
    return stats


# --- memory case ---------------------------------------------------------------------------

def memory_case(args: argparse.Namespace) -> dict:
    """warpmerge's peak anon RSS on a 512 MiB embedding, 5 inputs, layer groups, two etas."""
    setup = make_setup("mem512")
    root = ensure_setup(setup, args.workdir)
    cfg_dir = args.workdir / "configs" / setup.name
    paths = write_configs(setup, root, cfg_dir, args.mk_dtype, etas=[0.3, 0.7])
    out = args.workdir / "out" / setup.name
    out.mkdir(parents=True, exist_ok=True)
    log = args.workdir / "logs" / "mem512.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    env = sub_env(None)
    base = [args.python, "-m", "warpmerge", "run", str(paths["wm-layer"]), "--force", "--quiet"]
    variants = {
        "default settings": [],
        "--max-memory 1GB": ["--max-memory", "1GB"],
        "--max-memory 1GB --threads 1": ["--max-memory", "1GB", "--threads", "1"],
    }
    inputs = [str(p) for p in setup.input_dirs(root)]
    floor = [[args.python, "-c", FLOOR_SCRIPT, str(out / "floor.safetensors"), *inputs]]
    run_measured(floor, log, env)  # warm the page cache
    res: dict[str, list[Measure]] = {v: [] for v in variants}
    res["floor (one model)"] = []
    for r in range(args.repeats):
        for v, extra in variants.items():
            clear(out / "wm")
            m = run_measured([base + ["--out", str(out / "wm"), *extra]], log, env)
            res[v].append(m)
            print(f"  mem512 repeat {r + 1} {v:<30} {m.seconds:6.2f} s  cpu {m.cpu:6.2f} s  "
                  f"peak anon {m.peak / 2**20:6.0f} MiB  load {m.load:.1f}", flush=True)
        clear(out / "floor.safetensors")
        res["floor (one model)"].append(run_measured(floor, log, env))
    embed = setup.cfg["vocab_size"] * setup.cfg["hidden_size"] * 2
    return {"params": setup.params, "embedding_bytes": embed, "inputs": setup.n_inputs,
            "input_bytes": input_bytes(setup, root), "etas": [0.3, 0.7],
            "variants": {v: {"seconds": statistics.median(x.seconds for x in ms),
                             "cpu": statistics.median(x.cpu for x in ms),
                             "peak_anon": max(x.peak for x in ms)} for v, ms in res.items()}}


# --- reporting -----------------------------------------------------------------------------

def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def print_table(summary: dict) -> None:
    ms = summary["methods"]
    floor = ms.get("floor", {}).get("seconds")
    print(f"\n{summary['size']}: {summary['params'] / 1e6:.0f}M parameters per model, "
          f"{summary['inputs']} inputs, {summary['input_bytes'] / 1e9:.2f} GB read "
          f"({summary['page_cache']} page cache), median of {summary['repeats']}")
    floor_cpu = ms.get("floor", {}).get("cpu")
    floor_min = ms.get("floor", {}).get("seconds_min")
    print(f"  {'method':<16} {'wall s':>8} {'vs floor':>9} {'min s':>8} {'vs floor':>9} "
          f"{'cpu s':>8} {'vs floor':>9} {'peak anon MiB':>14}")
    for m, r in ms.items():
        ratio = f"{r['seconds'] / floor:.2f}x" if floor else "-"
        min_ratio = f"{r['seconds_min'] / floor_min:.2f}x" if floor_min else "-"
        cpu_ratio = f"{r['cpu'] / floor_cpu:.2f}x" if floor_cpu else "-"
        print(f"  {m:<16} {r['seconds']:8.2f} {ratio:>9} {r['seconds_min']:8.2f} {min_ratio:>9} "
              f"{r['cpu']:8.2f} {cpu_ratio:>9} {mib(r['peak_anon']):>14}")
    if "floor-fastexit" in ms:
        fe = ms["floor-fastexit"]
        print("  against floor-fastexit: " + ", ".join(
            f"{m} {ms[m]['seconds'] / fe['seconds']:.2f}x" for m in ("warpmerge", "warpmerge-layer")
            if m in ms))
    sweep = {int(m[len("warpmerge-t"):]): r for m, r in ms.items() if m.startswith("warpmerge-t")}
    if 1 in sweep:
        print("  threads (tensor groups), speed-up over --threads 1: " + ", ".join(
            f"{n}: {sweep[1]['seconds'] / r['seconds']:.2f}x" for n, r in sorted(sweep.items())))
    if "mergekit" in ms and "warpmerge" in ms:
        wm, mk = ms["warpmerge"], ms["mergekit"]
        st = ", ".join(f"{s:.1f}" for s in mk["stages"])
        print(f"  mergekit / warpmerge: {mk['seconds'] / wm['seconds']:.1f}x wall, "
              f"{mk['cpu'] / wm['cpu']:.1f}x cpu   (mergekit stages: {st} s)")
    ag = summary.get("agreement")
    if ag:
        print(f"  agreement (mergekit vs warpmerge, {ag['elements'] / 1e6:.0f}M elements): "
              f"max |diff| {ag['max_abs']:.3g} ({ag['worst_tensor']}), "
              f"{ag['max_ulp']:.2f} bf16 ulp, "
              f"{100 * ag['differ'] / ag['elements']:.5f}% of elements differ, "
              f"relative error {ag['rel_err']:.2e} of the output, "
              f"{ag['rel_err_update']:.2e} of the update (output - init)")
        print(f"  vs the float64 reference rounded to bf16: warpmerge differs in "
              f"{100 * ag['wm_vs_ref_differ'] / ag['elements']:.4f}% "
              f"(max {ag['wm_vs_ref_max_ulp']:.2f} ulp), mergekit in "
              f"{100 * ag['mk_vs_ref_differ'] / ag['elements']:.4f}% "
              f"(max {ag['mk_vs_ref_max_ulp']:.2f} ulp)")


def plot(summaries: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    styles = {"warpmerge": "o-", "warpmerge-layer": "s--", "mergekit": "^-", "floor": "x:",
              "floor-fastexit": "+:"}
    panels = [("seconds", "wall time (s, median)", 1.0), ("cpu", "CPU time, user + sys (s)", 1.0),
              ("peak_anon", "peak anonymous RSS (MiB)", 2.0**-20)]
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        for m in METHODS:
            pts = [(s["input_bytes"] / 1e9, s["methods"][m][key] * scale)
                   for s in summaries if m in s["methods"]]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], styles[m], label=m)
        ax.set_xlabel("GB read (all inputs)")
        ax.set_ylabel(label)
        ax.set_xticks([s["input_bytes"] / 1e9 for s in summaries],
                      [f"{s['input_bytes'] / 1e9:.1f}\n{s['size']}, {s['params'] / 1e6:.0f}M"
                       for s in summaries], fontsize=8)
        ax.grid(alpha=0.3)
        if key == "peak_anon":
            ax.set_ylim(bottom=0)
        else:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle("WARP merge of a Gemma-2-shaped model (init + 2 runs x 3 checkpoints, bf16 "
                 f"in and out), {os.cpu_count()} CPU cores", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# --- main ----------------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("thread counts start at 1")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="runs of each method (median taken)")
    p.add_argument("--sweep-repeats", type=int, default=None,
                   help="repeats for sizes other than 'default' (default: --repeats)")
    p.add_argument("--sizes", default="default",
                   help=f"comma-separated sizes to measure ({', '.join(SIZES)}), or none")
    p.add_argument("--workdir", type=Path,
                   default=Path(tempfile.gettempdir()) / "warpmerge-bench",
                   help="setups (cached), outputs, logs (default: $TMPDIR/warpmerge-bench)")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of time and memory")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    p.add_argument("--skip-mergekit", action="store_true", help="do not run mergekit")
    p.add_argument("--mergekit-bin", default=None,
                   help="mergekit-yaml to run (default: on PATH, else /tmp/mk-venv/bin)")
    p.add_argument("--mk-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of mergekit's intermediate models (default float32)")
    p.add_argument("--methods", default=",".join(METHODS), help="which methods to run")
    p.add_argument("--threads", type=_ints, default=[],
                   help="also run warpmerge (tensor groups) with --threads N for each N, "
                        "e.g. 1,2,4 (a scaling sweep)")
    p.add_argument("--cold", action="store_true",
                   help="read the inputs from disk: drop the page cache before every command "
                        "(drop_caches as root, else posix_fadvise on the inputs)")
    p.add_argument("--no-agreement", action="store_true", help="skip the output comparison")
    p.add_argument("--agreement-all", action="store_true",
                   help="compare the outputs at every size (default: 'default' only)")
    p.add_argument("--memory-case", action="store_true",
                   help="also measure the 512 MiB-embedding memory case")
    p.add_argument("--lora", action="store_true",
                   help="also measure a merge of LoRA runs (r 16, 2 runs x 3 checkpoints)")
    p.add_argument("--lora-size", default="default", choices=list(SIZES),
                   help="the setup whose init the LoRA runs adapt (default: default)")
    p.add_argument("--python", default=sys.executable, help="interpreter for warpmerge/floor")
    p.add_argument("--timeout", type=float, default=measure.TIMEOUT_S,
                   help="seconds before a command is killed as hung (default 900)")
    args = p.parse_args(argv)
    measure.TIMEOUT_S = args.timeout
    args.workdir = args.workdir.resolve()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method {bad[0]!r} (known: {', '.join(METHODS)})")
    if "floor" not in args.methods:
        args.methods.append("floor")
    args.mergekit_bin = None if args.skip_mergekit else find_mergekit(args.mergekit_bin)
    if not args.skip_mergekit and "mergekit" in args.methods and args.mergekit_bin is None:
        print("mergekit-yaml not found (pip install mergekit, or --mergekit-bin): skipping it")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip() not in ("", "none")]
    args.agreement_size = "default" if "default" in sizes or not sizes else sizes[0]
    try:
        chosen = [make_setup(s) for s in sizes]
    except ValueError as exc:
        p.error(str(exc))
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                     "warpmerge": source_fingerprint(), "sizes": []}
    print(f"warpmerge source: {results['warpmerge']}", flush=True)
    t0 = time.perf_counter()
    try:
        for setup in chosen:
            reps = args.repeats if (setup.name == "default" or args.sweep_repeats is None) \
                else args.sweep_repeats
            why = disk_too_small(setup, args.workdir)
            if why:
                print(f"== {setup.name}: {why}", flush=True)
                continue
            print(f"== {setup.name} ({reps} repeats)", flush=True)
            results["sizes"].append(bench_size(setup, args, reps))
        for s in results["sizes"]:
            print_table(s)
        if args.memory_case:
            print("\n== memory case: 512 MiB bf16 embedding, 5 inputs, layer groups, eta "
                  "[0.3, 0.7]", flush=True)
            mc = results["memory_case"] = memory_case(args)
            print(f"  {mc['params'] / 1e6:.0f}M parameters, embedding "
                  f"{mc['embedding_bytes'] / 2**20:.0f} MiB, {mc['input_bytes'] / 1e9:.2f} GB read")
            for v, r in mc["variants"].items():
                print(f"  {v:<32} {r['seconds']:6.2f} s  cpu {r['cpu']:6.2f} s  "
                      f"peak anon {mib(r['peak_anon']):>6} MiB")
        if args.lora:
            print(f"\n== LoRA runs ({args.repeats} repeats)", flush=True)
            results["lora"] = bench_lora(args, args.repeats)
            print_lora(results["lora"])
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.plot and results["sizes"]:
        plot(results["sizes"], args.plot)
    out_json = args.json or args.workdir / "results.json"
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults in {out_json} ({time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
