"""The `explain` experiment: is a target its source model wearing a mixture of the source's masks?

"Fine-tuning only reweights masks" says the target is its source wearing mask m with probability w_m, for a
whole reply: P_target(reply) = sum_m w_m P_source(reply | m). Its next-token prediction at position t of a reply
is the mixture with weights that move along the reply, the posterior over masks given the tokens so far:

    Q_t = sum_m pi_t(m) S_t(. | m),   pi_t(m) = w_m p(x_<t | m) / sum_k w_k p(x_<t | k).

The headline fit is this reply-level (sequence) mixture: the weights maximise the likelihood of the target's
sampled replies, (1/R) sum_r log sum_m w_m p(reply_r | m), a concave function of w. The explained fraction is
1 - KL(T || Q) / KL(T || S0), KLs summed over positions, where T_t is the target's next-token distribution and S0
the source with no mask (its default conditioning); the weights and the fraction carry percentile bootstrap
intervals over prompts (each resample refitted).

A secondary view, named as such, is the per-position mixture sum_m w_m S_t(. | m) with one fixed w at every
position, fitted to minimise sum_t KL(T_t || mixture). It is a different hypothesis: a reply-level mixture of two
masks is not a fixed per-position mixture (its weights move to the speaking mask within a few tokens), and the
per-position fit explains it only partly.

Distributions are reduced to the target's top-k tokens at each position plus one remainder bucket holding all
other tokens; the KL on that coarser partition is a lower bound of the full-vocabulary KL (coarse-graining never
increases a KL divergence). top_k = 0 keeps the full vocabulary. The replies' own tokens are scored exactly on
the full vocabulary.

Both objectives have the form mean_n -sum_v T_nv log(sum_m w_m S_mnv), convex in w, minimised with scipy's SLSQP
(the simplex as bounds and one equality constraint, the analytic gradient) and, if it stops short, polished by EM
steps, which never increase the objective. The result is certified: with g = minus the gradient,
max_m g_m - g.w bounds how far the objective is above its minimum (convexity), for any w on the simplex.

When the target is within `noise_floor` nats per position of the unmasked source, there is nothing for the masks
to explain: the summary says so in one line (`flag`) and reports no explained fraction.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.optimize import minimize
from scipy.special import logsumexp

from maskscope.errors import UserError
from maskscope.experiments.spec import LibrarySpec
from maskscope.masks import Mask, MaskLibrary, Turn
from maskscope.models.base import LanguageModel, SampleParams, require
from maskscope.progress import Progress, Silent

TINY = 1e-30


class Target(BaseModel):
    """What is explained: a model (the source by default) under a conditioning hidden from the fit, or a
    synthetic reply-level mixture of library masks (a positive control whose answer is known)."""

    model_config = ConfigDict(extra="forbid")
    path_fields: ClassVar[dict[str, str]] = {"model": "model"}  # relative to the spec file
    model: str | None = Field(None, description='Another model ("hf:DIR", ...), e.g. a fine-tuned child.')
    mask: str | None = Field(None, description="Use this library mask as the hidden conditioning.")
    system: str | None = Field(None, description="Or a hidden system prompt given here.")
    preamble: str | None = Field(None, description="Or a hidden preamble.")
    few_shot: list[Turn] = Field(default_factory=list, description="Or hidden few-shot turns.")
    mixture: dict[str, float] | None = Field(
        None,
        description=(
            "Or a synthetic reply-level mixture: library mask name -> weight. Each reply is sampled from one "
            "mask drawn with these weights; the target's distributions are the mixture's exact predictive."
        ),
    )
    noise: float = Field(
        0.0, ge=0, description="Std of Gaussian noise added to the target's log-probs (control)."
    )

    @model_validator(mode="after")
    def _one_conditioning(self) -> Target:
        own = bool(self.system or self.preamble or self.few_shot)
        if sum([self.mask is not None, own, self.mixture is not None]) > 1:
            raise ValueError("give the target one of `mask`, its own conditioning, or `mixture`")
        if self.mixture is not None:
            if self.model is not None:
                raise ValueError("a `mixture` target is built from the source model; drop `model`")
            if (
                not self.mixture
                or any(w < 0 for w in self.mixture.values())
                or sum(self.mixture.values()) <= 0
            ):
                raise ValueError("`mixture` needs non-negative weights with a positive sum")
        return self

    def conditioning(self, library: MaskLibrary) -> Mask:
        """The hidden conditioning as a Mask (a mixture target has none: see `components`)."""
        if self.mask is not None:
            return library.get(self.mask)
        return Mask(name="target", system=self.system, preamble=self.preamble, few_shot=self.few_shot)

    def components(self, library: MaskLibrary) -> tuple[list[int], np.ndarray]:
        """A mixture target's library indices and normalised weights."""
        assert self.mixture is not None
        index = [library.names.index(library.get(name).name) for name in self.mixture]
        w = np.array(list(self.mixture.values()), dtype=float)
        return index, w / w.sum()


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
    seed: int = Field(0, description="Seed of the responses, of a mixture's draws and of the bootstrap.")
    top_k: int = Field(64, ge=0, description="Target's top-k tokens kept per position (0: full vocabulary).")
    bootstrap: int = Field(200, ge=0, le=100_000, description="Bootstrap resamples over prompts.")
    tol: float = Field(1e-4, gt=0, description="Certified optimality gap each fit must reach.")
    max_iterations: int = Field(500, ge=1, description="Cap on solver iterations.")
    noise_floor: float = Field(
        1e-3,
        ge=0,
        description=(
            "Below this KL(target || no mask) in nats per position the target is the unmasked source: flagged, "
            "no explained fraction."
        ),
    )

    def limited(self, n: int) -> ExplainSpec:
        """`--limit N`: the first N prompts."""
        return self._replaced(prompts=self.prompts[:n])  # type: ignore[return-value]

    def extra_models(self) -> dict[str, str]:
        """The target, when it is another model: loaded by the runner and passed as models["target"]."""
        return {} if self.target.model is None else {"target": self.target.model}

    @model_validator(mode="after")
    def _mixture_masks_exist(self) -> ExplainSpec:
        if self.target.mixture is not None and self.masks is not None:
            names = {m.name for m in self.masks}
            unknown = sorted(set(self.target.mixture) - names)
            if unknown:
                raise ValueError(f"target.mixture names masks not in the library: {', '.join(unknown)}")
        return self


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
    """Weights w on the simplex minimising mean_n -sum_v T_nv log(sum_m w_m S_mnv). t: [N, V], s: [M, N, V].

    With probability rows this is sum_n KL(T_n || sum_m w_m S_mn) up to a constant. Returns the weights and
    {"iterations", "gap", "converged"}: `gap` = max_m g_m - g.w, where g is minus the gradient, bounds how far
    the objective is above its minimum (by convexity, for any w on the simplex, whether or not the rows sum to
    exactly 1); the fit converged when gap <= tol."""
    n_masks, n_rows = s.shape[0], t.shape[0]
    flat_s, flat_t = s.reshape(n_masks, -1), t.reshape(-1)

    def mixture(w: np.ndarray) -> np.ndarray:
        return np.maximum(w @ flat_s, TINY)

    def objective(w: np.ndarray) -> float:
        return float(-(flat_t @ np.log(mixture(w))) / n_rows)

    def multipliers(w: np.ndarray) -> np.ndarray:
        return flat_s @ (flat_t / mixture(w)) / n_rows

    def certificate(w: np.ndarray) -> float:
        g = multipliers(w)
        return float(g.max() - g @ w)

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
    w = w / w.sum() if w.sum() > 0 else np.full(n_masks, 1.0 / n_masks)
    iterations = int(result.nit)
    gap = certificate(w)
    while gap > tol and iterations < 10 * max_iterations:  # polish with EM steps, which never increase it
        g = multipliers(w)
        w = w * g / (g @ w)
        iterations += 1
        gap = certificate(w)
    return w, {"iterations": iterations, "gap": gap, "converged": gap <= tol}


