"""The `explain` experiment: how much of a target's next-token behaviour is a mixture of a source model's masks?

At each position t of a set of responses, the target gives a next-token distribution T_t and each mask m of
the library gives S_t(. | m) from the source model. Mixture weights w on the simplex are fitted to minimise

    sum_t KL(T_t || sum_m w_m S_t(. | m)),

and the explained fraction is 1 - KL(T || mixture) / KL(T || S0), where S0 is the source with no mask (its
default conditioning). The distributions are reduced to the target's top-k tokens at each position plus one
remainder bucket holding all other tokens; the KL on that coarser partition is a lower bound of the full-
vocabulary KL (coarse-graining never increases a KL divergence). top_k = 0 keeps the full vocabulary.

The objective is convex in w, so any local minimum is the global one. It is minimised with scipy's SLSQP
(sequential quadratic programming with the simplex as bounds and one equality constraint, and the analytic
gradient): a handful of iterations where EM, the textbook algorithm for mixture proportions, needs thousands
when the optimum lies on the simplex's boundary (a mask with weight 0, as in the controls). The result is
certified: with g = minus the gradient, max_m g_m - 1 bounds how far the mean KL per position is above its
minimum; if SLSQP stops above `tol`, EM steps (which never increase the objective) polish it.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.optimize import minimize

from maskscope.errors import UserError
from maskscope.experiments.spec import LibrarySpec
from maskscope.masks import Mask, MaskLibrary, Turn
from maskscope.models.base import LanguageModel, SampleParams, require
from maskscope.progress import Progress, Silent

TINY = 1e-30


class Target(BaseModel):
    """What is explained: a model (the source by default) under a conditioning hidden from the fit."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description='Another model ("hf:DIR", ...), e.g. a fine-tuned child.')
    mask: str | None = Field(None, description="Use this library mask as the hidden conditioning.")
    system: str | None = Field(None, description="Or a hidden system prompt given here.")
    preamble: str | None = Field(None, description="Or a hidden preamble.")
    few_shot: list[Turn] = Field(default_factory=list, description="Or hidden few-shot turns.")
    noise: float = Field(
        0.0, ge=0, description="Std of Gaussian noise added to the target's log-probs (control)."
    )

    @model_validator(mode="after")
    def _one_conditioning(self) -> Target:
        if self.mask is not None and (self.system or self.preamble or self.few_shot):
            raise ValueError("give the target either `mask` or its own conditioning, not both")
        return self

    def conditioning(self, library: MaskLibrary) -> Mask:
        """The hidden conditioning as a Mask."""
        if self.mask is not None:
            return library.get(self.mask)
        return Mask(name="target", system=self.system, preamble=self.preamble, few_shot=self.few_shot)


class ExplainSpec(LibrarySpec):
    """How much of a target's behaviour a mixture of the source's masks (`model` is the source) explains."""

    experiment: Literal["explain"] = "explain"
    target: Target = Field(description="What is explained.")
    prompts: list[str] = Field(min_length=1, description="User turns the responses answer.")
    samples_per_prompt: int = Field(
        1, ge=1, le=100, description="Responses sampled from the target per prompt."
    )
    max_new_tokens: int = Field(40, ge=1, le=2048, description="Positions per response (at most).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of the responses.")
    seed: int = Field(0, description="Seed of the responses and of the bootstrap.")
    top_k: int = Field(64, ge=0, description="Target's top-k tokens kept per position (0: full vocabulary).")
    bootstrap: int = Field(200, ge=0, le=100_000, description="Bootstrap resamples over prompts.")
    tol: float = Field(
        1e-4, gt=0, description="Certified optimality gap (nats per position) the fit must reach."
    )
    max_iterations: int = Field(500, ge=1, description="Cap on solver iterations.")


