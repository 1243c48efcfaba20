"""The model card (README.md) of a merged model, rendered from its `warpmerge.json` provenance.

The front matter is built with `huggingface_hub`'s `ModelCardData`, so the Hub reads it as it
reads any card: `base_model` (the inputs that are Hub repos, the init first) with
`base_model_relation: merge` puts the merge in the Hub's model tree. The body says what was
merged and how, so the card alone is enough to understand (and redo) the merge.

Privacy: a local input is shown by its folder name only (never its path, which may name a user
or a machine), and anything shaped like a Hub token is masked.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .units import format_bytes

TAGS = ["merge", "warp", "warpmerge"]
WARP_PAPER = "https://arxiv.org/abs/2406.16768"


def render_card(provenance: dict, *, license: str | None = None) -> str:
    """The README.md text: YAML front matter (ModelCardData) and a Markdown body."""
    from huggingface_hub import ModelCardData

    from .hub import parse_repo_ref, scrub

    names = _Names(provenance.get("inputs") or [], parse_repo_ref)
    base_models = names.base_models()
    data = ModelCardData(
        base_model=base_models or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license or None,
        tags=list(TAGS),
        # The Hub's model tree reads the relation only together with base models.
        **({"base_model_relation": "merge"} if base_models else {}),
    )
    body = _body(provenance, names)
    return scrub(f"---\n{data.to_yaml()}\n---\n\n{body}")


class _Names:
    """How each input is shown: Hub repos as `org/name` (+ revision), local folders by name."""

    def __init__(self, inputs: list[dict], parse_repo_ref: Any) -> None:
        self.inputs = inputs
        self.hub_refs: set[str] = set()
        for item in inputs:
            if item.get("repo_id"):
                self.hub_refs.add(str(item.get("ref")))
                self.hub_refs.add(item["repo_id"])
                if item.get("revision"):
                    self.hub_refs.add(f"{item['repo_id']}@{item['revision']}")
        self._parse = parse_repo_ref

    def base_models(self) -> list[str]:
        ordered = sorted(self.inputs, key=lambda i: i.get("role") != "init")
        return list(dict.fromkeys(i["repo_id"] for i in ordered if i.get("repo_id")))

    def show(self, value: Any) -> Any:
        """A config value naming a model or folder: kept if a Hub ref, else its last part."""
        if not isinstance(value, str) or not value:
            return value
        if value in self.hub_refs:
            return value
        return Path(value).name or value

    def of_input(self, item: dict) -> str:
        if item.get("repo_id"):
            ref = item["repo_id"]
            if item.get("revision"):
                ref += f"@{item['revision']}"
            return ref
        return Path(str(item.get("ref") or "")).name or "(local)"


def _body(p: dict, names: _Names) -> str:
    config = p.get("config") or {}
    runs = p.get("runs") or []
    inputs = p.get("inputs") or []
    init = next((i for i in inputs if i.get("role") == "init"), None)
    init_name = names.of_input(init) if init else names.show(config.get("init", "?"))
    eta = p.get("eta")
    version = p.get("warpmerge_version", "?")
    out: list[str] = []

    if eta is None and p.get("ema_of_run"):
        out += [f"# EMA of {p['ema_of_run']}", "",
                f"The exponential moving average (stage 1 of WARP) of the checkpoints of RL "
                f"run `{p['ema_of_run']}`, fine-tuned from `{init_name}`, made with warpmerge "
                f"{version}.", ""]
    else:
        out += [f"# WARP merge of {init_name}", "",
                f"This model merges {len(runs)} RL fine-tuned polic"
                f"{'y' if len(runs) == 1 else 'ies'} of `{init_name}` with "
                f"[WARP]({WARP_PAPER}) (Weight Averaged Rewarded Policies), made with warpmerge "
                f"{version}" + (f" at η = {_num(eta)}." if eta is not None else "."), ""]

    out += ["## Merged models", "", "| role | run | model | commit | files |",
            "|---|---|---|---|---|"]
    for item in inputs:
        commit = item.get("commit")
        files = item.get("files") or []
        size = sum(int(f.get("size") or 0) for f in files)
        out.append(
            f"| {item.get('role', '')} | {item.get('run') or '–'} | `{names.of_input(item)}` | "
            f"{f'`{commit[:12]}`' if commit else '–'} | {len(files)} ({format_bytes(size)}) |"
        )
    out.append("")

    out += ["## Method", ""] + _method(p, config, runs) + [""]

    groups = p.get("groups") or []
    plots = p.get("plots") or {}
    if groups:
        out += ["## SLERP angles", ""] + _angles(groups, runs) + [""]
        if plots.get("angles"):
            out += [f"![cos Ω between the runs' task vectors and their norms, per layer]"
                    f"({plots['angles']})", ""]

    front = p.get("front")
    if isinstance(front, dict):
        out += ["## WARP front", ""] + _front(front) + [""]

    check = p.get("check")
    if check:
        out += ["## Check", ""] + _check(check, names) + [""]

    import yaml

    shown = _scrub_config(config, names)
    out += ["## Configuration", "",
            "The resolved warpmerge configuration (local paths shown as folder names):", "",
            "```yaml", yaml.safe_dump(shown, sort_keys=False, allow_unicode=True).rstrip(), "```",
            ""]
    if p.get("created"):
        out += [f"Created {p['created']}. `warpmerge.json` in this repo records every input "
                "with its revision and header hashes, and every group's SLERP angles and "
                "coefficients.", ""]
    return "\n".join(out)


def _method(p: dict, config: dict, runs: list[dict]) -> list[str]:
    ema = config.get("ema") or {}
    slerp = config.get("slerp") or {}
    liti = config.get("liti") or {}
    lines = [
        f"1. **EMA of each run** (stage 1): μ = {_num(ema.get('mu'))} per optimizer step, "
        f"{ema.get('every', 1)} optimizer step(s) between checkpoints, starting from "
        f"`{ema.get('start', 'init')}`; each run contributes its "
        + ("EMA." if ema.get("use", "ema") == "ema" else "last checkpoint.")
    ]
    if runs:
        lines += ["", "   | run | checkpoints | SLERP weight | EMA coefficients |",
                  "   |---|---|---|---|"]
        for r in runs:
            coefs = r.get("ema_coefficients") or []
            shown = ", ".join(_num(c) for c in coefs[:6]) + (", …" if len(coefs) > 6 else "")
            lines.append(f"   | {r.get('name')} | {r.get('checkpoints')} | "
                         f"{_num(r.get('weight'))} | {shown or '–'} |")
        lines.append("")
    lam = slerp.get("lambda")
    if len(runs) < 2:
        how = "a single run: its task vector is used as is"
    elif lam is not None:
        how = f"λ = {_num(lam)}"
    else:
        how = "weights " + ", ".join(f"{r.get('name')}: {_num(r.get('weight'))}" for r in runs)
    lines.append(f"2. **SLERP of the task vectors** (stage 2), per {slerp.get('granularity', '?')}"
                 f": {how}.")
    etas = liti.get("eta")
    etas = etas if isinstance(etas, list) else [etas]
    eta = p.get("eta")
    lines.append(
        "3. **LITI** (stage 3): θ = (1 − η)·θ_init + η·θ_slerp with η = "
        + (_num(eta) if eta is not None else ", ".join(_num(e) for e in etas))
        + (f" (this config made one model per η in {', '.join(_num(e) for e in etas)})"
           if len(etas) > 1 else "") + "."
    )
    return lines


def _angles(groups: list[dict], runs: list[dict]) -> list[str]:
    """Per chain step: the angle between task vectors, over groups (min / mean / max)."""
    steps: dict[int, list[float]] = {}
    modes: dict[str, int] = {}
    run_of: dict[int, str] = {}
    for g in groups:
        for k, step in enumerate(g.get("chain") or []):
            cos = step.get("cos_omega")
            if isinstance(cos, int | float) and math.isfinite(cos):
                steps.setdefault(k, []).append(math.degrees(math.acos(max(-1.0, min(1.0, cos)))))
            run_of[k] = str(step.get("run"))
            modes[str(step.get("mode"))] = modes.get(str(step.get("mode")), 0) + 1
    lines = [f"{len(groups)} group(s)."]
    if steps:
        lines += ["", "| chain step | run added | angle min | mean | max |",
                  "|---|---|---|---|---|"]
        for k, angles in sorted(steps.items()):
            lines.append(f"| {k + 1} | {run_of[k]} | {min(angles):.2f}° | "
                         f"{sum(angles) / len(angles):.2f}° | {max(angles):.2f}° |")
    if modes:
        lines += ["", "Interpolation per step: "
                  + ", ".join(f"{m} × {n}" for m, n in sorted(modes.items())) + "."]
    return lines


def _check(check: dict, names: _Names) -> list[str]:
    """The figures of `warpmerge check` (the report's to_dict), as a table of models."""
    model = check.get("model")
    if not isinstance(model, dict):
        return ["(no figures)"]
    tokens = check.get("check_tokens") or {}
    lines = [
        f"On {tokens.get('sequences', '?')} {tokens.get('source', '')} check sequences "
        f"({tokens.get('positions', '?')} positions), computed in {check.get('dtype', '?')}. "
        "KL is per position, in nats, from the other model to this one.",
        "",
        "| model | NLL | KL | reverse KL | top-1 agreement |",
        "|---|---|---|---|---|",
        f"| this merge | {_cell(model.get('nll'))} | – | – | – |",
    ]
    for other in check.get("against") or []:
        if isinstance(other, dict):
            lines.append(
                f"| `{_model_name(str(other.get('path', '?')), names)}` | "
                f"{_cell(other.get('nll'))} | {_cell(other.get('kl'))} | "
                f"{_cell(other.get('kl_reverse'))} | {_cell(other.get('top1_agreement'))} |")
    return lines


def _front(front: dict) -> list[str]:
    """This model's point on the KL–reward plane, and the plot of every point (front.png)."""
    lines = []
    if front.get("plot"):
        lines += [f"![KL from the init against reward, one point per model]({front['plot']})", ""]
    row = front.get("model")
    if isinstance(row, dict):
        kl = row.get("kl") or {}
        reward = row.get("reward") or {}
        lines += [
            "KL(π‖π_init) in nats per sequence, estimated on this model's own samples, and the "
            f"mean reward ({_cell(front.get('reward'))}), each ± one standard error.",
            "", "| model | η | KL | KL per token | reward |", "|---|---|---|---|---|",
            f"| {_cell(row.get('name'))} | {_cell(row.get('eta'))} | "
            f"{_pm(kl.get('mean'), kl.get('stderr'))} | {_cell(kl.get('per_token'))} | "
            f"{_pm(reward.get('mean'), reward.get('stderr'))} |",
        ]
    return lines


def _pm(mean: Any, stderr: Any) -> str:
    if mean is None:
        return "–"
    return _cell(mean) + (f" ± {_num(stderr)}" if stderr is not None else "")


def _model_name(name: str, names: _Names) -> str:
    return names.show(name) if ("/" in name or "\\" in name) else name


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _num(value)
    return str(value).replace("|", "\\|")


def _scrub_config(config: dict, names: _Names) -> dict:
    """The config with every local path reduced to its folder name."""
    shown = dict(config)
    if "init" in shown:
        shown["init"] = names.show(shown["init"])
    policies = []
    for policy in shown.get("policies") or []:
        policy = dict(policy)
        ckpts = policy.get("checkpoints")
        policy["checkpoints"] = ([names.show(c) for c in ckpts] if isinstance(ckpts, list)
                                 else names.show(ckpts))
        policies.append(policy)
    if "policies" in shown:
        shown["policies"] = policies
    if isinstance(shown.get("ema"), dict) and shown["ema"].get("save"):
        shown["ema"] = dict(shown["ema"], save=names.show(shown["ema"]["save"]))
    if isinstance(shown.get("output"), dict) and shown["output"].get("path"):
        shown["output"] = dict(shown["output"], path=names.show(shown["output"]["path"]))
    return shown


def _num(x: Any) -> str:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    return f"{x:.6g}"
