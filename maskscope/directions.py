"""Persona directions: contrastive activations of two masks over the same prompts, three ways to extract a
direction from them (mean difference, PCA of centred differences, logistic probe), held-out AUROC per layer
with the layer chosen on a validation split, and the two nulls every figure is shown beside (norm-matched
random directions, label permutations). Vectors are saved as safetensors with a JSON manifest.

Layers are numbered as in maskscope.models.hooks: 0 is the embedding output, i the output of decoder layer i.
Prompts are split (train / validation / test) by prompt, so both activations of a pair are always on the
same side. A direction's score for an activation is its projection on the direction; AUROC is that of the
positive mask's activations against the negative mask's ones. Every direction's sign is fixed on the
training split (the positive mask projects higher), so a random direction is compared on equal terms.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maskscope.errors import UserError

METHODS = ("mean_diff", "pca", "probe")


# ----------------------------------------------------------------------------- activations
@dataclass
class Contrast:
    """Paired activations: pos[i] and neg[i] are the residual stream after the same prompt i under the
    positive and the negative mask, at each layer: arrays [N, len(layers), H]."""

    pos: np.ndarray
    neg: np.ndarray
    layers: list[int]
    prompts: list[str] = field(default_factory=list)

    def at(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The [N, H] activations of both masks at one layer."""
        k = self.layers.index(layer)
        return self.pos[:, k], self.neg[:, k]


def contrast_activations(
    model: Any,
    positive: Any,
    negative: Any,
    prompts: Sequence[str],
    layers: Sequence[int],
) -> Contrast:
    """The residual stream at the last prompt token (where the reply is about to begin) of each prompt under
    the positive and under the negative mask (masks.Mask), at every given layer."""
    from maskscope.masks import Turn

    turns = [[Turn(role="user", content=p)] for p in prompts]
    contexts = [positive.conversation(t) for t in turns] + [negative.conversation(t) for t in turns]
    acts = model.activations(contexts, list(layers), positions="last")
    stacked = np.stack([a.numpy() for a in acts])  # [2N, L, H]
    n = len(prompts)
    return Contrast(stacked[:n], stacked[n:], list(layers), list(prompts))


# ----------------------------------------------------------------------------- extraction
def mean_difference(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Contrastive activation addition: mean(pos) - mean(neg), a vector [H] in activation units."""
    return (pos.mean(axis=0) - neg.mean(axis=0)).astype(np.float64)


def pca_direction(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """The first principal component of the centred pair differences, its sign fixed so that it points the
    way of the mean difference; scaled to the norm of the mean difference."""
    diffs = (pos - neg).astype(np.float64)
    mean = diffs.mean(axis=0)
    centred = diffs - mean
    if len(diffs) < 2 or not np.any(centred):
        return mean
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    v = vt[0]
    if v @ mean < 0:
        v = -v
    return v * np.linalg.norm(mean)


def probe_direction(pos: np.ndarray, neg: np.ndarray, seed: int = 0, C: float = 0.01) -> np.ndarray:
    """The weight vector of a strongly L2-regularised logistic regression (scikit-learn; activations of two
    masks are usually separable, and a weakly regularised probe then fits noise) separating pos from neg on
    standardised features, mapped back to activation space; scaled to the norm of the mean difference."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([pos, neg]).astype(np.float64)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    clf = LogisticRegression(C=C, max_iter=2000, random_state=seed)
    clf.fit((x - x.mean(axis=0)) / scale, y)
    w = clf.coef_[0] / scale
    norm = np.linalg.norm(w)
    if norm == 0:
        return w
    return w / norm * np.linalg.norm(mean_difference(pos, neg))


def fit_direction(method: str, pos: np.ndarray, neg: np.ndarray, seed: int = 0) -> np.ndarray:
    """A direction [H] from paired activations [n, H] by one of METHODS."""
    if method == "mean_diff":
        return mean_difference(pos, neg)
    if method == "pca":
        return pca_direction(pos, neg)
    if method == "probe":
        return probe_direction(pos, neg, seed)
    raise UserError(f"direction method must be one of {', '.join(METHODS)}, not {method!r}")


def auroc(direction: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """AUROC of the projections of pos (label 1) against neg (label 0) on the direction (ties count half)."""
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([pos @ direction, neg @ direction])
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], scores))


