"""The engine's output against a float64 reference written here, independently of the engine.

The reference follows the spec's formulas literally: the EMA is stepped checkpoint by
checkpoint, task vectors are flattened per group and slerped as vectors, then LITI.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, load_model, perturb, random_model, write_model
from reference import ref_ema, ref_slerp, reference

import warpmerge
from warpmerge.config import build_config
from warpmerge.errors import InputError

# --- helpers ---------------------------------------------------------------------------------


def make_setup(tmp_path: Path, n_runs: int, n_ckpts: list[int], dtype=torch.float32,
               shards: int = 1, skip: tuple[str, ...] = ()):
    init = random_model(0)
    write_model(tmp_path / "init", init, dtype=dtype, shards=shards)
    runs = []
    for r in range(n_runs):
        cur, run = init, []
        for t in range(n_ckpts[r]):
            cur = perturb(cur, seed=100 * r + t + 1, scale=0.02, skip=skip)
            write_model(tmp_path / f"run{r}" / f"step-{(t + 1) * 10}", cur, dtype=dtype,
                        shards=shards)
            run.append({k: v.to(dtype) for k, v in cur.items()})
        runs.append(run)
    return {k: v.to(dtype) for k, v in init.items()}, runs


def config_for(tmp_path: Path, n_runs: int, **kw):
    policies = [{"checkpoints": f"run{r}/step-*"} | kw.pop(f"policy{r}", {})
                for r in range(n_runs)]
    cfg = build_config(init="init", policies=policies, **kw)
    return cfg.with_base_dir(tmp_path)


def assert_matches(out_dir: Path, ref: dict, dtype: torch.dtype):
    got = load_model(out_dir)
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].dtype == dtype, k
        if dtype == torch.float32:
            torch.testing.assert_close(got[k].double(), v, rtol=2e-6, atol=2e-7, msg=k)
        else:  # one rounding to bf16 of a float32 result: within one bf16 ulp
            torch.testing.assert_close(got[k].double(), v, rtol=2**-7, atol=1e-6, msg=k)


CASES = [
    # (runs, checkpoints per run, granularity, etas, out dtype, input shards, ema options)
    (1, [3], "layer", [0.3], None, 1, {}),
    (2, [3, 2], "layer", [0.0, 0.3, 1.5], None, 1, {}),
    (2, [1, 4], "tensor", [1.0], "bfloat16", 2, {"mu": 0.3, "every": 2}),
    (3, [2, 3, 1], "model", [0.5, 2.0], "float32", 3, {"mu": 0.1, "start": "first"}),
    (3, [4, 1, 2], "layer", [0.7], "bfloat16", 1, {"use": "last"}),
    (2, [2, 2], "model", [0.3], None, 2, {"mu": 1.0}),
]


@pytest.mark.parametrize("n_runs,n_ckpts,gran,etas,out_dtype,shards,ema", CASES)
def test_engine_matches_float64_reference(tmp_path, n_runs, n_ckpts, gran, etas, out_dtype,
                                          shards, ema):
    init, runs = make_setup(tmp_path, n_runs, n_ckpts, shards=shards)
    ema_kw = {"mu": 0.05, "every": 3} | ema
    weights = [1.0, 2.0, 0.5][:n_runs]
    cfg = config_for(
        tmp_path, n_runs, ema=ema_kw, slerp={"granularity": gran}, liti={"eta": etas},
        output={"path": "out", "dtype": out_dtype, "shard_size": "20KB"},
        **{f"policy{r}": {"weight": weights[r]} for r in range(n_runs)},
    )
    result = warpmerge.run(cfg)
    refs = reference(init, runs, granularity=gran, etas=etas, weights=weights,
                     **{k: v for k, v in ema_kw.items()})
    assert len(result.outputs) == len(etas)
    for out_dir, ref in zip(result.outputs, refs, strict=True):
        assert_matches(out_dir, ref, getattr(torch, out_dtype or "float32"))


def test_bfloat16_inputs_default_to_bfloat16_output(tmp_path):
    init, runs = make_setup(tmp_path, 2, [2, 2], dtype=torch.bfloat16)
    cfg = config_for(tmp_path, 2, output={"path": "out"}, liti={"eta": [0.0, 0.6]},
                     ema={"mu": 0.2})
    result = warpmerge.run(cfg)
    refs = reference(init, runs, mu=0.2, etas=[0.0, 0.6])
    for out_dir, ref in zip(result.outputs, refs, strict=True):
        assert_matches(out_dir, ref, torch.bfloat16)
    # eta = 0 gives the init back bit for bit
    got = load_model(result.outputs[0])
    assert all(torch.equal(got[k], v) for k, v in init.items())


def test_explicit_lambda_and_tensor_granularity(tmp_path):
    init, runs = make_setup(tmp_path, 2, [1, 1])
    cfg = config_for(tmp_path, 2, slerp={"granularity": "tensor", "lambda": 0.3},
                     liti={"eta": 0.8}, output={"path": "out"})
    result = warpmerge.run(cfg)
    (ref,) = reference(init, runs, granularity="tensor", lam=0.3, etas=(0.8,))
    assert_matches(result.outputs[0], ref, torch.float32)


def test_reference_reproduces_the_spec_worked_vectors():
    """The reference itself, on the spec's worked vectors and its LERP fallbacks."""
    e = torch.eye(3, dtype=torch.float64)
    r2 = ref_slerp(e[0], e[1], 0.5, 0.0)
    assert r2.tolist() == pytest.approx([0.70711, 0.70711, 0.0], abs=1e-5)
    assert ref_slerp(r2, e[2], 1 / 3, 0.0).tolist() == pytest.approx([0.61237, 0.61237, 0.5],
                                                                     abs=1e-5)
    x = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    assert torch.equal(ref_slerp(x, torch.zeros(3, dtype=torch.float64), 0.5, 0.0), 0.5 * x)
    assert torch.allclose(ref_slerp(x, 3 * x, 0.5, 0.0), 2 * x)  # collinear
    tiny = torch.tensor([1e-7, 0.0, 0.0], dtype=torch.float64)  # under a zero threshold of 1e-6
    assert torch.equal(ref_slerp(x, tiny, 0.5, 1e-12), 0.5 * x + 0.5 * tiny)
    init = {"model.layers.0.a": torch.zeros(2), "model.layers.0.b": torch.zeros(1)}
    runs = [[{"model.layers.0.a": torch.tensor([1.0, 0.0]), "model.layers.0.b": torch.zeros(1)}],
            [{"model.layers.0.a": torch.zeros(2), "model.layers.0.b": torch.ones(1)}]]
    (got,) = reference(init, runs, etas=(1.0,))  # one layer group: one angle of 90°
    assert got["model.layers.0.a"].tolist() == pytest.approx([0.70711, 0.0], abs=1e-5)
    assert got["model.layers.0.b"].tolist() == pytest.approx([0.70711], abs=1e-5)


