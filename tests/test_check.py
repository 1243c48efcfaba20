"""`warpmerge check`: the numbers it reports, its JSON, its table and its input errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_tokenizer
from safetensors.torch import load_file, save_file

from warpmerge.check import (
    CHECK_LENGTH,
    CHECK_SEQUENCES,
    builtin_sequences,
    check_models,
    format_report,
    read_prompts,
)
from warpmerge.errors import ConfigError, InputError
from warpmerge.gemma2 import Gemma2, decode, encode_instruction, load_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "gemma2-tiny"


def perturbed_copy(folder: Path, scale: float = 0.05, seed: int = 0) -> Path:
    """The fixture with noise on a few tensors: a stand-in for a merged/fine-tuned model."""
    folder.mkdir(parents=True)
    shutil.copy(FIXTURE / "config.json", folder / "config.json")
    tensors = load_file(FIXTURE / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.2.self_attn.q_proj.weight"):
        t = tensors[name]
        tensors[name] = t + scale * t.std() * torch.randn(t.shape, generator=gen)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_builtin_sequences_are_fixed() -> None:
    seqs = builtin_sequences(320)
    assert len(seqs) == CHECK_SEQUENCES and all(len(s) == CHECK_LENGTH for s in seqs)
    assert all(s[0] == 2 and 4 <= min(s[1:]) and max(s) < 320 for s in seqs)
    assert seqs == builtin_sequences(320)
    assert seqs[0][:4] == [2, 191, 281, 84]  # any change would make old reports incomparable


@pytest.mark.slow
def test_model_against_itself() -> None:
    report = check_models(FIXTURE, [FIXTURE])
    (same,) = report.against
    assert same.kl == 0.0 and same.kl_reverse == 0.0 and same.top1_agreement == 1.0
    assert same.nll == report.model.nll > 0
    assert report.num_positions == CHECK_SEQUENCES * CHECK_LENGTH
    assert report.num_targets == CHECK_SEQUENCES * (CHECK_LENGTH - 1)


@pytest.mark.slow
def test_kl_against_perturbed_copy_matches_independent_computation(tmp_path: Path) -> None:
    """Recompute every number with transformers' Gemma 2 and plain formulas."""
    transformers = pytest.importorskip("transformers")
    merged = perturbed_copy(tmp_path / "merged")
    report = check_models(merged, [FIXTURE])
    (init,) = report.against
    assert init.kl > 1e-4 and init.kl_reverse > 1e-4 and init.top1_agreement < 1.0

    ids = torch.tensor(builtin_sequences(320))

    def log_probs(folder: Path) -> torch.Tensor:
        model = transformers.Gemma2ForCausalLM.from_pretrained(folder, attn_implementation="eager")
        with torch.no_grad():
            return torch.log_softmax(model(ids, use_cache=False).logits.double(), dim=-1)

    lp_m, lp_a = log_probs(merged), log_probs(FIXTURE)
    kl = (lp_a.exp() * (lp_a - lp_m)).sum(-1).mean()  # KL(against || model)
    kl_reverse = (lp_m.exp() * (lp_m - lp_a)).sum(-1).mean()
    agreement = (lp_a.argmax(-1) == lp_m.argmax(-1)).double().mean()

    def nll(lp: torch.Tensor) -> float:
        return float(-lp[:, :-1].gather(-1, ids[:, 1:, None]).mean())

    assert init.kl == pytest.approx(float(kl), rel=1e-4)
    assert init.kl_reverse == pytest.approx(float(kl_reverse), rel=1e-4)
    assert init.top1_agreement == pytest.approx(float(agreement), abs=1e-12)
    assert report.model.nll == pytest.approx(nll(lp_m), rel=1e-6)
    assert init.nll == pytest.approx(nll(lp_a), rel=1e-6)


@pytest.mark.slow
def test_bfloat16_check_runs(tmp_path: Path) -> None:
    merged = perturbed_copy(tmp_path / "merged")
    fp32 = check_models(merged, [FIXTURE])
    bf16 = check_models(merged, [FIXTURE], dtype=torch.bfloat16)
    assert bf16.dtype == "bfloat16"
    assert bf16.against[0].kl == pytest.approx(fp32.against[0].kl, rel=0.2)


