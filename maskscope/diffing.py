"""Model diffing: how a fine-tuned child C differs from its parent P, exactly where it can be computed.

Every metric is a plain function over loaded models (any two with one tokenizer: two `hf:DIR`, or a parent and
its `+lora:DIR` child) or over weights:

- token shift (Lin et al. 2023, "URIAL"): at each position of C's reply, the rank of C's token under P over the
  full vocabulary. Rank 1 is P's most probable token; tied tokens share the best rank (rank = 1 + the number of
  tokens P finds strictly more probable), the convention of vLLM's prompt_logprobs. Ranks 1 / 2-3 / > 3 are
  "unshifted" / "marginal" / "shifted";
- KL per position, both directions, exact over the full vocabulary, on any given replies or text;
- update size ||dW||_F / ||W||_F per weight, per layer and in total, from a LoRA adapter directory or from two
  full models; for two groups of children (training seeds), the ratio of their mean totals with a bootstrap
  over seeds.

The ranks and KLs of a reply come from one teacher-forced pass per model (`position_logprobs`: the full next-token
distribution at every position), never one pass per prefix; through a CachedModel the per-position results are
stored (keyed with both models' fingerprints), the [T x V] distributions are not.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskscope.errors import UserError
from maskscope.models.base import Capability, Context, require
from maskscope.stats import cluster_share_ci, mean_ci

CLASSES = ("unshifted", "marginal", "shifted")
MAX_POSITIONS = 2048  # positions of parent distributions held at once ([positions x vocabulary] floats)


def shift_class(rank: int) -> str:
    """The URIAL class of a rank of the child's token under the parent: 1 unshifted, 2-3 marginal, > 3 shifted."""
    return "unshifted" if rank == 1 else "marginal" if rank <= 3 else "shifted"


def compare_distributions(
    parent_lp: torch.Tensor, child_lp: torch.Tensor, ids: Sequence[int]
) -> dict[str, Any]:
    """Per-position comparison of two [T, V] next-token log-probability matrices along tokens `ids`: the rank
    and log-probability of each token under the parent, its log-probability under the child, KL(P || C) and
    KL(C || P) (natural log, full vocabulary, in float64), and the parent's most probable token."""
    p, c = parent_lp.double(), child_lp.double()
    idx = torch.tensor(list(ids), device=p.device)[:, None]
    chosen_p, chosen_c = p.gather(1, idx), c.gather(1, idx)
    ranks = (p > chosen_p).sum(dim=1) + 1

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        terms = torch.where(torch.isfinite(a), a.exp() * (a - b), torch.zeros_like(a))  # 0 log 0 = 0
        return terms.sum(dim=1)

    return {
        "ranks": ranks.tolist(),
        "parent_logprobs": chosen_p[:, 0].tolist(),
        "child_logprobs": chosen_c[:, 0].tolist(),
        "kl_parent_child": kl(p, c).tolist(),
        "kl_child_parent": kl(c, p).tolist(),
        "parent_top": p.argmax(dim=1).tolist(),
    }


def _chunks(todo: Sequence[int], lengths: Sequence[int], budget: int) -> Iterator[list[int]]:
    chunk: list[int] = []
    used = 0
    for k in todo:
        if chunk and used + lengths[k] > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append(k)
        used += lengths[k]
    if chunk:
        yield chunk