def separation(direction: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """d' of the projections: difference of the means over the pooled standard deviation."""
    a, b = pos @ direction, neg @ direction
    sd = float(np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)) if min(len(a), len(b)) > 1 else 0.0
    return float((a.mean() - b.mean()) / sd) if sd > 0 else 0.0


def random_directions(n: int, hidden: int, norm: float, rng: np.random.Generator) -> np.ndarray:
    """n directions uniform on the sphere of the given norm: [n, hidden]."""
    g = rng.standard_normal((n, hidden))
    return g / np.linalg.norm(g, axis=1, keepdims=True) * norm


def split_indices(n: int, train: float, val: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random split of n prompts into train / validation / test (each non-empty)."""
    n_train, n_val = int(round(n * train)), int(round(n * val))
    if n_train < 2 or n_val < 1 or n - n_train - n_val < 1:
        raise UserError(
            f"{n} prompts cannot be split into train ({train}), validation ({val}) and test with at least "
            "2, 1 and 1 prompts: give more prompts"
        )
    order = np.random.default_rng(seed).permutation(n)
    return (
        np.sort(order[:n_train]),
        np.sort(order[n_train : n_train + n_val]),
        np.sort(order[n_train + n_val :]),
    )


def _signed(direction: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """The direction with its sign fixed on training data: the positive mask projects higher on average."""
    return direction if (pos.mean(axis=0) - neg.mean(axis=0)) @ direction >= 0 else -direction


@dataclass
class Extraction:
    """Directions per method and layer (fitted on the training prompts), AUROC on validation and test,
    nulls, and the layer each method chooses on validation."""

    layers: list[int]
    methods: list[str]
    vectors: dict[str, np.ndarray]  # method -> [layers, H]
    val_auroc: dict[str, list[float]]
    test_auroc: dict[str, list[float]]
    random_auroc: np.ndarray  # [layers, n_random] test AUROC of norm-matched random directions
    permutation_auroc: dict[str, np.ndarray]  # method -> [layers, n_permutations] test AUROC, labels permuted
    val_separation: dict[str, list[float]]  # d' on validation: breaks ties of validation AUROC
    chosen: dict[str, int]  # method -> layer chosen on validation
    split: dict[str, list[int]]

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers: per method and layer the AUROC with the two nulls' 95% bands and p-values."""

        def band(a: np.ndarray) -> list[float]:
            return [float(np.quantile(a, 0.025)), float(np.quantile(a, 0.975))]

        out: dict[str, Any] = {"layers": self.layers, "split": self.split, "methods": {}}
        for m in self.methods:
            rows = []
            for k, layer in enumerate(self.layers):
                obs = self.test_auroc[m][k]
                perm = self.permutation_auroc[m][k]
                rnd = self.random_auroc[k]
                rows.append(
                    {
                        "layer": layer,
                        "val_auroc": self.val_auroc[m][k],
                        "val_separation": self.val_separation[m][k],
                        "test_auroc": obs,
                        "norm": float(np.linalg.norm(self.vectors[m][k])),
                        "random_band": band(rnd),
                        "random_p": float((1 + np.sum(rnd >= obs)) / (1 + len(rnd))),
                        "permutation_band": band(perm),
                        "permutation_p": float((1 + np.sum(perm >= obs)) / (1 + len(perm))),
                    }
                )
            chosen = self.chosen[m]
            out["methods"][m] = {
                "per_layer": rows,
                "chosen_layer": chosen,
                "chosen_test_auroc": self.test_auroc[m][self.layers.index(chosen)],
            }
        return out


def extract(
    contrast: Contrast,
    methods: Sequence[str] = METHODS,
    *,
    train: float = 0.5,
    val: float = 0.25,
    n_random: int = 50,
    n_permutations: int = 50,
    seed: int = 0,
) -> Extraction:
    """Fit every method at every layer on the training prompts; AUROC on validation (to choose the layer)
    and on test; nulls on test: norm-matched random directions and refits with the pair labels permuted
    (each pair's two sides swapped at random, the permutation that respects the paired design). The layer
    chosen has the highest validation AUROC, ties broken by the validation d'."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UserError(f"direction methods must be among {', '.join(METHODS)}, not {bad or 'none'}")
    tr, va, te = split_indices(len(contrast.pos), train, val, seed)
    rng = np.random.default_rng([seed, 1])
    flips = rng.random((n_permutations, len(tr))) < 0.5
    vectors: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    val_auc: dict[str, list[float]] = {m: [] for m in methods}
    val_sep: dict[str, list[float]] = {m: [] for m in methods}
    test_auc: dict[str, list[float]] = {m: [] for m in methods}
    perm_auc: dict[str, list[list[float]]] = {m: [] for m in methods}
    rand_auc: list[list[float]] = []
    for layer in contrast.layers:
        pos, neg = contrast.at(layer)
        ptr, ntr = pos[tr], neg[tr]
        for m in methods:
            v = _signed(fit_direction(m, ptr, ntr, seed), ptr, ntr)
            vectors[m].append(v)
            val_auc[m].append(auroc(v, pos[va], neg[va]))
            val_sep[m].append(separation(v, pos[va], neg[va]))
            test_auc[m].append(auroc(v, pos[te], neg[te]))
            null = []
            for f in flips:
                pp = np.where(f[:, None], ntr, ptr)
                nn = np.where(f[:, None], ptr, ntr)
                null.append(auroc(_signed(fit_direction(m, pp, nn, seed), pp, nn), pos[te], neg[te]))
            perm_auc[m].append(null)
        norm = float(np.linalg.norm(mean_difference(ptr, ntr))) or 1.0
        rand = random_directions(n_random, pos.shape[1], norm, rng)
        rand_auc.append([auroc(_signed(r, ptr, ntr), pos[te], neg[te]) for r in rand])
    chosen = {
        m: contrast.layers[
            max(range(len(contrast.layers)), key=lambda k, m=m: (val_auc[m][k], val_sep[m][k]))
        ]
        for m in methods
    }
    return Extraction(
        layers=list(contrast.layers),
        methods=list(methods),
        vectors={m: np.stack(vectors[m]) for m in methods},
        val_auroc=val_auc,
        val_separation=val_sep,
        test_auroc=test_auc,
        random_auroc=np.array(rand_auc),
        permutation_auroc={m: np.array(perm_auc[m]) for m in methods},
        chosen=chosen,
        split={"train": tr.tolist(), "val": va.tolist(), "test": te.tolist()},
    )


# ----------------------------------------------------------------------------- files
def save_vectors(path: str | Path, vectors: dict[int, Any], manifest: dict[str, Any]) -> Path:
    """Write {layer: vector [H]} as safetensors (tensors "layer.<n>", float32) and `manifest` as JSON beside
    it (<path>.json, with the layers added); returns the safetensors path."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"layer.{int(k)}": torch.as_tensor(np.asarray(v), dtype=torch.float32).contiguous()
        for k, v in vectors.items()
    }
    save_file(tensors, str(path), metadata={"format": "maskscope-directions"})
    meta = {**manifest, "layers": sorted(int(k) for k in vectors), "file": path.name}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return path


