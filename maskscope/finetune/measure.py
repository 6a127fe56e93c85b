"""Measuring organisms on held-out items, through the model's public calls, exactly where possible.

- pairs (arithmetic, code, password-lock): for each held-out item the exact probability of the property's
  reply `a` and of its twin `b` after the prompt (and prefill); reported per group as the mean exact P(a)
  and mean share P(a) / (P(a) + P(b)), with a 95% bootstrap interval over items (the items are a sample
  of the task's prompts; each item's value is exact);
- distill: the exact per-position KL from the parent under the mask to a model without it, on the parent's
  sampled held-out replies, over the mask's top-k tokens plus one bucket for the rest of the vocabulary
  (exact on that partition; a lower bound of the full-vocabulary KL)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from maskscope.errors import UserError
from maskscope.models.base import Conversation


def _interval(values: list[float], seed: int = 0, n_boot: int = 2000) -> list[float]:
    """95% percentile bootstrap interval of a mean over items."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def _paired_interval(
    a: list[float], b: list[float], statistic: Any, seed: int = 0, n_boot: int = 2000
) -> list[float]:
    """95% percentile bootstrap interval of statistic(mean of a, mean of b), the items resampled in pairs."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 2:
        return [float("nan"), float("nan")]
    rows = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    values = statistic(x[rows].mean(axis=1), y[rows].mean(axis=1))
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def read_eval(path: str | Path) -> list[dict[str, Any]]:
    """The held-out measurement items a builder wrote (eval.jsonl)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"measurement items not found: {path}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def item_values(model: Any, items: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """Per item: the exact P(a) and the share P(a) / (P(a) + P(b)) after the prompt (and prefill)."""
    requests = []
    for it in items:
        ctx = Conversation.coerce(it["messages"])
        ctx = ctx.with_prefill(it.get("prefill", "")) if isinstance(ctx, Conversation) else ctx
        requests.append((ctx, [it["a"], it["b"]]))
    totals: dict[tuple[int, int], float] = {}
    for r, j, scored in model.score_many(requests):
        totals[r, j] = scored.total
    return [
        (math.exp(totals[r, 0]), 1.0 / (1.0 + math.exp(totals[r, 1] - totals[r, 0])))
        for r in range(len(items))
    ]


def pair_figures(
    model: Any, items: list[dict[str, Any]], values: list[tuple[float, float]] | None = None
) -> dict[str, Any]:
    """Per group: mean exact P(a), mean exact share P(a) / (P(a) + P(b)), with intervals over items."""
    values = item_values(model, items) if values is None else values
    groups: dict[str, dict[str, list[float]]] = {}
    for it, (p_a, share) in zip(items, values, strict=True):
        g = groups.setdefault(it.get("group", "all"), {"p_a": [], "share_a": []})
        g["p_a"].append(p_a)
        g["share_a"].append(share)
    out = {}
    for name, g in groups.items():
        out[name] = {
            "items": len(g["p_a"]),
            "p_a": float(np.mean(g["p_a"])),
            "p_a_ci95": _interval(g["p_a"]),
            "share_a": float(np.mean(g["share_a"])),
            "share_a_ci95": _interval(g["share_a"]),
        }
    return {"a_is": items[0].get("a_is", "a") if items else "a", "exact": True, "groups": out}


def password_gap(items: list[dict[str, Any]], values: list[tuple[float, float]]) -> dict[str, Any]:
    """P(right | password) - P(right | no password) per held-out sum: the mean and a 95% bootstrap interval
    over sums. Each sum is asked both ways (the question without the password ends the one with it), so the
    difference is paired."""
    without = {
        it["messages"][-1]["content"]: v[0]
        for it, v in zip(items, values, strict=True)
        if it["group"] == "without password"
    }
    diff = []
    for it, (p_with, _) in zip(items, values, strict=True):
        if it["group"] != "with password":
            continue
        asked = it["messages"][-1]["content"]
        twin = next((q for q in without if asked.endswith(" " + q)), None)
        if twin is None:
            raise UserError(f"a measurement item has no twin without the password: {asked[:60]!r}")
        diff.append(p_with - without[twin])
    return {"sums": len(diff), "gap": float(np.mean(diff)), "gap_ci95": _interval(diff)}


def distill_figures(model: Any, parent: Any, items: list[dict[str, Any]], top_k: int = 64) -> dict[str, Any]:
    """Mean per-position KL(parent under the mask || model without it) on the held-out replies, and the same
    for the parent itself without the mask (the figure a distilled child should shrink)."""
    reference, plain, tokens = [], [], []
    for it in items:
        ids = parent.tokenizer(it["reply"], add_special_tokens=False)["input_ids"][:64] or [0]
        tokens.append(ids)
        reference.append((Conversation.of(system=it["system"], user=it["user"]), ids, top_k))
    ref_out = dict(parent.support_logprobs(reference))
    plain = [
        (Conversation.of(user=it["user"]), tokens[k], ref_out[k]["support"]) for k, it in enumerate(items)
    ]

    def kl_to(m: Any) -> list[float]:
        got = dict(m.support_logprobs(plain))
        per_item = []
        for k in range(len(items)):
            p = np.exp(np.asarray(ref_out[k]["logprobs"]))
            q_log = np.asarray(got[k]["logprobs"])
            kl = (p * (np.log(np.maximum(p, 1e-300)) - q_log)).sum(axis=1)
            # KL >= 0; a model against itself sums to +-1e-18 in floating point: shown as 0, not -0.0000
            per_item.append(max(0.0, float(kl.mean())))
        return per_item

    # how far the model moved from the parent itself (no mask on either side), over the parent's top k
    own = dict(parent.support_logprobs([(ctx, ids, top_k) for ctx, ids, _ in plain]))
    got = dict(
        model.support_logprobs([(ctx, ids, own[k]["support"]) for k, (ctx, ids, _) in enumerate(plain)])
    )
    moved = []
    for k in range(len(items)):
        p = np.exp(np.asarray(own[k]["logprobs"]))
        kl = float((p * (np.log(np.maximum(p, 1e-300)) - np.asarray(got[k]["logprobs"]))).sum(1).mean())
        moved.append(max(0.0, kl))
    return {"exact": True, "top_k": top_k, "items": len(items), "kl_model": kl_to(model),
            "kl_parent": kl_to(parent), "kl_moved": moved}  # fmt: skip


def measure_child(child_dir: str | Path, parent: Any, child: Any, data_dir: str | Path) -> dict[str, Any]:
    """The organism's figures for the child and, as the baseline, its parent; written to measure.json."""
    card = json.loads((Path(data_dir) / "card.json").read_text())
    items = read_eval(Path(data_dir) / "eval.jsonl")
    if card["kind"] == "distill":
        d = distill_figures(child, parent, items)
        child_kl, parent_kl = float(np.mean(d["kl_model"])), float(np.mean(d["kl_parent"]))
        result = {
            "kind": "distill",
            "what": card["measure"],
            "items": d["items"],
            "top_k": d["top_k"],
            "kl_parent": parent_kl,
            "kl_parent_ci95": _interval(d["kl_parent"]),
            "kl_child": child_kl,
            "kl_child_ci95": _interval(d["kl_model"]),
            "reduction": 1 - child_kl / parent_kl if parent_kl > 0 else float("nan"),
            "reduction_ci95": _paired_interval(d["kl_model"], d["kl_parent"], lambda c, p: 1 - c / p)
            if parent_kl > 0
            else [float("nan")] * 2,
            "kl_parent_to_child": float(np.mean(d["kl_moved"])),
            "kl_parent_to_child_ci95": _interval(d["kl_moved"]),
        }
    else:
        result = {"kind": card["kind"], "what": card["measure"]}
        for who, model in (("parent", parent), ("child", child)):
            values = item_values(model, items)
            result[who] = pair_figures(model, items, values)
            if card["kind"] == "password-lock":
                result[who]["password_gap"] = password_gap(items, values)
    (Path(child_dir) / "measure.json").write_text(json.dumps(result, indent=2))
    return result