@pytest.mark.slow
def test_json_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     capsys: pytest.CaptureFixture[str]) -> None:
    merged = perturbed_copy(tmp_path / "merged")
    code, out, _ = run_cli(["check", str(merged), "--against", str(FIXTURE), "--json", "-q"],
                           monkeypatch, capsys)
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"dtype", "check_tokens", "prompts", "max_new_tokens", "model", "against"}
    assert data["dtype"] == "float32" and data["prompts"] is None
    assert data["check_tokens"]["source"] == "builtin"
    assert data["check_tokens"]["positions"] == CHECK_SEQUENCES * CHECK_LENGTH
    assert data["model"]["path"] == str(merged) and data["model"]["kl"] is None
    (init,) = data["against"]
    assert set(init) == {"path", "nll", "kl", "kl_reverse", "top1_agreement", "continuations"}
    assert init["kl"] > 0 and 0 <= init["top1_agreement"] <= 1


@pytest.mark.slow
def test_table_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    merged = perturbed_copy(tmp_path / "merged")
    code, out, err = run_cli(["check", str(merged), "--against", str(FIXTURE), "--dtype", "bf16",
                              "--device", "cpu"], monkeypatch, capsys)
    assert code == 0 and "loading" in err  # progress goes to stderr, the table to stdout
    assert "bfloat16" in out and "KL(a‖m)" in out and "top-1" in out
    assert str(FIXTURE) in out


@pytest.mark.slow
def test_prompts_give_continuations(tmp_path: Path) -> None:
    model = perturbed_copy(tmp_path / "merged")
    write_tokenizer(model)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("w1 w2 w3\n\nw4 w5\n")
    prompts = read_prompts(prompts_file)
    assert prompts == ["w1 w2 w3", "w4 w5"]
    report = check_models(model, [FIXTURE], prompts=prompts, max_new_tokens=5)
    assert report.source == "prompts" and report.num_sequences == 2
    tok = load_tokenizer(model)
    assert tok is not None
    for folder, result in ((model, report.model), (FIXTURE, report.against[0])):
        assert result.continuations is not None and len(result.continuations) == 2
        gemma = Gemma2.from_pretrained(folder)
        expected = gemma.generate(torch.tensor(encode_instruction(tok, prompts[0])), 5)
        assert result.continuations[0] == decode(tok, expected).strip()
    text = format_report(report, width=100)
    assert "[1] w1 w2 w3" in text and "[2] w4 w5" in text and " │ " in text
    assert report.to_dict()["prompts"] == prompts
    narrow = format_report(report, width=40)  # columns too narrow: stacked instead
    assert " │ " not in narrow


def test_input_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    def cli(*args: str) -> tuple[int, str]:
        code, out, err = run_cli(["check", *args], monkeypatch, capsys)
        assert out == ""
        return code, err

    code, err = cli(str(tmp_path / "nope"))
    assert code == 2 and "nope: model folder does not exist" in err
    with pytest.raises(InputError, match="missing: model folder does not exist"):
        check_models(FIXTURE, [tmp_path / "missing"])
    code, err = cli(str(FIXTURE), "--dtype", "float16")
    assert code == 2 and err.startswith("error: --dtype: dtype must be float32 or bfloat16")
    with pytest.raises(ConfigError, match="^dtype must be"):  # the library names no flag
        check_models(FIXTURE, [], dtype=torch.float16)
    code, err = cli(str(FIXTURE), "--device", "tpu")
    assert code == 2 and "--device: device must be cpu, cuda, cuda:N or mps" in err
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InputError, match="not a Gemma 2 config"):
        check_models(llama, [])
    with pytest.raises(InputError, match="tokenizer.json"):
        check_models(FIXTURE, [], prompts=["hello"])
    code, err = cli(str(FIXTURE), "--prompts", str(tmp_path / "p.txt"))
    assert code == 2 and "prompts file does not exist" in err
    bigger = tmp_path / "bigger"
    bigger.mkdir()
    raw = json.loads((FIXTURE / "config.json").read_text())
    (bigger / "config.json").write_text(json.dumps({**raw, "vocab_size": 640}))
    with pytest.raises(InputError, match="vocab_size"):
        check_models(FIXTURE, [bigger])