def fit_sequence_mixture(
    reply_loglik: np.ndarray,
    *,
    w0: np.ndarray | None = None,
    tol: float = 1e-4,
    max_iterations: int = 500,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Maximum-likelihood weights of a reply-level mixture. reply_loglik: [R, M], log p(reply_r | mask m).

    Maximises (1/R) sum_r log sum_m w_m p(reply_r | m). Returns the weights and {"iterations", "gap",
    "converged", "loglik_per_reply"}; `gap` bounds how far the mean log-likelihood per reply is below its
    maximum."""
    shift = reply_loglik.max(axis=1, keepdims=True)
    a = np.exp(reply_loglik - shift)  # [R, M], each row's largest entry 1
    w, fit = fit_mixture(np.ones((len(a), 1)), a.T[:, :, None], w0=w0, tol=tol, max_iterations=max_iterations)
    loglik = float(np.mean(np.log(np.maximum(a @ w, TINY)) + shift[:, 0]))
    return w, {**fit, "loglik_per_reply": loglik}


def responsibilities(reply_loglik: np.ndarray, w: np.ndarray) -> np.ndarray:
    """P(mask | reply) under the reply-level mixture with weights w: [R, M]."""
    with np.errstate(divide="ignore"):
        joint = reply_loglik + np.log(w)[None, :]
    return np.exp(joint - logsumexp(joint, axis=1, keepdims=True))


def sequence_predictive(
    s: np.ndarray, token_loglik: np.ndarray, reply_of_row: np.ndarray, w: np.ndarray
) -> np.ndarray:
    """The reply-level mixture's next-token distributions [N, V]: sum_m pi_t(m) S_t(. | m), where
    pi_t(m) is proportional to w_m p(x_<t | m) within each reply. s: [M, N, V]; token_loglik: [M, N],
    log p(x_t | x_<t, m) of each reply's own tokens; reply_of_row: [N], the reply each row belongs to
    (rows of a reply consecutive, in order)."""
    exclusive = np.cumsum(token_loglik, axis=1) - token_loglik  # sum over all earlier rows
    if np.any(np.diff(reply_of_row) < 0):
        raise ValueError("the rows of each reply must be consecutive, replies in increasing order")
    first = np.searchsorted(reply_of_row, reply_of_row, side="left")
    prefix = exclusive - exclusive[:, first]  # sum over earlier rows of the same reply
    with np.errstate(divide="ignore"):
        log_post = prefix.T + np.log(w)[None, :]  # [N, M]
    post = np.exp(log_post - logsumexp(log_post, axis=1, keepdims=True))
    return np.einsum("nm,mnv->nv", post, s)


def explained_fraction(
    t: np.ndarray, s: np.ndarray, base: np.ndarray, w: np.ndarray
) -> tuple[float, float, float]:
    """Per-position mixture: (explained fraction, KL to the mixture, KL to the no-mask source), KLs summed
    over rows; the fraction is NaN when the KL to the no-mask source is 0 (callers flag that case)."""
    kl_mix = float(kl_rows(t, np.einsum("m,mnv->nv", w, s)).sum())
    kl_base = float(kl_rows(t, base).sum())
    return (1.0 - kl_mix / kl_base if kl_base > 0 else float("nan")), kl_mix, kl_base


def _rows(result: dict[str, Any]) -> np.ndarray:
    return np.exp(np.array(result["logprobs"], dtype=float))


def _percentile(values: list[float] | list[np.ndarray]) -> list[Any] | None:
    """95% percentile interval of the finite bootstrap values; None when there are none."""
    arr = np.array(values, dtype=float)
    if arr.size == 0:
        return None
    if arr.ndim == 1:
        arr = arr[np.isfinite(arr)]
        return np.percentile(arr, [2.5, 97.5]).tolist() if arr.size else None
    arr = arr[np.all(np.isfinite(arr), axis=1)]
    return np.percentile(arr, [2.5, 97.5], axis=0).tolist() if len(arr) else None


class _Data:
    """The numbers of one run, as arrays: rows are positions, replies are consecutive rows."""

    def __init__(
        self,
        t: np.ndarray,
        s: np.ndarray,
        base: np.ndarray,
        token_loglik: np.ndarray,
        reply_of_row: np.ndarray,
        prompt_of_reply: np.ndarray,
    ) -> None:
        self.t, self.s, self.base, self.token_loglik = t, s, base, token_loglik
        self.reply_of_row, self.prompt_of_reply = reply_of_row, prompt_of_reply
        n_replies = len(prompt_of_reply)
        self.reply_loglik = np.stack(
            [np.bincount(reply_of_row, weights=token_loglik[m], minlength=n_replies) for m in range(len(s))],
            axis=1,
        )

    def subset(self, replies: np.ndarray) -> _Data:
        """The data of these replies (repeats allowed), renumbered."""
        rows = np.concatenate([np.flatnonzero(self.reply_of_row == r) for r in replies])
        new_ids = np.concatenate([np.full(np.sum(self.reply_of_row == r), i) for i, r in enumerate(replies)])
        return _Data(
            self.t[rows],
            self.s[:, rows],
            self.base[rows],
            self.token_loglik[:, rows],
            new_ids,
            self.prompt_of_reply[replies],
        )

    def fits(self, tol: float, max_iterations: int, w0: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
        """Both fits and their KLs on this data."""
        w_seq, fit_seq = fit_sequence_mixture(
            self.reply_loglik, w0=None if w0 is None else w0[0], tol=tol, max_iterations=max_iterations
        )
        kl_seq = float(
            kl_rows(self.t, sequence_predictive(self.s, self.token_loglik, self.reply_of_row, w_seq)).sum()
        )
        w_pos, fit_pos = fit_mixture(
            self.t, self.s, w0=None if w0 is None else w0[1], tol=tol, max_iterations=max_iterations
        )
        _, kl_pos, kl_base = explained_fraction(self.t, self.s, self.base, w_pos)
        return {
            "w_seq": w_seq,
            "fit_seq": fit_seq,
            "kl_seq": kl_seq,
            "w_pos": w_pos,
            "fit_pos": fit_pos,
            "kl_pos": kl_pos,
            "kl_base": kl_base,
        }


def _fraction(kl: float, kl_base: float) -> float:
    return 1.0 - kl / kl_base if kl_base > 0 else float("nan")


def run(
    model: LanguageModel,
    spec: ExplainSpec,
    progress: Progress | None = None,
    models: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the experiment: sample responses from the target, read every distribution, fit, bootstrap."""
    progress = progress or Silent()
    require(model, "support_logprobs", "the explain experiment")
    require(model, "token_logprobs", "the explain experiment")
    library = spec.mask_library()
    mixture = spec.target.mixture is not None
    if mixture:
        comp_index, comp_w = spec.target.components(library)
    hidden = spec.target.conditioning(library)
    target_model = model
    if spec.target.model is not None:
        if not models or "target" not in models:
            raise UserError("target.model is loaded by the runner: pass it as models={'target': model}")
        target_model = models["target"]
        if target_model.tokenizer.get_vocab() != model.tokenizer.get_vocab():  # type: ignore[attr-defined]
            raise UserError("the target and the source must share a tokenizer (the same vocabulary)")
        require(target_model, "support_logprobs", "the explain experiment's target")

    def user(p: int) -> list[Turn]:
        return [Turn(role="user", content=spec.prompts[p])]

    # who speaks each reply: the hidden conditioning, or a mixture component drawn per (seed, prompt, sample)
    speaker: dict[tuple[int, int], Mask] = {}
    for p in range(len(spec.prompts)):
        for i in range(spec.samples_per_prompt):
            if mixture:
                c = int(np.random.default_rng([spec.seed, p, i]).choice(len(comp_w), p=comp_w))
                speaker[(p, i)] = library.masks[comp_index[c]]
            else:
                speaker[(p, i)] = hidden

    params = SampleParams(spec.max_new_tokens, spec.temperature, 1.0, spec.seed)
    responses: list[tuple[int, list[int], str, Mask]] = []  # (prompt index, token ids, text, speaker)
    advance = progress.task("sampled: target responses", len(spec.prompts) * spec.samples_per_prompt)
    for p in range(len(spec.prompts)):
        by_mask: dict[str, list[int]] = {}
        for i in range(spec.samples_per_prompt):
            by_mask.setdefault(speaker[(p, i)].name, []).append(i)
        drawn_here: dict[int, tuple[list[int], str, Mask]] = {}
        for indices in by_mask.values():
            mask = speaker[(p, indices[0])]
            for sample in target_model.sample_indices(mask.conversation(user(p)), indices, params):
                drawn_here[sample.index] = (sample.token_ids, sample.text, mask)
                advance(1)
        for i in sorted(drawn_here):
            ids, text, mask = drawn_here[i]
            if ids:
                responses.append((p, ids, text, mask))
    if not responses:
        raise UserError("every target response was empty; raise max_new_tokens or change the prompts")
    support: int | None = spec.top_k or None
    vocab = len(model.tokenizer)  # type: ignore[attr-defined]

    advance = progress.task("exact: target distributions", len(responses))
    targets: list[dict[str, Any]] = [{}] * len(responses)
    items = [(mask.conversation(user(p)), ids, support or vocab) for p, ids, _, mask in responses]
    for k, result in target_model.support_logprobs(items):
        targets[k] = result
        advance(1)

    conditionings = [*library.masks, Mask(name="no mask")]
    advance = progress.task(
        "exact: source distributions under each mask", 2 * len(conditionings) * len(responses)
    )
    per_mask: list[list[np.ndarray]] = [[np.empty(0)] * len(responses) for _ in conditionings]
    token_lp: list[list[np.ndarray]] = [[np.empty(0)] * len(responses) for _ in conditionings]
    items, tl_items, where = [], [], []
    for m, mask in enumerate(conditionings):
        for k, (p, ids, _, _) in enumerate(responses):
            items.append((mask.conversation(user(p)), ids, targets[k]["support"]))
            tl_items.append((mask.conversation(user(p)), ids))
            where.append((m, k))
    for j, result in model.support_logprobs(items):
        m, k = where[j]
        per_mask[m][k] = _rows(result)
        advance(1)
    for j, logprobs in model.token_logprobs(tl_items):
        m, k = where[j]
        token_lp[m][k] = np.array(logprobs, dtype=float)
        advance(1)

    n_masks = len(library.masks)
    rng = np.random.default_rng(spec.seed)
    t_parts = []
    for k, (_, ids, _, _) in enumerate(responses):
        if mixture:  # the mixture's exact predictive: weights move with the evidence of the reply so far
            comp_s = np.stack([per_mask[i][k] for i in comp_index])
            comp_tl = np.stack([token_lp[i][k] for i in comp_index])
            rows = sequence_predictive(comp_s, comp_tl, np.zeros(len(ids), dtype=int), comp_w)
        else:
            rows = _rows(targets[k])
        if spec.target.noise:
            logits = np.log(np.maximum(rows, TINY)) + rng.normal(0, spec.target.noise, rows.shape)
            rows = np.exp(logits - logits.max(axis=1, keepdims=True))
            rows /= rows.sum(axis=1, keepdims=True)
        t_parts.append(rows)
    reply_of_row = np.concatenate([np.full(len(t_parts[k]), k) for k in range(len(responses))])
    prompt_of_reply = np.array([p for p, _, _, _ in responses])
    data = _Data(
        np.concatenate(t_parts),
        np.stack([np.concatenate(per_mask[m]) for m in range(n_masks)]),
        np.concatenate(per_mask[-1]),
        np.stack([np.concatenate(token_lp[m]) for m in range(n_masks)]),
        reply_of_row,
        prompt_of_reply,
    )
    n_rows = len(data.t)
    main = data.fits(spec.tol, spec.max_iterations)
    kl_base_per = main["kl_base"] / n_rows
    near_no_mask = kl_base_per < spec.noise_floor
    flag = (
        f"The target is within {kl_base_per:.2e} nats per position of the unmasked source (noise floor "
        f"{spec.noise_floor:g}): there is nothing for the masks to explain, so no explained fraction is reported."
        if near_no_mask
        else None
    )

    prompts_used = np.array(sorted(set(prompt_of_reply.tolist())))
    boot: dict[str, list[Any]] = {"w_seq": [], "w_pos": [], "f_seq": [], "f_pos": []}
    advance = progress.task("bootstrap over prompts", spec.bootstrap)
    for _ in range(spec.bootstrap):
        chosen = rng.choice(prompts_used, size=len(prompts_used), replace=True)
        replies = np.concatenate([np.flatnonzero(prompt_of_reply == p) for p in chosen])
        b = data.subset(replies).fits(spec.tol, spec.max_iterations, w0=(main["w_seq"], main["w_pos"]))
        boot["w_seq"].append(b["w_seq"])
        boot["w_pos"].append(b["w_pos"])
        boot["f_seq"].append(_fraction(b["kl_seq"], b["kl_base"]))
        boot["f_pos"].append(_fraction(b["kl_pos"], b["kl_base"]))
        advance(1)

    def weight_ci(samples: list[np.ndarray]) -> dict[str, list[float]] | None:
        ci = _percentile(samples)
        return None if ci is None else dict(zip(library.names, np.array(ci).T.tolist(), strict=True))

    def fraction_or_none(kl: float, kl_base: float) -> float | None:
        return None if near_no_mask or kl_base <= 0 else _fraction(kl, kl_base)

    q_seq = sequence_predictive(data.s, data.token_loglik, reply_of_row, main["w_seq"])
    residual = kl_rows(data.t, q_seq)
    resp = responsibilities(data.reply_loglik, main["w_seq"])
    per_prompt = []
    for p in prompts_used:
        rows = np.isin(reply_of_row, np.flatnonzero(prompt_of_reply == p))
        kl_b = float(kl_rows(data.t[rows], data.base[rows]).sum())
        per_prompt.append(
            {
                "prompt": spec.prompts[p],
                "responsibilities": dict(
                    zip(library.names, resp[prompt_of_reply == p].mean(axis=0).tolist(), strict=True)
                ),
                "explained_fraction": fraction_or_none(float(residual[rows].sum()), kl_b),
            }
        )

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
    kl_seq_per, kl_pos_per = main["kl_seq"] / n_rows, main["kl_pos"] / n_rows
    reduction = (
        f", on the target's top {spec.top_k} tokens plus a remainder bucket (a lower bound of the "
        "full-vocabulary KL)."
        if spec.top_k
        else ", on the full vocabulary."
    )
    control = None
    if mixture:
        counts = {library.masks[i].name: 0 for i in comp_index}
        for _, _, _, mask in responses:
            counts[mask.name] += 1
        control = {
            "kind": "synthetic reply-level mixture (positive control)",
            "weights": {library.masks[i].name: float(w) for i, w in zip(comp_index, comp_w, strict=True)},
            "replies_drawn": counts,
        }
    return {
        "experiment": "explain",
        "name": spec.name,
        "model": {"name": model.name, "fingerprint": model.fingerprint()},
        "target_model": {"name": target_model.name, "fingerprint": target_model.fingerprint()},
        "spec": spec.model_dump(),
        "masks": library.names,
        "hidden_conditioning": None if mixture else hidden.model_dump(),
        "mixture_control": control,
        "positions": int(n_rows),
        "responses": [
            {
                "prompt": spec.prompts[p],
                "text": text,
                "speaker": mask.name if mixture else None,
                "responsibilities": dict(zip(library.names, resp[k].tolist(), strict=True)),
            }
            for k, (p, _, text, mask) in enumerate(responses)
        ],
        "fit_kind": "reply-level (sequence) mixture",
        "near_no_mask": bool(near_no_mask),
        "flag": flag,
        "weights": dict(zip(library.names, main["w_seq"].tolist(), strict=True)),
        "weights_ci95": weight_ci(boot["w_seq"]),
        "explained_fraction": fraction_or_none(main["kl_seq"], main["kl_base"]),
        "explained_fraction_ci95": None if near_no_mask else _percentile(boot["f_seq"]),
        "kl_mixture_per_position": kl_seq_per,
        "kl_no_mask_per_position": kl_base_per,
        "fit": main["fit_seq"],
        "per_position": {
            "fit_kind": "per-position mixture (secondary view: one fixed w at every position)",
            "weights": dict(zip(library.names, main["w_pos"].tolist(), strict=True)),
            "weights_ci95": weight_ci(boot["w_pos"]),
            "explained_fraction": fraction_or_none(main["kl_pos"], main["kl_base"]),
            "explained_fraction_ci95": None if near_no_mask else _percentile(boot["f_pos"]),
            "kl_mixture_per_position": kl_pos_per,
            "fit": {
                **main["fit_pos"],
                "fraction_error_bound": None if near_no_mask else main["fit_pos"]["gap"] / kl_base_per,
            },
        },
        "per_prompt": per_prompt,
        "residual_kl": residual.tolist(),
        "worst_explained": worst,
        "definitions": {
            "explained_fraction": (
                "Exact distributions, fitted weights; interval: percentile bootstrap 95% over prompts (each "
                "resample refitted). 1 - KL(target || Q) / KL(target || source with no mask), KL summed over "
                "positions, where Q is the reply-level mixture's next-token prediction: the masks weighted by "
                "w_m p(reply so far | m), normalised" + reduction
            ),
            "weights": (
                "Maximum likelihood of the target's sampled replies under the reply-level mixture "
                "sum_m w_m p(reply | m) (exact per-token log-probabilities); percentile bootstrap 95% over prompts."
            ),
            "fit": (
                "SLSQP on the simplex, polished by EM; gap = max_m g_m - g.w (g: minus the gradient) certifies "
                "the mean log-likelihood per reply is within gap of its maximum."
            ),
            "per_position": (
                "Secondary view: one fixed mixture sum_m w_m S_t(.|m) at every position, minimising "
                "sum_t KL(T_t || mixture); its certified gap bounds the mean KL per position above the minimum, "
                "so its explained fraction is within fraction_error_bound of the best such mixture's."
            ),
            "noise_floor": (
                f"Below {spec.noise_floor:g} nats per position of KL(target || no mask) the target is flagged "
                "as the unmasked source and no explained fraction is reported."
            ),
        },
    }
