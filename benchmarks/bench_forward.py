"""Speed of warpmerge's bundled Gemma 2 against transformers' eager Gemma2ForCausalLM on CPU.

Why: `warpmerge check` runs a Gemma 2 forward pass on the user's machine, so ours must be no
slower than the reference implementation people would otherwise use.

A random Gemma-2-shaped model (a few hundred million parameters) is saved to a temporary
folder and loaded by both implementations in the same dtype, with the same thread count. The two
are timed alternately (so drift in machine load hits both), and the medians are compared.
Ours runs with its default compute dtype unless --compute-dtype says otherwise: on a CPU,
bfloat16 weights are computed in float32 (transformers computes them in bfloat16).

- prefill: logits for every position of one prompt of --prompt tokens;
- generate: --new greedy tokens after a short prompt, with a KV cache (ours: `Gemma2.generate`;
  transformers: `generate(do_sample=False, use_cache=True)`), stop tokens disabled on both sides.
- generate floor: what any implementation must do per generated token of one sequence, done
  --new times: one product of a single row with every weight matrix as stored (the layers'
  projections and the tied head), nothing else. A decoding step reads every weight once, so
  this bounds generation from below on the machine, whatever the code around it.

    python benchmarks/bench_forward.py --dtype float32 --threads 2 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from warpmerge.gemma2 import Gemma2
from warpmerge.gemma2.model import Linear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_checkpoint(folder: Path, args: argparse.Namespace) -> int:
    """Save a random Gemma 2 with transformers; returns its parameter count."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        query_pre_attn_scalar=144,
        sliding_window=args.window,
        max_position_embeddings=8192,
        eos_token_id=None,
    )
    model = transformers.Gemma2ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_dtype(folder: Path, dtype: torch.dtype, args: argparse.Namespace) -> dict[str, float]:
    import transformers

    compute = DTYPES.get(args.compute_dtype)
    ours = Gemma2.from_pretrained(folder, dtype=dtype, device=args.device, compute_dtype=compute)
    hf = transformers.Gemma2ForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation="eager"
    ).to(args.device).eval()
    hf.generation_config.eos_token_id = None
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(4, args.vocab, (1, args.prompt), generator=gen)
    prompt[0, 0] = 2
    prompt = prompt.to(args.device)
    short = prompt[:, : args.gen_prompt]

    def ours_prefill() -> None:
        ours(prompt)

    def hf_prefill() -> None:
        hf(prompt, use_cache=False)

    def ours_generate() -> None:
        out = ours.generate(short, args.new, stop_ids=())
        assert out.shape[1] == args.new

    def hf_generate() -> None:
        out = hf.generate(short, max_new_tokens=args.new, do_sample=False, use_cache=True)
        assert out.shape[1] == args.gen_prompt + args.new

    weights = [m.weight for m in ours.modules() if isinstance(m, Linear)]
    head = ours.lm_head.weight if ours.lm_head is not None else ours.model.embed_tokens.weight
    rows = [(torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device), w)
            for w in [*weights, head]]

    def floor_generate() -> None:
        for _ in range(args.new):
            for x, w in rows:
                F.linear(x, w)

    with torch.inference_mode():
        floor_generate()  # warm-up
        floor_t = []
        # Greedy tokens agree (a cheap sanity check that both run the same model).
        same = torch.equal(
            ours.generate(short, 8, stop_ids=())[0],
            hf.generate(short, max_new_tokens=8, do_sample=False)[0, args.gen_prompt :],
        )
        results: dict[str, float] = {}
        for task, ours_fn, hf_fn in (
            ("prefill", ours_prefill, hf_prefill),
            ("generate", ours_generate, hf_generate),
        ):
            ours_fn(), hf_fn()  # warm-up
            ours_t: list[float] = []
            hf_t: list[float] = []
            for rep in range(args.reps):
                # alternate which goes first, so neither always runs on a warmer cache
                pair = ((ours_t, ours_fn), (hf_t, hf_fn))
                for times, fn in pair if rep % 2 == 0 else pair[::-1]:
                    times.append(timed(fn))
                if task == "generate":
                    floor_t.append(timed(floor_generate))
            results[f"{task}_ours"] = statistics.median(ours_t)
            results[f"{task}_hf"] = statistics.median(hf_t)
        results["generate_floor"] = statistics.median(floor_t)
    results["greedy_tokens_agree"] = float(same)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=[*DTYPES, "both"], default="both")
    parser.add_argument("--compute-dtype", choices=["auto", *DTYPES], default="auto",
                        help="ours only; auto: float32 on a CPU, else the weights' dtype")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps, ... (both sides)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=512, help="prefill length")
    parser.add_argument("--gen-prompt", type=int, default=16, help="prompt length for generate")
    parser.add_argument("--new", type=int, default=64, help="tokens to generate")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=4096)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dtypes = list(DTYPES) if args.dtype == "both" else [args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gemma2-bench"
        n_params = build_checkpoint(folder, args)
        print(
            f"Gemma 2 shape: {n_params / 1e6:.0f}M params, vocab {args.vocab}, hidden "
            f"{args.hidden}, {args.layers} layers, heads {args.heads}/{args.kv_heads}x"
            f"{args.head_dim}, ffn {args.intermediate}; threads {args.threads}, "
            f"torch {torch.__version__}, device {args.device}, ours computing in "
            f"{args.compute_dtype}, median of {args.reps}"
        )
        print(f"{'dtype':9} {'task':28} {'ours s':>8} {'hf s':>8} {'hf/ours':>8}")
        for name in dtypes:
            r = bench_dtype(folder, DTYPES[name], args)
            for task, label in (
                ("prefill", f"prefill {args.prompt} tokens"),
                ("generate", f"generate {args.new} (prompt {args.gen_prompt})"),
            ):
                ours_s, hf_s = r[f"{task}_ours"], r[f"{task}_hf"]
                print(f"{name:9} {label:28} {ours_s:8.3f} {hf_s:8.3f} {hf_s / ours_s:8.2f}")
            floor = r["generate_floor"]
            print(f"{name:9} {'generate floor (weights only)':28} {floor:8.3f} {'':8} "
                  f"{'':8}   ours/floor {r['generate_ours'] / floor:.2f}, "
                  f"hf/floor {r['generate_hf'] / floor:.2f}")
            if not r["greedy_tokens_agree"]:
                print(f"{name:9} note: greedy tokens differ (ours computes in another dtype?)")


if __name__ == "__main__":
    main()