def test_unchanged_tensor_gives_exact_zero_task_vector(tmp_path):
    """A tensor no run touched stays the init's, and its group falls back to LERP."""
    skip = ("model.norm.weight",)
    init, runs = make_setup(tmp_path, 2, [3, 3], skip=skip)
    cfg = config_for(tmp_path, 2, liti={"eta": 1.0}, output={"path": "out"})
    result = warpmerge.run(cfg)
    got = load_model(result.outputs[0])
    assert torch.equal(got["model.norm.weight"], init["model.norm.weight"])
    norm_group = next(g for g in result.groups if g.name == "model.norm.weight")
    assert norm_group.chain[0].mode == "lerp" and norm_group.chain[0].cos_omega is None


def test_tied_lm_head_in_some_inputs(tmp_path):
    """An init with lm_head and a checkpoint without it (tied): the embedding stands in."""
    init = random_model(0)
    init["lm_head.weight"] = init["model.embed_tokens.weight"].clone()
    write_model(tmp_path / "init", init)
    ck = perturb(init, 1)
    ck_tied = {k: v for k, v in ck.items() if k != "lm_head.weight"}
    write_model(tmp_path / "run0" / "step-1", ck_tied)
    cfg = config_for(tmp_path, 1, liti={"eta": 1.0}, output={"path": "out"})
    got = load_model(warpmerge.run(cfg).outputs[0])
    assert torch.allclose(got["lm_head.weight"], ck["model.embed_tokens.weight"])
    # and the other way round: a tied init drops a checkpoint's explicit lm_head
    write_model(tmp_path / "init2", ck_tied)
    write_model(tmp_path / "run1" / "step-1", init)
    cfg2 = build_config(init="init2", policies=[{"checkpoints": ["run1/step-1"]}],
                        output={"path": "out2"}).with_base_dir(tmp_path)
    got2 = load_model(warpmerge.run(cfg2).outputs[0])
    assert "lm_head.weight" not in got2