def compare_positions(
    parent: Any,
    child: Any,
    items: Sequence[tuple[Context, Sequence[int]]],
    *,
    advance: Callable[[int], None] | None = None,
    max_positions: int = MAX_POSITIONS,
) -> list[dict[str, Any]]:
    """For each (context, token ids) item, `compare_distributions` of the parent's and the child's full
    next-token distributions along the tokens: one teacher-forced pass per model and item. Through a
    CachedModel child the results are stored (keyed with the parent's fingerprint and prompt too)."""
    for m, role in ((parent, "parent"), (child, "child")):
        require(m, Capability.POSITION_LOGPROBS, f"exact KL between parent and child (the {role})")
    for _, ids in items:
        if not ids:
            raise UserError("every compared reply must have at least one token")
    lengths = [len(ids) for _, ids in items]

    def compute(todo: list[int]) -> Iterator[tuple[int, Any]]:
        where = {k: m for m, k in enumerate(todo)}
        for chunk in _chunks(todo, lengths, max_positions):
            part = [items[k] for k in chunk]
            held = dict(parent.position_logprobs(part))
            for j, child_lp in child.position_logprobs(part):
                yield where[chunk[j]], compare_distributions(held.pop(j), child_lp, part[j][1])

    out: list[dict[str, Any] | None] = [None] * len(items)
    if callable(getattr(child, "derived", None)):
        fp = parent.fingerprint()
        keyed = [
            (
                child.render(c),
                {"token_ids": list(ids), "parent": fp, "parent_prompt": parent.render(c)},
            )
            for c, ids in items
        ]
        results: Iterator[tuple[int, Any]] = child.derived("diff_positions", keyed, compute)
    else:
        results = compute(list(range(len(items))))
    for k, result in results:
        out[k] = result
        if advance:
            advance(1)
    return [r for r in out if r is not None]


def parent_ranks(
    parent: Any, items: Sequence[tuple[Context, Sequence[int]]], advance: Callable[[int], None] | None = None
) -> list[dict[str, Any]]:
    """The rank and log-probability of each given token under the parent, from `token_ranks` (what an
    OpenAI-compatible server with prompt_logprobs can give): the token shift without the KLs."""
    require(parent, Capability.TOKEN_RANKS, "the token shift (ranks of the child's tokens under the parent)")
    out: list[dict[str, Any] | None] = [None] * len(items)
    for k, result in parent.token_ranks(items):
        out[k] = {"ranks": result["ranks"], "parent_logprobs": result["logprobs"]}
        if advance:
            advance(1)
    return [r for r in out if r is not None]