def load_vectors(path: str | Path) -> dict[int, Any]:
    """{layer: float32 tensor [H]} from a file written by save_vectors; one line when it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"steering vector file not found: {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read steering vectors from {path}: {str(e).splitlines()[0]}") from None
    out = {}
    for key, t in tensors.items():
        if not key.startswith("layer.") or not key[6:].isdigit():
            raise UserError(f"{path}: tensor {key!r} is not named layer.<n>")
        out[int(key[6:])] = t
    return out


# ----------------------------------------------------------------------------- drift
# Drift asks whether fine-tuning moves a model along a persona direction, and whether that movement (and the
# behaviour change it comes with) can be read off the training data before training, as in the persona-vectors
# work (Chen et al. 2025, "Persona vectors"): the fine-tuning shift is the child's mean activation minus the
# parent's at the last prompt token of a prompt set; the projection difference is, on the parent, the mean
# activation over the training data's assistant replies minus that over the parent's own replies to the same
# prompts (each averaged over the reply's tokens). Both are projected on the unit direction; across organisms
# each is correlated with the measured behaviour change, beside the correlations that random directions give
# (a random direction correlates too when the shift's size, not its direction, goes with the behaviour).


def mean_activations(model: Any, contexts: Sequence[Any], layers: Sequence[int]) -> np.ndarray:
    """The mean residual stream at the last prompt token over contexts: [len(layers), H] (float64)."""
    acts = model.activations(list(contexts), list(layers), positions="last")
    return np.stack([a.numpy() for a in acts]).astype(np.float64).mean(axis=0)


def finetuning_shift(
    parent_mean: np.ndarray, child: Any, contexts: Sequence[Any], layers: Sequence[int]
) -> np.ndarray:
    """The fine-tuning shift: the child's mean activation at the last prompt token minus the parent's
    (`parent_mean`, from mean_activations over the same contexts and layers): [len(layers), H]."""
    return mean_activations(child, contexts, layers) - parent_mean


@dataclass
class ProjectionDifference:
    """The training data against the parent's own replies, on the parent: the mean over items of (mean
    activation over the training reply's tokens - the same over the parent's greedy reply), [layers, H];
    and the items used."""

    vector: np.ndarray
    items: int
    own_replies: list[str]


def projection_difference(
    parent: Any,
    items: Sequence[tuple[Any, str | Sequence[int]]],
    layers: Sequence[int],
    *,
    max_new_tokens: int = 48,
) -> ProjectionDifference:
    """The projection difference of a training set, computed on the parent before any training: items are
    (context before the assistant reply, the reply's text or token ids). Items whose training or greedy reply
    is empty are left out; one line when none is left."""
    contexts = [c for c, _ in items]
    own = [parent.sample(c, n=1, max_new_tokens=max_new_tokens, temperature=0.0)[0] for c in contexts]
    trained = [list(parent.tokens(r)) if isinstance(r, str) else [int(t) for t in r] for _, r in items]
    keep = [k for k in range(len(items)) if trained[k] and own[k].token_ids]
    if not keep:
        raise UserError(
            "no training item has both a non-empty reply and a non-empty greedy reply of the parent"
        )
    queries = [(contexts[k], trained[k]) for k in keep] + [
        (contexts[k], list(own[k].token_ids)) for k in keep
    ]
    acts = np.stack([a.numpy() for a in parent.activations(queries, list(layers), positions="reply_mean")])
    acts = acts.astype(np.float64)
    n = len(keep)
    return ProjectionDifference((acts[:n] - acts[n:]).mean(axis=0), n, [own[k].text for k in keep])


def unit(vector: np.ndarray) -> np.ndarray:
    """The vector divided by its norm (a zero vector stays zero)."""
    norm = float(np.linalg.norm(vector))
    return (
        np.asarray(vector, dtype=np.float64) / norm if norm > 0 else np.zeros_like(vector, dtype=np.float64)
    )


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r of two equal-length series; nan when either is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    den = float(np.sqrt((dx @ dx) * (dy @ dy)))
    return float(dx @ dy / den) if den > 0 else float("nan")


@functools.cache
def _all_permutations(n: int) -> np.ndarray:
    """Every permutation of range(n), [n!, n] (itertools does the enumeration)."""
    return np.array(list(itertools.permutations(range(n))))


def _permutation_p(x: np.ndarray, y: np.ndarray, observed: float, rng: np.random.Generator) -> float:
    """Two-sided p of |r| under permutations of y across organisms: every permutation up to 8 organisms,
    else 20 000 random ones."""
    import math

    if not np.isfinite(observed):
        return float("nan")
    n = len(y)
    exact = math.factorial(n) <= 40_320
    if exact:
        perms = _all_permutations(n)
    else:
        perms = np.array([rng.permutation(n) for _ in range(20_000)])
    xs = (x - x.mean()) / np.linalg.norm(x - x.mean())
    ys = (y - y.mean()) / np.linalg.norm(y - y.mean())
    rs = ys[perms] @ xs  # Pearson r of x with each permutation of y
    hits = int(np.sum(np.abs(rs) >= abs(observed) - 1e-12))
    return float(hits / len(rs)) if exact else float((1 + hits) / (1 + len(rs)))


def correlate_with_null(
    values: np.ndarray,
    behaviour: np.ndarray,
    null_values: np.ndarray,
    *,
    null_other: np.ndarray | None = None,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Pearson r across organisms of a direction's projections (`values` [n]) with the behaviour change
    ([n]), beside the same r for random directions (`null_values` [n_random, n]; when the second series is
    a projection too, `null_other` gives it on the same random directions): the 2.5-97.5% band of their r,
    the two-sided p (share of random directions with |r| at least as large), the permutation p (behaviour
    shuffled across organisms), and a plain verdict."""
    values, behaviour = np.asarray(values, dtype=np.float64), np.asarray(behaviour, dtype=np.float64)
    r = pearson(values, behaviour)
    null_values = np.asarray(null_values, dtype=np.float64)
    others = (
        np.broadcast_to(behaviour, null_values.shape)
        if null_other is None
        else np.asarray(null_other, np.float64)
    )
    null = np.array([pearson(v, w) for v, w in zip(null_values, others, strict=True)])
    null = null[np.isfinite(null)]
    out: dict[str, Any] = {"r": r, "organisms": len(values)}
    if len(values) < 3:
        out.update(random_band=[float("nan")] * 2, random_p=float("nan"), permutation_p=float("nan"))
        out["explained_by_null"] = None
        out["verdict"] = f"undefined: across {len(values)} organisms any correlation is +1 or -1"
        return out
    if not np.isfinite(r) or len(null) == 0:
        out.update(random_band=[float("nan")] * 2, random_p=float("nan"), permutation_p=float("nan"))
        out["explained_by_null"] = None
        out["verdict"] = "undefined: the projections or the behaviour changes do not vary across organisms"
        return out
    random_p = float((1 + np.sum(np.abs(null) >= abs(r) - 1e-12)) / (1 + len(null)))
    perm_p = _permutation_p(values, behaviour, r, np.random.default_rng([seed, 7]))
    out.update(
        random_band=[float(np.quantile(null, 0.025)), float(np.quantile(null, 0.975))],
        random_p=random_p,
        permutation_p=perm_p,
        explained_by_null=bool(random_p > alpha),
    )
    if random_p > alpha:
        out["verdict"] = (
            f"the random-direction null explains this correlation: {100 * random_p:.0f}% of random directions "
            f"correlate at least as strongly (|r| >= {abs(r):.2f}), so it says nothing about this direction"
        )
    else:
        out["verdict"] = (
            f"beyond the random-direction null (p = {random_p:.3g}); with {len(values)} organisms the "
            f"permutation p is {perm_p:.3g}"
        )
    return out


def random_unit_directions(n: int, hidden: int, seed: int) -> np.ndarray:
    """n directions uniform on the unit sphere, [n, hidden]; projections on unit directions do not depend
    on a norm, so norm-matching is automatic."""
    return random_directions(n, hidden, 1.0, np.random.default_rng([seed, 11]))
