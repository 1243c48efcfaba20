"""`warpmerge demo`: a synthetic WARP setup built on the fly, merged, checked and explained.

A random Gemma 2 init and two RL runs of three checkpoints each. Each run drifts from the init
along its own random direction (so the task vectors are nearly orthogonal, as the WARP paper
observes of real runs), with a share of common direction so that the angle is not exactly 90°.
A third run is saved as PEFT LoRA adapters at uneven steps, as TRL's trainers leave a LoRA run:
its deltas are low-rank versions of the same kind of drift, so it lands near the others.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

DEMO_CONFIG = {
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "query_pre_attn_scalar": 32,
    "sliding_window": 16,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 256,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


def gemma2_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Gemma 2 checkpoint (lm_head tied, absent)."""
    from .gemma2 import Gemma2Config, checkpoint_shapes

    return checkpoint_shapes(Gemma2Config.from_dict(cfg))


def save_model(folder: Path, tensors: dict[str, torch.Tensor], cfg: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def build_setup(root: Path, runs: int = 2, checkpoints: int = 3, seed: int = 0,
                dtype: torch.dtype = torch.bfloat16, cfg: dict | None = None,
                front: bool = False) -> Path:
    """Write init + runs under `root` and a warp.yaml merging them; returns the config path.

    With `front`, the setup also has a tokenizer, prompts and a reward the runs were
    (synthetically) trained for, a LoRA run (`LORA_RUN`, adapters at `LORA_STEPS`), and the
    config a `front:` section, more η values, `every: auto` and `ema.save` (so that every run,
    the LoRA one included, is on the front as its EMA).
    """
    cfg = dict(cfg or DEMO_CONFIG)
    g = torch.Generator().manual_seed(seed)
    init = {}
    for name, shape in gemma2_shapes(cfg).items():
        scale = 0.1 if len(shape) == 1 else shape[-1] ** -0.5
        init[name] = torch.randn(shape, generator=g) * scale
    save_model(root / "init", {k: v.to(dtype) for k, v in init.items()}, cfg)
    common = {k: torch.randn(v.shape, generator=g) for k, v in init.items()}
    towards_reward = _reward_direction(root, cfg) if front else {}
    for r in range(runs):
        current = dict(init)
        for t in range(checkpoints):
            current = {
                k: v + 0.02 * v.abs().mean() * (torch.randn(v.shape, generator=g) + 0.3 * common[k])
                + towards_reward.get(k, 0.0)
                for k, v in current.items()
            }
            step = (t + 1) * 100
            save_model(root / f"run-{'abc'[r]}" / f"step-{step}",
                       {k: v.to(dtype) for k, v in current.items()}, cfg)
    if front:
        drift = {k: 0.02 * v.abs().mean() * (checkpoints ** 0.5 * torch.randn(v.shape, generator=g)
                                             + checkpoints * 0.3 * common[k])
                 + checkpoints * towards_reward.get(k, 0.0)
                 for k, v in init.items()}
        save_lora_run(root / LORA_RUN, "init", init, drift, dtype)
    lora_run = f"  - name: {LORA_RUN}\n    checkpoints: {LORA_RUN}/checkpoint-*\n"
    yaml_text = (
        "init: init\n"
        "policies:\n"
        + "".join(f"  - name: run-{'abc'[r]}\n    checkpoints: run-{'abc'[r]}/step-*\n"
                  for r in range(runs))
        + (lora_run if front else "")
        + ("ema:\n  mu: 0.01\n  every: auto\n  save: emas\n" if front
           else "ema:\n  mu: 0.01\n  every: 100\n")
        + "slerp:\n  granularity: layer\n"
        + ("liti:\n  eta: [0.1, 0.3, 0.6, 1.0]\n" if front else "liti:\n  eta: [0.3, 1.0]\n")
        + "output:\n  path: merged\n  shard_size: 1MB\n"
        + ("front:\n  prompts: prompts.jsonl\n  reward: warpmerge.demo:keyword_reward\n"
           "  samples: 4\n  max_new_tokens: 16\n" if front else "")
    )
    path = root / "warp.yaml"
    path.write_text(yaml_text)
    return path


LORA_RUN = "run-lora"
LORA_STEPS = (125, 250, 300)  # save_steps=125, max_steps=300: the Trainer also saves at the end
LORA_RANK, LORA_ALPHA = 8, 16
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "embed_tokens"]