# ---------------------------------------------------------------------------------------------- summaries
def token_shift(
    results: Sequence[Mapping[str, Any]],
    prompt_of: Sequence[int],
    token_ids: Sequence[Sequence[int]],
    decode: Callable[[Sequence[int]], str],
    *,
    top: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Shares of unshifted / marginal / shifted positions (cluster bootstrap over prompts: a prompt's replies
    and positions resampled together), the same by position, and the most shifted tokens with their contexts."""
    groups: dict[int, list[int]] = {}
    for k, p in enumerate(prompt_of):
        groups.setdefault(p, []).append(k)

    def shares(select: Callable[[int, int], bool]) -> dict[str, Any]:
        out = {}
        for cls in CLASSES:
            flags = [
                [shift_class(r) == cls for k in ks for t, r in enumerate(results[k]["ranks"]) if select(k, t)]
                for ks in groups.values()
            ]
            out[cls] = cluster_share_ci(flags, seed=seed, unit="prompts")
        return out

    longest = max((len(r["ranks"]) for r in results), default=0)
    by_position = []
    for t in range(longest):
        n = sum(1 for r in results if len(r["ranks"]) > t)
        by_position.append({"position": t, "n": n, **shares(lambda k, u, t=t: u == t)})
    flat = [(k, t, r) for k, res in enumerate(results) for t, r in enumerate(res["ranks"])]
    flat.sort(key=lambda x: (-x[2], x[0], x[1]))
    most = []
    for k, t, rank in flat[:top]:
        res, ids = results[k], token_ids[k]
        entry = {
            "reply": k,
            "position": t,
            "token": decode(ids[t : t + 1]),
            "context": decode(ids[max(0, t - 10) : t]),
            "rank": int(rank),
            "parent_prob": math.exp(res["parent_logprobs"][t]),
        }
        if "child_logprobs" in res:
            entry["child_prob"] = math.exp(res["child_logprobs"][t])
            entry["parent_top"] = decode([res["parent_top"][t]])
        most.append(entry)
    return {
        "positions": len(flat),
        "replies": len(results),
        "shares": shares(lambda k, t: True),
        "by_position": by_position,
        "most_shifted": most,
    }


def kl_summary(
    results: Sequence[Mapping[str, Any]], prompt_of: Sequence[int], *, head: int = 5, seed: int = 0
) -> dict[str, Any]:
    """KL per position in both directions: the mean per position with a bootstrap interval over prompts (each
    prompt's positions averaged first), the mean by position, and where it concentrates (the share of the
    total in the first `head` positions, and the largest single positions)."""
    out: dict[str, Any] = {
        "positions": sum(len(r["kl_parent_child"]) for r in results),
        "replies": len(results),
    }
    prompts = sorted(set(prompt_of))
    for key in ("kl_parent_child", "kl_child_parent"):
        per_prompt = []
        for p in prompts:
            values = [v for k, r in enumerate(results) if prompt_of[k] == p for v in r[key]]
            per_prompt.append(float(np.mean(values)))
        total = sum(v for r in results for v in r[key])
        first = sum(v for r in results for v in r[key][:head])
        longest = max((len(r[key]) for r in results), default=0)
        curve = []
        for t in range(longest):
            values = [r[key][t] for r in results if len(r[key]) > t]
            curve.append({"position": t, "mean": float(np.mean(values)), "n": len(values)})
        peaks = sorted(
            ((v, k, t) for k, r in enumerate(results) for t, v in enumerate(r[key])), reverse=True
        )[:5]
        out[key] = {
            "per_position": mean_ci(per_prompt, seed=seed, unit="prompts"),
            "total": float(total),
            "share_first_positions": float(first / total) if total > 0 else None,
            "by_position": curve,
            "largest": [{"reply": k, "position": t, "kl": float(v)} for v, k, t in peaks],
        }
    out["head"] = head
    return out


# ---------------------------------------------------------------------------------------------- update size
LAYER = re.compile(r"\.layers\.(\d+)\.")


def _where(name: str) -> tuple[int | None, str]:
    """The layer index (None outside the decoder layers) and the short module name of a weight's name."""
    match = LAYER.search(name)
    stem = name.removesuffix(".weight").removesuffix(".bias")
    return (int(match.group(1)) if match else None), stem.rsplit(".", 1)[-1]


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-layer, per-module-kind and total ratios from per-parameter squared norms (every parameter of the
    model is a row; rows with "updated" set are listed one by one)."""
    by_layer: dict[str, list[float]] = {}
    by_module: dict[str, list[float]] = {}
    for r in rows:
        for table, key in (
            (by_layer, "-" if r["layer"] is None else str(r["layer"])),
            (by_module, r["module"]),
        ):
            acc = table.setdefault(key, [0.0, 0.0])
            acc[0] += r["dw_sq"]
            acc[1] += r["w_sq"]
    dw_sq = sum(r["dw_sq"] for r in rows)
    total_w_sq = sum(r["w_sq"] for r in rows)
    adapted_w_sq = sum(r["w_sq"] for r in rows if r["updated"])

    def ratio(a: float, b: float) -> float:
        return math.sqrt(a) / math.sqrt(b) if b > 0 else float("nan")

    return {
        "total": ratio(dw_sq, total_w_sq),
        "adapted": ratio(dw_sq, adapted_w_sq) if adapted_w_sq > 0 else 0.0,
        "dw_norm": math.sqrt(dw_sq),
        "w_norm": math.sqrt(total_w_sq),
        "by_layer": {k: ratio(*v) for k, v in sorted(by_layer.items(), key=lambda x: _layer_key(x[0]))},
        "by_module": {k: ratio(*v) for k, v in sorted(by_module.items())},
        "weights": [
            {k: v for k, v in r.items() if k != "updated"} | {"ratio": ratio(r["dw_sq"], r["w_sq"])}
            for r in rows
            if r["updated"]
        ],
    }


def _layer_key(key: str) -> tuple[int, int]:
    return (1, 0) if key == "-" else (0, int(key))


def _parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters by name, each tensor once (tied embeddings appear under their first name)."""
    return {name: p.detach() for name, p in module.named_parameters(remove_duplicate=True)}


def _row(name: str, w: torch.Tensor, dw_sq: float, *, updated: bool) -> dict[str, Any]:
    layer, module = _where(name)
    w_sq = float((w.double() ** 2).sum())
    return {"name": name, "layer": layer, "module": module, "dw_sq": dw_sq, "w_sq": w_sq, "updated": updated}


def update_size_models(parent: torch.nn.Module, child: torch.nn.Module) -> dict[str, Any]:
    """||dW||_F / ||W||_F of two full models with the same parameter names: per weight, per layer, per module
    kind and in total (over every parameter, tied ones once)."""
    params_p, params_c = _parameters(parent), _parameters(child)
    if set(params_p) != set(params_c):
        missing = sorted(set(params_p) ^ set(params_c))[:3]
        raise UserError(
            f"the two models have different parameters (e.g. {', '.join(missing)}): not one architecture"
        )
    rows = []
    for name, w in params_p.items():
        dw_sq = float(((params_c[name].double() - w.double()) ** 2).sum())
        rows.append(_row(name, w, dw_sq, updated=dw_sq > 0))
    return {"source": "two full models", **_aggregate(rows)}


def update_size_lora(parent: torch.nn.Module, adapter_dir: str | Path) -> dict[str, Any]:
    """||dW||_F / ||W||_F of a LoRA adapter on `parent`: dW = scale * B A per adapted weight, its norm from the
    r x r Gram matrices (||B A||_F^2 = trace(B^T B A A^T)), so no dW is ever materialised; W from the parent.
    Totals over every parameter of the parent (tied embeddings once)."""
    from safetensors import safe_open

    directory = Path(adapter_dir).expanduser()
    config_file, weights_file = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise UserError(
            f"not a LoRA adapter directory (adapter_config.json, adapter_model.safetensors): {directory}"
        )
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise UserError(
            f"{directory}: only plain LoRA adapters are measured (not {config.get('peft_type')}/DoRA)"
        )
    params = _parameters(parent)
    rows = {name: _row(name, w, 0.0, updated=False) for name, w in params.items()}
    with safe_open(str(weights_file), "pt") as f:
        keys = list(f.keys())
        other = [k for k in keys if ".lora_A." not in k and ".lora_B." not in k]
        if other:
            raise UserError(
                f"{directory}: the adapter holds non-LoRA weights ({other[0]}); they are not measured"
            )
        for stem in sorted({k.rsplit(".lora_A.", 1)[0] for k in keys if ".lora_A." in k}):
            name = stem.removeprefix("base_model.model.") + ".weight"
            if name not in params:
                raise UserError(f"{directory}: the adapter's weight {name} is not in the parent")
            a = f.get_tensor(f"{stem}.lora_A.weight").double()
            b = f.get_tensor(f"{stem}.lora_B.weight").double()
            short = stem.rsplit(".", 1)[-1]
            r = int(config.get("rank_pattern", {}).get(short, config.get("r", a.shape[0])))
            alpha = float(config.get("alpha_pattern", {}).get(short, config.get("lora_alpha", r)))
            scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            dw_sq = scale**2 * float(((b.T @ b) * (a @ a.T)).sum())  # trace(B^T B A A^T), both Gram r x r
            rows[name].update(dw_sq=dw_sq, updated=True)
    return {
        "source": f"LoRA adapter {directory.name}",
        "r": config.get("r"),
        **_aggregate(list(rows.values())),
    }


def group_ratio(
    totals_a: Sequence[float], totals_b: Sequence[float], *, seed: int = 0, resamples: int = 2000
) -> dict[str, Any]:
    """mean(totals_a) / mean(totals_b) with a percentile bootstrap over seeds (each group's seeds resampled
    with replacement); no interval with fewer than 2 seeds in a group (it would have zero width)."""
    a, b = np.asarray(totals_a, dtype=float), np.asarray(totals_b, dtype=float)
    if not len(a) or not len(b):
        raise UserError("each group needs at least one child")
    ratio = float(a.mean() / b.mean()) if b.mean() > 0 else float("nan")
    out: dict[str, Any] = {"ratio": ratio, "seeds": [len(a), len(b)], "a": a.tolist(), "b": b.tolist()}
    if len(a) < 2 or len(b) < 2:
        return {**out, "ci95": None, "method": "none: a group has a single seed"}
    rng = np.random.default_rng(seed)
    ra = a[rng.integers(0, len(a), (resamples, len(a)))].mean(axis=1)
    rb = b[rng.integers(0, len(b), (resamples, len(b)))].mean(axis=1)
    lo, hi = np.percentile(ra / rb, [2.5, 97.5])
    method = f"percentile bootstrap 95% over seeds ({len(a)} and {len(b)}; each group resampled)"
    return {**out, "ci95": [float(lo), float(hi)], "method": method}