def kl_rows(t: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(T_n || Q_n) for each row n of probability matrices [N, V] (natural log; 0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(t > 0, t * (np.log(np.maximum(t, TINY)) - np.log(np.maximum(q, TINY))), 0.0)
    return terms.sum(axis=1)


def fit_mixture(
    t: np.ndarray,
    s: np.ndarray,
    *,
    w0: np.ndarray | None = None,
    tol: float = 1e-4,
    max_iterations: int = 500,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Weights w on the simplex minimising sum_n KL(T_n || sum_m w_m S_mn). t: [N, V], s: [M, N, V].

    Returns the weights and {"iterations", "gap", "converged"}. `gap` = max_m g_m - 1, where g is minus the
    gradient of the mean cross-entropy, bounds how far the mean KL per position is above its minimum
    (by convexity, for any w on the simplex); the fit converged when gap <= tol."""
    n_masks, n_rows = s.shape[0], t.shape[0]
    flat_s, flat_t = s.reshape(n_masks, -1), t.reshape(-1)

    def mixture(w: np.ndarray) -> np.ndarray:
        return np.maximum(w @ flat_s, TINY)

    def objective(w: np.ndarray) -> float:
        return float(-(flat_t @ np.log(mixture(w))) / n_rows)

    def multipliers(w: np.ndarray) -> np.ndarray:
        return flat_s @ (flat_t / mixture(w)) / n_rows

    start = np.full(n_masks, 1.0 / n_masks) if w0 is None else np.asarray(w0, dtype=float)
    result = minimize(
        objective,
        start,
        jac=lambda w: -multipliers(w),
        method="SLSQP",
        bounds=[(0.0, 1.0)] * n_masks,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
        options={"ftol": 1e-15, "maxiter": max_iterations},
    )
    w = np.clip(result.x, 0.0, None)
    w /= w.sum()
    iterations = int(result.nit)
    gap = float(multipliers(w).max() - 1.0)
    while gap > tol and iterations < 10 * max_iterations:  # polish with EM steps, which never increase the KL
        w = w * multipliers(w)
        w /= w.sum()
        iterations += 1
        gap = float(multipliers(w).max() - 1.0)
    return w, {"iterations": iterations, "gap": gap, "converged": gap <= tol}


def explained_fraction(
    t: np.ndarray, s: np.ndarray, base: np.ndarray, w: np.ndarray
) -> tuple[float, float, float]:
    """(explained fraction, KL to the mixture, KL to the no-mask source), KLs summed over rows."""
    kl_mix = float(kl_rows(t, np.einsum("m,mnv->nv", w, s)).sum())
    kl_base = float(kl_rows(t, base).sum())
    return (1.0 - kl_mix / kl_base if kl_base > 0 else float("nan")), kl_mix, kl_base


def _rows(result: dict[str, Any]) -> np.ndarray:
    return np.exp(np.array(result["logprobs"], dtype=float))


def run(model: LanguageModel, spec: ExplainSpec, progress: Progress | None = None) -> dict[str, Any]:
    """Run the experiment: sample responses from the target, read every distribution, fit, bootstrap."""
    progress = progress or Silent()
    require(model, "support_logprobs", "the explain experiment")
    library = spec.mask_library()
    hidden = spec.target.conditioning(library)
    target_model = model
    if spec.target.model is not None:
        from maskscope.models.registry import load_model
        from maskscope.store import CachedModel

        inner = load_model(spec.target.model, precision=spec.precision, progress=progress.note)
        target_model = CachedModel(inner, model.store) if hasattr(model, "store") else inner
        if target_model.tokenizer.get_vocab() != model.tokenizer.get_vocab():  # type: ignore[attr-defined]
            raise UserError("the target and the source must share a tokenizer (the same vocabulary)")
        require(target_model, "support_logprobs", "the explain experiment's target")

    params = SampleParams(spec.max_new_tokens, spec.temperature, 1.0, spec.seed)
    responses: list[tuple[int, list[int], str]] = []  # (prompt index, token ids, text)
    advance = progress.task("sampled: target responses", len(spec.prompts) * spec.samples_per_prompt)
    for p, prompt in enumerate(spec.prompts):
        ctx = hidden.conversation([Turn(role="user", content=prompt)])
        for sample in target_model.sample_indices(ctx, range(spec.samples_per_prompt), params):
            if sample.token_ids:
                responses.append((p, sample.token_ids, sample.text))
            advance(1)
    if not responses:
        raise UserError("every target response was empty; raise max_new_tokens or change the prompts")
    support: int | None = spec.top_k or None
    vocab = len(model.tokenizer)  # type: ignore[attr-defined]

    def user(p: int) -> list[Turn]:
        return [Turn(role="user", content=spec.prompts[p])]

    advance = progress.task("exact: target distributions", len(responses))
    targets: list[dict[str, Any]] = [{}] * len(responses)
    items = [(hidden.conversation(user(p)), ids, support or vocab) for p, ids, _ in responses]
    for k, result in target_model.support_logprobs(items):
        targets[k] = result
        advance(1)

    conditionings = [*library.masks, Mask(name="no mask")]
    advance = progress.task(
        "exact: source distributions under each mask", len(conditionings) * len(responses)
    )
    per_mask: list[list[np.ndarray]] = [[np.empty(0)] * len(responses) for _ in conditionings]
    items, where = [], []
    for m, mask in enumerate(conditionings):
        for k, (p, ids, _) in enumerate(responses):
            items.append((mask.conversation(user(p)), ids, targets[k]["support"]))
            where.append((m, k))
    for j, result in model.support_logprobs(items):
        m, k = where[j]
        per_mask[m][k] = _rows(result)
        advance(1)

    rng = np.random.default_rng(spec.seed)
    t_parts = []
    for k in range(len(responses)):
        rows = _rows(targets[k])
        if spec.target.noise:
            logits = np.log(np.maximum(rows, TINY)) + rng.normal(0, spec.target.noise, rows.shape)
            rows = np.exp(logits - logits.max(axis=1, keepdims=True))
            rows /= rows.sum(axis=1, keepdims=True)
        t_parts.append(rows)
    prompt_of_row = np.concatenate([np.full(len(t_parts[k]), responses[k][0]) for k in range(len(responses))])
    t_all = np.concatenate(t_parts)
    s_all = np.stack([np.concatenate(per_mask[m]) for m in range(len(library.masks))])
    base_all = np.concatenate(per_mask[-1])

    w, fit = fit_mixture(t_all, s_all, tol=spec.tol, max_iterations=spec.max_iterations)
    fraction, kl_mix, kl_base = explained_fraction(t_all, s_all, base_all, w)

    prompts_used = sorted(set(prompt_of_row.tolist()))
    boot_fractions, boot_weights = [], []
    advance = progress.task("bootstrap over prompts", spec.bootstrap)
    for _ in range(spec.bootstrap):
        chosen = rng.choice(prompts_used, size=len(prompts_used), replace=True)
        rows = np.concatenate([np.flatnonzero(prompt_of_row == p) for p in chosen])
        wb, _ = fit_mixture(
            t_all[rows], s_all[:, rows], w0=w, tol=spec.tol, max_iterations=spec.max_iterations
        )
        boot_fractions.append(explained_fraction(t_all[rows], s_all[:, rows], base_all[rows], wb)[0])
        boot_weights.append(wb)
        advance(1)

    def interval(values: list[float] | np.ndarray) -> list[float] | None:
        return np.percentile(values, [2.5, 97.5], axis=0).tolist() if len(values) else None

    per_prompt = []
    for p in prompts_used:
        rows = np.flatnonzero(prompt_of_row == p)
        wp, _ = fit_mixture(t_all[rows], s_all[:, rows], tol=spec.tol, max_iterations=spec.max_iterations)
        fp, _, _ = explained_fraction(t_all[rows], s_all[:, rows], base_all[rows], wp)
        per_prompt.append(
            {
                "prompt": spec.prompts[p],
                "weights": dict(zip(library.names, wp.tolist(), strict=True)),
                "explained_fraction": fp,
            }
        )

    residual = kl_rows(t_all, np.einsum("m,mnv->nv", w, s_all))
    positions = [(k, i) for k in range(len(responses)) for i in range(len(t_parts[k]))]
    tokenizer = model.tokenizer  # type: ignore[attr-defined]
    worst = []
    for r in np.argsort(-residual)[:15]:
        k, i = positions[int(r)]
        ids = responses[k][1]
        worst.append(
            {
                "prompt": spec.prompts[responses[k][0]],
                "context": tokenizer.decode(ids[max(0, i - 8) : i]),
                "token": tokenizer.decode(ids[i : i + 1]),
                "residual_kl": float(residual[r]),
            }
        )
    return {
        "experiment": "explain",
        "name": spec.name,
        "model": {"name": model.name, "fingerprint": model.fingerprint()},
        "target_model": {"name": target_model.name, "fingerprint": target_model.fingerprint()},
        "spec": spec.model_dump(),
        "masks": library.names,
        "hidden_conditioning": hidden.model_dump(),
        "positions": int(len(t_all)),
        "responses": [{"prompt": spec.prompts[p], "text": text} for p, _, text in responses],
        "weights": dict(zip(library.names, w.tolist(), strict=True)),
        "weights_ci95": (
            {n: ci for n, ci in zip(library.names, np.array(interval(boot_weights)).T.tolist(), strict=True)}
            if boot_weights
            else None
        ),
        "explained_fraction": fraction,
        "explained_fraction_ci95": interval(boot_fractions),
        "kl_mixture_per_position": kl_mix / len(t_all),
        "kl_no_mask_per_position": kl_base / len(t_all),
        "fit": {**fit, "fraction_error_bound": fit["gap"] * len(t_all) / kl_base if kl_base > 0 else None},
        "per_prompt": per_prompt,
        "residual_kl": residual.tolist(),
        "worst_explained": worst,
        "definitions": {
            "explained_fraction": (
                "Exact distributions, fitted weights; interval: bootstrap over prompts (percentile, 95%). "
                "1 - KL(target || mixture of masks) / KL(target || source with no mask), KL summed over positions"
                + (
                    f", on the target's top {spec.top_k} tokens plus a remainder bucket (a lower bound of the "
                    "full-vocabulary KL)."
                    if spec.top_k
                    else ", on the full vocabulary."
                )
            ),
            "fit": (
                "SLSQP on the simplex; gap certifies the mean KL per position is within it of its minimum, so the "
                "explained fraction is within fraction_error_bound of the best any mixture reaches."
            ),
        },
    }