def save_lora_run(run: Path, base: str, init: dict[str, torch.Tensor],
                  drift: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """A LoRA run as TRL's trainers save it: `checkpoint-<step>/` with `adapter_config.json`,
    `adapter_model.safetensors` and `trainer_state.json`.

    Each adapted module ends (at the last step) at the rank-r part of its `drift`, the change
    the full runs make, and gets there in proportion to the step. The embedding is adapted too
    (the reward's direction lives there), so PEFT also saves its base weight. `base` is the
    adapters' base_model_name_or_path: the init as the config names it.
    """
    scale = LORA_ALPHA / LORA_RANK
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (A, B) at the end
    for name, delta in drift.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in LORA_TARGETS or delta.dim() != 2:
            continue
        embedding = module.endswith("embed_tokens")
        u, s, vh = torch.linalg.svd(delta.T if embedding else delta, full_matrices=False)
        root_s = s[:LORA_RANK].sqrt()
        factors[module] = ((root_s[:, None] * vh[:LORA_RANK]).contiguous(),
                           (u[:, :LORA_RANK] * root_s / scale).contiguous())
    for step in LORA_STEPS:
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        share = step / LORA_STEPS[-1]
        tensors = {}
        for module, (a, b) in factors.items():
            key = f"base_model.model.{module}"
            if module.endswith("embed_tokens"):
                tensors[f"{key}.lora_embedding_A"] = a
                tensors[f"{key}.lora_embedding_B"] = b * share
                tensors[f"{key}.base_layer.weight"] = init[module + ".weight"].to(dtype)
            else:
                tensors[f"{key}.lora_A.weight"] = a
                tensors[f"{key}.lora_B.weight"] = b * share
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(
            json.dumps(_adapter_config(base), indent=2, sort_keys=True) + "\n")
        (folder / "trainer_state.json").write_text(
            json.dumps({"global_step": step, "max_steps": LORA_STEPS[-1], "log_history": []},
                       indent=2) + "\n")


def _adapter_config(base: str) -> dict:
    """What PEFT 0.21 writes for `LoraConfig(r, lora_alpha, target_modules, task_type=...)`."""
    return {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
        "auto_mapping": None, "base_model_name_or_path": base, "bias": "none",
        "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
        "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": LORA_ALPHA, "lora_bias": False, "lora_dropout": 0.05,
        "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA",
        "peft_version": "0.21.2", "qalora_group_size": 16, "r": LORA_RANK, "rank_pattern": {},
        "revision": None, "target_modules": LORA_TARGETS, "target_parameters": None,
        "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None,
        "use_dora": False, "use_qalora": False, "use_rslora": False, "velora_config": None,
    }


REWARDED = [f"w{i}" for i in range(0, 40, 4)]  # the words the demo's runs learn to say
DEMO_PROMPTS = 8


def keyword_reward(prompts: list, completions: list[str], keywords: list[list[str]],
                   **kwargs: object) -> list[float]:
    """The demo's reward, in TRL's form: the share of completion words among the record's
    `keywords`."""
    out = []
    for completion, words in zip(completions, keywords, strict=True):
        said = completion.split()
        out.append(sum(w in words for w in said) / len(said) if said else 0.0)
    return out


def _reward_direction(root: Path, cfg: dict) -> dict[str, torch.Tensor]:
    """A step per checkpoint that raises the logits of the rewarded words.

    The logit of token t is h·E[t] (tied head): moving E[t] along the mean final hidden state
    h̄ of the init raises it on average. h̄ is read from the init on random sequences. Also
    writes the tokenizer and the prompts file the front needs.
    """
    import json as _json

    from .gemma2 import Gemma2

    vocab = cfg["vocab_size"]
    write_word_tokenizer(root / "init", vocab)
    model = Gemma2.from_pretrained(root / "init")
    seen: list[torch.Tensor] = []
    hook = model.model.norm.register_forward_hook(lambda m, i, out: seen.append(out))
    ids = torch.randint(4, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model(ids)
    hook.remove()
    direction = seen[0].float().mean(dim=(0, 1))
    direction = direction / direction.norm()
    embed = torch.zeros(vocab, cfg["hidden_size"])
    rewarded = [int(w[1:]) + 4 for w in REWARDED]  # "w<i>" has id i + 4 (see the tokenizer)
    embed[rewarded] = 1.0 * direction
    g = torch.Generator().manual_seed(2)
    with (root / "prompts.jsonl").open("w") as f:
        for _ in range(DEMO_PROMPTS):
            words = [f"w{int(i)}" for i in torch.randint(0, 300, (6,), generator=g)]
            f.write(_json.dumps({"prompt": " ".join(words), "keywords": REWARDED}) + "\n")
    return {"model.embed_tokens.weight": embed}


def write_word_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer: Gemma's special tokens at their ids, "w<i>" at id i + 4 else."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    specials = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 106: "<start_of_turn>",
                107: "<end_of_turn>"}
    vocab = {specials.get(i, f"w{i - 4}"): i for i in range(vocab_size)}
    vocab.update({"user": 4 + 900, "model": 4 + 901} if vocab_size > 905 else {})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials.values()])
    tok.save(str(folder / "tokenizer.json"))