def test_non_float_tensors_are_copied_from_init(tmp_path):
    init = random_model(0)
    init["model.position_ids"] = torch.arange(10, dtype=torch.int64)
    write_model(tmp_path / "init", {k: v for k, v in init.items()})
    ck = perturb({k: v for k, v in init.items() if v.is_floating_point()}, 1)
    ck["model.position_ids"] = torch.arange(10, dtype=torch.int64)
    write_model(tmp_path / "run0" / "step-1", ck)
    cfg = config_for(tmp_path, 1, output={"path": "out", "dtype": "bfloat16"})
    got = load_model(warpmerge.run(cfg).outputs[0])
    assert got["model.position_ids"].dtype == torch.int64
    assert torch.equal(got["model.position_ids"], init["model.position_ids"])


@pytest.mark.parametrize("use", ["ema", "last"])
def test_ema_save_writes_each_runs_ema(tmp_path, use):
    """`save` writes the EMA even when `use: last` merges the last checkpoints."""
    init, runs = make_setup(tmp_path, 2, [3, 2])
    cfg = config_for(tmp_path, 2, ema={"mu": 0.3, "save": "emas", "use": use},
                     output={"path": "out"}, policy0={"name": "alpha"}, policy1={"name": "beta"})
    result = warpmerge.run(cfg)
    assert [p.name for p in result.ema_outputs] == ["alpha", "beta"]
    for path, run in zip(result.ema_outputs, runs, strict=True):
        got = load_model(path)
        for k, v in init.items():
            expected = ref_ema(v.double(), [c[k].double() for c in run], 0.3, 1, "init", "ema")
            torch.testing.assert_close(got[k].double(), expected, rtol=2e-6, atol=2e-7)


def big_setup(tmp_path: Path):
    cfg = {"vocab_size": 1000, "hidden_size": 160, "intermediate_size": 320,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "head_dim": 80}
    from conftest import TINY

    full = dict(TINY, **cfg)
    init = random_model(0, full)
    write_model(tmp_path / "init", init, full, dtype=torch.bfloat16)
    for r in range(2):
        cur = init
        for t in range(2):
            cur = perturb(cur, 10 * r + t, 0.02)
            write_model(tmp_path / f"run{r}" / f"step-{t}", cur, full, dtype=torch.bfloat16)


@pytest.mark.slow
def test_bit_identical_across_threads_and_chunk_sizes(tmp_path):
    """Tensors of 160,000 elements span several 65,536-element chunks."""
    big_setup(tmp_path)
    cfg = config_for(tmp_path, 2, liti={"eta": [0.3, 1.2]}, output={"path": "out"})
    digests = []
    for threads, chunk, memory in [(1, None, None), (2, 1 << 16, None), (2, 3 << 16, 1 << 20)]:
        out = tmp_path / f"o{threads}-{chunk}-{memory}"
        warpmerge.run(cfg, out=out, threads=threads, chunk=chunk, max_memory=memory)
        digests.append(sorted((p.relative_to(out).as_posix(), p.read_bytes())
                              for p in out.rglob("*.safetensors")))
    assert digests[0] == digests[1] == digests[2]


