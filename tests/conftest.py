"""Shared test helpers: tiny Gemma-2-shaped models written as real safetensors files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from warpmerge.demo import DEMO_CONFIG, gemma2_shapes

# the demo's Gemma 2 config, smaller still
TINY = dict(DEMO_CONFIG, vocab_size=96, hidden_size=32, intermediate_size=48,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            query_pre_attn_scalar=16, sliding_window=8, max_position_embeddings=64,
            torch_dtype="float32")


def shapes(cfg: dict = TINY) -> dict[str, tuple[int, ...]]:
    return gemma2_shapes(cfg)


def random_model(seed: int, cfg: dict = TINY) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes(cfg).items()}


def perturb(model: dict[str, torch.Tensor], seed: int, scale: float = 0.01,
            skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A checkpoint drifted from `model`; tensors named in `skip` stay exactly equal."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.items():
        noise = torch.randn(v.shape, generator=g)
        out[k] = v.clone() if k in skip else v + scale * noise
    return out


def write_model(folder: Path, tensors: dict[str, torch.Tensor], cfg: dict = TINY,
                dtype: torch.dtype = torch.float32, shards: int = 1) -> Path:
    """Save as model.safetensors, or as `shards` files with an index, like transformers."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
               for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = list(tensors)
        per = -(-len(names) // shards)
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in names[i * per:(i + 1) * per]}
            save_file(part, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg = dict(cfg, torch_dtype=str(dtype).removeprefix("torch."))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def load_model(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run `warpmerge ARGS` in-process through the real entry point; (code, stdout, stderr)."""
    from warpmerge.cli import main

    monkeypatch.setattr(sys, "argv", ["warpmerge", *args])
    monkeypatch.delenv("WARPMERGE_DEBUG", raising=False)
    code = 0
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:  # main() installs its own
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    out = capsys.readouterr()
    return code, out.out, out.err


GOOD_CONFIG = """\
init: init
policies:
  - name: a
    checkpoints: run-a/step-*
  - name: b
    checkpoints: [run-b/step-1, run-b/step-2]
ema: {mu: 0.1, every: 2}
liti: {eta: [0.3, 1.0]}
output: {path: out, shard_size: 20KB}
"""


@pytest.fixture()
def setup(tmp_path: Path) -> Path:
    """A valid merge (init, runs a and b of two checkpoints) and its warp.yaml."""
    init = random_model(0)
    write_model(tmp_path / "init", init)
    for run in ("a", "b"):
        cur = init
        for t in (1, 2):
            cur = perturb(cur, 10 * ord(run) + t)
            write_model(tmp_path / f"run-{run}" / f"step-{t}", cur)
    (tmp_path / "warp.yaml").write_text(GOOD_CONFIG)
    return tmp_path


def assert_one_line_error(err: str, *expected: str) -> None:
    """The contract for user errors: one line on stderr, naming the culprit, no traceback."""
    assert err.startswith("error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)


def edit_yaml(old: str, new: str):
    """A change to `setup`'s warp.yaml: the first `old` becomes `new`."""
    def apply(root: Path) -> None:
        path = root / "warp.yaml"
        text = path.read_text()
        assert old in text, old
        path.write_text(text.replace(old, new, 1))
    return apply


def edit_model(folder: str, change):
    """A change to the tensors of `setup`'s model in `folder`, saved back."""
    def apply(root: Path) -> None:
        from safetensors.torch import load_file

        path = root / folder / "model.safetensors"
        tensors = load_file(str(path))
        change(tensors)
        path.unlink()
        write_model(root / folder, tensors)
    return apply


def write_tokenizer(folder: Path, vocab_size: int = 320) -> None:
    """A word-level tokenizer whose special tokens sit at Gemma's ids."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    specials = {
        0: "<pad>",
        1: "<eos>",
        2: "<bos>",
        3: "<unk>",
        106: "<start_of_turn>",
        107: "<end_of_turn>",
    }
    words = ["user", "model", "hello", "world"] + [f"w{i}" for i in range(vocab_size)]
    vocab: dict[str, int] = {}
    for i in range(vocab_size):
        vocab[specials[i] if i in specials else words.pop(0)] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # newlines vanish; fine for a test
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials.values()])
    tok.save(str(folder / "tokenizer.json"))


# --- a merge big enough to be caught mid-write (the kill and interrupt tests) -------------------

BIG_YAML = """\
init: init
policies:
  - {name: a, checkpoints: run-a/step-*}
  - {name: b, checkpoints: [run-b/step-1, run-b/step-2]}
ema: {mu: 0.2}
liti: {eta: 0.5}
output: {path: out, shard_size: 4MB}
"""
BIG_LAYERS, BIG_H = 8, 1024  # 8 tensors of 4 MB (> shard_size: a shard each), 10 shards


@pytest.fixture(scope="session")
def big(tmp_path_factory) -> Path:
    """init + 2 runs x 2 checkpoints of a 34 MB float32 model (generated fast: no RNG per
    checkpoint, the drift is a rolled copy of one noise tensor)."""
    root = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(BIG_H * BIG_H, generator=g)
    init = {f"model.layers.{i}.mlp.weight": torch.roll(noise, 7919 * i).view(BIG_H, BIG_H) * 0.1
            for i in range(BIG_LAYERS)}
    init["model.norm.weight"] = torch.ones(BIG_H)
    init["model.embed_tokens.weight"] = noise[:256 * BIG_H].view(256, BIG_H).flip(0).clone()

    def save(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "llama",
                                                        "torch_dtype": "float32"}))

    save(root / "init", init)
    for r, run in enumerate("ab"):
        cur = init
        for t in (1, 2):
            shift = 104729 * (2 * r + t)
            cur = {k: v + 0.01 * torch.roll(noise, shift)[:v.numel()].view(v.shape)
                   for k, v in cur.items()}
            save(root / f"run-{run}" / f"step-{t}", cur)
    (root / "warp.yaml").write_text(BIG_YAML)
    return root


@pytest.fixture(scope="session")
def big_reference(big: Path) -> Path:
    """An uninterrupted merge, in-process: what every killed-then-rerun merge must equal."""
    import warpmerge

    out = big / "reference"
    warpmerge.run(big / "warp.yaml", out=out, threads=1)
    return out


def model_files(folder: Path) -> dict[str, bytes]:
    """The files a rerun must reproduce bit for bit (warpmerge.json less its timestamp)."""
    files = {p.name: p.read_bytes() for p in folder.iterdir()
             if p.suffix == ".safetensors" or p.name.endswith(".index.json")
             or p.name == "config.json"}
    prov = json.loads((folder / "warpmerge.json").read_text())
    prov.pop("created", None)
    files["warpmerge.json"] = json.dumps(prov, sort_keys=True).encode()
    return files


def assert_same_model(folder: Path, reference: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in reference.iterdir())
    got, ref = model_files(folder), model_files(reference)
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert got[name] == ref[name], f"{name} differs from the uninterrupted run"


def start_merge(big: Path, out: Path, *args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("WARPMERGE_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "warpmerge", "run", str(big / "warp.yaml"), "--quiet",
         "--out", str(out), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, **popen)


def act_when(proc: subprocess.Popen, cond, act, timeout: float = 120.0) -> tuple[bytes, str]:
    """Once `cond()` holds, `act()` (a signal, a file changed under the merge), then let the
    process finish: (stdout, stderr). Fails if the process ended first; never leaves it running."""
    try:
        assert wait_for(proc, cond), proc.communicate()
        act()
        stdout, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return stdout, err.decode()


def staging_of(out: Path) -> Path:
    return out.parent / f".{out.name}.warpmerge-partial"


def wait_for(proc: subprocess.Popen, cond, timeout: float = 60.0) -> bool:
    """Poll `cond()` every 2 ms; False if the process ended (or time ran out) first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


def shard_written(out: Path, index: int, total: int):
    """Whether shard `index` of `total` has been opened in the staging folder."""
    name = f"model-{index:05d}-of-{total:05d}.safetensors"
    return lambda: (staging_of(out) / name).exists()


def n_shards(folder: Path) -> int:
    return len(list(folder.glob("model-*.safetensors")))


def rerun(big: Path, out: Path, monkeypatch, capsys, *args: str) -> None:
    code, stdout, err = run_cli(["run", str(big / "warp.yaml"), "-q", "--out", str(out), *args],
                                monkeypatch, capsys)
    assert code == 0, err
    assert stdout.split() == [str(out)]


def journaled_shards(out: Path) -> list[str]:
    """The shards the resume journal of `out`'s staging folder records as finished, in order
    ('<root index>/<file>'); a last line cut short by a kill is ignored."""
    path = staging_of(out) / ".warpmerge-journal.jsonl"
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("kind") == "shard":
            found.append(entry["path"])
    return found


def sigkill(proc: subprocess.Popen) -> None:
    """SIGKILL and reap; the process must not have ended on its own first."""
    ended = proc.poll()
    proc.kill()
    proc.wait(timeout=60)
    proc.stdout.close()
    proc.stderr.close()
    assert ended is None, f"the merge ended (exit {ended}) before it could be killed"
    assert proc.returncode == -signal.SIGKILL


OLD_NS = 946_684_800 * 10**9  # 2000-01-01 in ns: a file time no run writes


def stamp_old(path: Path) -> None:
    """Date a file back to OLD_NS (its bytes untouched): a run that rewrites it changes that."""
    os.utime(path, ns=(OLD_NS, OLD_NS))