def run_demo(out: Path | None = None, quiet: bool = False) -> Path:
    """Build, merge, check; print a short account. Returns the folder holding it all."""
    from .api import run

    root = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="warpmerge-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    # The demo's model is tiny: its matrix products are too small to split across threads,
    # and on a busy machine the threads' hand-offs cost far more than the work (7 min against
    # 1 min for the whole demo on 2 cores shared with other jobs).
    torch.set_num_threads(1)
    config_path = build_setup(root, front=True)
    steps = ", ".join(map(str, LORA_STEPS))
    print(f"Demo setup in {root}: a random Gemma 2 init; runs run-a and run-b of 3 full "
          f"checkpoints (steps 100, 200, 300); run {LORA_RUN} of 3 PEFT LoRA adapter "
          f"checkpoints (r={LORA_RANK}, steps {steps}).")
    front_lines: list[str] = []
    result = run(config_path, force=True, quiet=quiet, echo=front_lines.append)
    print(f"Merged in {result.seconds:.2f} s (EMA mu=0.01 over each checkpoint's real step, "
          f"the adapters read directly; layer SLERP of 3 runs; eta 0.1, 0.3, 0.6 and 1.0):")
    for line in _ema_lines(result.provenance):
        print(line)
    for g in result.groups[:3] + result.groups[-1:]:
        cos = g.chain[0].cos_omega if g.chain else None
        cos_text = f"{cos:+.3f}" if cos is not None else "  n/a"
        coefs = ", ".join(f"{c:.3f}" for c in g.coefficients)
        print(f"  {g.name:<28} cos(Omega) {cos_text}  coefficients [{coefs}]")
    if len(result.groups) > 4:
        print(f"  ... {len(result.groups)} groups in all")
    for path in result.outputs + result.ema_outputs:
        print(f"  wrote {path}")
    _demo_check(root, result.outputs[1::2], quiet)
    print("\n" + "\n".join(line for line in front_lines if not line.startswith("loading")))
    print(f"\nThe front: {root / 'merged' / 'front.png'} (and front.json: every sample); "
          f"per-layer angles: {result.outputs[0] / 'angles.png'}")
    return root


def _ema_lines(provenance: dict) -> list[str]:
    """Each run's steps and EMA weights, as warpmerge.json records them."""
    return [f"  EMA of {r['name']:<9} steps {', '.join(map(str, r['steps']))}: weights "
            + ", ".join(f"{a:.3f}" for a in r["ema_coefficients"])
            for r in provenance["runs"]]


def _demo_check(root: Path, outputs: list[Path], quiet: bool) -> None:
    """The check report of each output against the init and each run's last checkpoint."""
    try:
        from .check import check_models, format_report
    except ImportError:
        return
    against = [root / "init", root / "run-a" / "step-300", root / "run-b" / "step-300"]
    for path in outputs:
        report = check_models(path, against)
        print(f"\nCheck of {path.name}:")
        print(format_report(report))