def test_a_group_over_the_budget_keeps_what_fits_and_reads_only_the_rest_again(
        tmp_path, monkeypatch):
    """The embedding (160,000 elements, 3 chunks) with room for half of it cached: pass 2
    reads again only the chunks past the cached prefix, the plan counts exactly the bytes
    read, and the output is bit-identical to the fully cached merge."""
    from collections import Counter

    from warpmerge.kernel import float_chunks
    from warpmerge.modelfolder import Checkpoint

    big_setup(tmp_path)
    cfg = config_for(tmp_path, 2, output={"path": "out"}, slerp={"granularity": "tensor"})
    chunk = 1 << 16
    roomy = warpmerge.plan(cfg, threads=1, chunk=chunk)
    embed = next(g for g in roomy.groups if g.name.endswith("embed_tokens.weight"))
    per_element = 4 * 3  # θ_init and two task vectors, float32
    budget = roomy.workspace_bytes() + per_element * (embed.cache_numel // 2)
    tight = warpmerge.plan(cfg, threads=1, chunk=chunk, max_memory=budget)
    kept = tight.cached_numel(embed)
    assert 0 < kept < embed.cache_numel
    assert all(tight.cacheable(g) for g in tight.groups if g.name != embed.name)
    again = [c for c in float_chunks(embed, chunk) if c.offset + c.count > kept]
    assert len(again) == 2  # the first chunk is kept, the other two are read twice
    n = len(tight.groups)
    assert f"({n - 1} of {n} groups read once, 1 partly)" in str(tight)

    reads: list[tuple[str, int, int]] = []
    real = Checkpoint.read_into

    def read_into(self, info, start, count, raw):
        reads.append((info.name, start, count * info.dtype.itemsize))
        return real(self, info, start, count, raw)

    monkeypatch.setattr(Checkpoint, "read_into", read_into)
    warpmerge.run(cfg, out=tmp_path / "tight", threads=1, chunk=chunk, max_memory=budget)
    per_chunk = Counter(start for name, start, _ in reads if name == embed.name)
    assert per_chunk == {c.start: 5 * (2 if c in again else 1)  # init + 2 runs x 2
                         for c in float_chunks(embed, chunk)}
    assert sum(n for _, _, n in reads) == tight.read_bytes()

    monkeypatch.setattr(Checkpoint, "read_into", real)
    warpmerge.run(cfg, out=tmp_path / "roomy", threads=1, chunk=chunk)
    for f in (tmp_path / "roomy").rglob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "tight" / f.relative_to(tmp_path / "roomy")
                                  ).read_bytes()


def test_a_nan_only_the_saved_ema_reads_is_reported(tmp_path):
    """use: last merges the last checkpoints, but ema.save reads the older ones too: a NaN in
    one of those must be refused, not written into the saved EMA."""
    init, runs = make_setup(tmp_path, 2, [3, 2])
    bad = dict(runs[0][0])
    bad["model.norm.weight"] = bad["model.norm.weight"].clone()
    bad["model.norm.weight"][3] = float("nan")
    write_model(tmp_path / "run0" / "step-10", bad)
    cfg = config_for(tmp_path, 2, ema={"mu": 0.3, "save": "emas", "use": "last"},
                     output={"path": "out"})
    with pytest.raises(InputError, match=r"step-10.*model.norm.weight.*NaN"):
        warpmerge.run(cfg)
    assert not (tmp_path / "out").exists() and not (tmp_path / "emas").exists()


def test_float64_models_merge_to_float64(tmp_path):
    """Outputs default to the init's dtype; float64 needs result buffers twice as wide (an
    embedding of a whole chunk shows it)."""
    cfg64 = dict(TINY, vocab_size=2048)  # 2048 x 32: one 65,536-element chunk
    init = random_model(0, cfg64)
    write_model(tmp_path / "init", init, cfg64, dtype=torch.float64)
    runs = []
    for r in range(2):
        run = [perturb(init, seed=10 + r, scale=0.02)]
        write_model(tmp_path / f"run{r}" / "step-10", run[0], cfg64, dtype=torch.float64)
        runs.append([{k: v.double() for k, v in m.items()} for m in run])
    cfg = config_for(tmp_path, 2, output={"path": "out"})
    result = warpmerge.run(cfg, chunk=1 << 16)
    got = load_model(result.outputs[0])
    (expected,) = reference({k: v.double() for k, v in init.items()}, runs)
    for k, v in expected.items():
        assert got[k].dtype == torch.float64
        torch.testing.assert_close(got[k], v, rtol=2e-6, atol=2e-7)  # float32 arithmetic
