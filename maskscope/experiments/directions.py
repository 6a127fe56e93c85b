"""The `directions` experiment: is a mask a direction the network holds internally?

Three parts, on a positive and a negative mask of a library (e.g. pirate vs assistant) over the same prompts:

- extraction: the residual stream at the prompt's last token under each mask, at every layer; directions by
  mean difference, PCA of centred differences and a logistic probe, fitted on training prompts; AUROC on
  validation (to choose the layer) and on test, beside norm-matched random directions and label permutations.
- dose-response: under the negative mask, steering with the chosen direction at increasing alpha; the
  behaviour is the exact probability that the reply begins with a target word (mean over prompts), the
  coherence the mean negative log-likelihood per token of the steered greedy reply under the unsteered model
  (same context), with its repetition rate. Beside it, on the same axes: the prompt baseline (the positive
  mask as a system prompt, and as the full mask with its example exchange, unsteered) and a norm-matched
  random vector at the same alphas.
- monitoring: a transcript's activations projected on the direction token by token, beside the exact mask
  posterior of the same transcript (maskscope.experiments.posterior); their correlation, with the band of
  the correlations of norm-matched random directions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from maskscope import directions as dirs
from maskscope.errors import UserError
from maskscope.experiments.spec import LibrarySpec
from maskscope.masks import Mask, MaskLibrary, Turn
from maskscope.models.base import Capability, require
from maskscope.progress import Progress, Silent


class DoseSpec(BaseModel):
    """The alpha sweep: which direction, where, and how behaviour and coherence are measured."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["mean_diff", "pca", "probe"] = Field("mean_diff", description="Direction to steer with.")
    layer: int | None = Field(
        None, description="Layer to steer at; None: the method's layer chosen on validation."
    )
    alphas: list[float] = Field(
        [0.0, 0.5, 1.0, 2.0, 4.0],
        min_length=1,
        description="Multipliers of the vector (alpha 1 adds the fitted vector; mean_diff: the mean difference).",
    )
    positions: Literal["reply", "all"] = Field("reply", description="Steered positions.")
    targets: list[str] = Field(
        min_length=1, description="Reply beginnings that mean the positive mask's behaviour (e.g. Arr, Ahoy)."
    )
    prompts: list[str] | None = Field(
        None, description="Prompts of the sweep; None: the test split's prompts."
    )
    max_new_tokens: int = Field(24, ge=1, le=512, description="Length of each greedy reply.")


class MonitorSpec(BaseModel):
    """A transcript whose last turn (the assistant's) is read token by token."""

    model_config = ConfigDict(extra="forbid")
    transcript: list[Turn] = Field(min_length=1, description="The dialogue; its last turn is the one read.")
    switch_rate: float = Field(0.01, gt=0, lt=1, description="Of the mask posterior's switching model.")

    @model_validator(mode="after")
    def _last_is_the_only_reply(self) -> MonitorSpec:
        roles = [t.role for t in self.transcript]
        if roles[-1] != "assistant" or "assistant" in roles[:-1]:
            raise ValueError("the monitored transcript must have one assistant turn, its last")
        return self


class DirectionsSpec(LibrarySpec):
    """A persona direction between two masks: extraction with nulls, dose-response, monitoring."""

    experiment: Literal["directions"] = "directions"
    positive: str = Field(description="The mask whose direction is read (e.g. pirate).")
    negative: str = Field(
        description="The mask it is contrasted with (e.g. assistant); steering starts from it."
    )
    prompts: list[str] = Field(min_length=8, description="User turns, each read under both masks.")
    layers: list[int] | None = Field(None, description="Layers to read (0 = embeddings); None: every layer.")
    methods: list[Literal["mean_diff", "pca", "probe"]] = Field(
        ["mean_diff", "pca", "probe"], min_length=1, description="Extraction methods."
    )
    train: float = Field(0.5, gt=0, lt=1, description="Share of prompts to fit on.")
    val: float = Field(
        0.25, gt=0, lt=1, description="Share of prompts to choose the layer on; the rest is test."
    )
    n_random: int = Field(50, ge=10, le=10_000, description="Norm-matched random directions (null).")
    n_permutations: int = Field(50, ge=10, le=10_000, description="Label permutations (null).")
    seed: int = Field(0, description="Seed of the split, the nulls and the random control vector.")
    dose: DoseSpec | None = Field(None, description="The alpha sweep (needs steering).")
    monitor: MonitorSpec | None = Field(None, description="A transcript to monitor.")
    save_vectors: bool = Field(True, description="Write each method's vectors (all layers) as safetensors.")

    def limited(self, n: int) -> DirectionsSpec:
        """`--limit N`: the first N prompts (at least 8, the fewest a direction is read from)."""
        return self._replaced(prompts=self.prompts[:n])  # type: ignore[return-value]

    @model_validator(mode="after")
    def _two_masks(self) -> DirectionsSpec:
        if self.positive == self.negative:
            raise ValueError("positive and negative must be two different masks")
        if self.train + self.val >= 1:
            raise ValueError("train + val must leave a test share")
        return self


def _n_layers(model: Any) -> int:
    n = getattr(model, "num_layers", None)
    if not isinstance(n, int):
        raise UserError(f"cannot tell how many layers model {model.name} has: give `layers`")
    return n


def _repetition(ids: list[int], n: int = 3) -> float:
    """Share of the reply's token n-grams that repeat an earlier one (0 for a reply without repeats)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def _condition(model: Any, contexts: list[Any], targets: list[str], max_new_tokens: int) -> dict[str, Any]:
    """The model as it is now (steered or not): the exact target probability and the greedy reply of each
    context (the reply's coherence is measured afterwards, unsteered)."""
    from maskscope.experiments.character import union_probability

    per: list[float] = [0.0] * len(contexts)
    by_ctx: dict[int, list[Any]] = {}
    for r, _, scored in model.score_many([(c, targets) for c in contexts]):
        by_ctx.setdefault(r, []).append(scored)
    for r, scored in by_ctx.items():
        per[r] = union_probability(scored)[0]
    replies = [model.sample(c, n=1, max_new_tokens=max_new_tokens, temperature=0.0)[0] for c in contexts]
    return {"p_target": per, "replies": replies}


def _coherence(model: Any, reference: list[Any], replies: list[Any]) -> dict[str, Any]:
    """Mean NLL per token of each reply under the unsteered model in the reference context, and the mean."""
    items = [(c, r.token_ids) for c, r in zip(reference, replies, strict=True) if r.token_ids]
    nll: dict[int, float] = {}
    for k, lps in model.token_logprobs(items):
        nll[k] = -float(np.mean(lps))
    values = [nll[k] for k in range(len(items))]
    return {
        "nll": float(np.mean(values)) if values else float("nan"),
        "nll_per_prompt": values,
        "repetition": float(np.mean([_repetition(list(r.token_ids)) for r in replies])),
    }


def _point(label: str, kind: str, alpha: float | None, cond: dict[str, Any], coh: dict[str, Any]) -> dict:
    p = cond["p_target"]
    return {
        "label": label,
        "kind": kind,
        "alpha": alpha,
        "p_target": float(np.mean(p)),
        "p_target_per_prompt": p,
        "nll": coh["nll"],
        "nll_per_prompt": coh["nll_per_prompt"],
        "repetition": coh["repetition"],
        "examples": [r.text for r in cond["replies"][:3]],
    }


def dose_response(
    model: Any,
    spec: DoseSpec,
    vector: np.ndarray,
    layer: int,
    positive: Mask,
    negative: Mask,
    prompts: list[str],
    seed: int,
    progress: Progress,
) -> dict[str, Any]:
    """The alpha sweep of a direction and of a norm-matched random vector, and the prompt baselines."""
    require(model, Capability.STEERING, "the dose-response of the directions experiment")
    contexts = [negative.conversation([Turn(role="user", content=p)]) for p in prompts]
    rng = np.random.default_rng([seed, 2])
    random_vec = dirs.random_directions(1, len(vector), float(np.linalg.norm(vector)), rng)[0]
    advance = progress.task("steering: alpha sweep", 2 * len(spec.alphas) + 2)
    points = []
    for kind, v in (("direction", vector), ("random", random_vec)):
        for a in spec.alphas:
            with model.steer(v.astype(np.float32), [layer], a, spec.positions):
                cond = _condition(model, contexts, spec.targets, spec.max_new_tokens)
            coh = _coherence(model, contexts, cond["replies"])
            points.append(_point(f"{kind} alpha={a:g}", kind, a, cond, coh))
            advance(1)
    baselines = {
        "system prompt": Mask(name=positive.name, system=positive.system, preamble=positive.preamble),
        "full mask": positive,
    }
    for label, mask in baselines.items():
        ctxs = [mask.conversation([Turn(role="user", content=p)]) for p in prompts]
        cond = _condition(model, ctxs, spec.targets, spec.max_new_tokens)
        coh = _coherence(model, contexts, cond["replies"])
        points.append(_point(f"prompt: {label}", "prompt", None, cond, coh))
        advance(1)
    return {
        "layer": layer,
        "method": spec.method,
        "norm": float(np.linalg.norm(vector)),
        "prompts": prompts,
        "points": points,
        "definitions": {
            "p_target": (
                "Exact. Probability that the reply begins with one of the targets, mean over the prompts."
            ),
            "nll": (
                "Mean negative log-likelihood per token (nats) of the greedy reply under the unsteered model "
                f"in the {negative.name} context; lower is more like what the model would say unsteered. "
                "A coherent reply in the positive mask's voice also costs NLL here: the prompt baselines show "
                "how much."
            ),
            "repetition": "Share of repeated token 3-grams in the greedy reply, mean over prompts.",
        },
    }


def monitor(
    model: Any,
    spec: MonitorSpec,
    vector: np.ndarray,
    layer: int,
    positive: Mask,
    negative: Mask,
    n_random: int,
    seed: int,
    progress: Progress,
) -> dict[str, Any]:
    """Projection of the transcript's last turn on the direction, token by token, beside the exact posterior
    P(positive mask | tokens) of a two-mask library; Pearson correlation with a random-direction null."""
    from scipy.stats import pearsonr

    from maskscope.experiments.posterior import mask_posterior

    library = MaskLibrary(masks=[positive, negative])
    post = mask_posterior(model, library, spec.transcript, switch_rate=spec.switch_rate, progress=progress)
    ids = list(post.token_ids)
    context = Mask(name="default").conversation(spec.transcript[:-1])
    acts = model.activations([(context, ids)], [layer], positions="all")[0][0].numpy()[-len(ids) :]
    unit = vector / (np.linalg.norm(vector) or 1.0)
    projection = acts @ unit
    smoothed = np.exp(post.smoothed[:, 0])
    static = np.exp(post.static[:, 0])
    rng = np.random.default_rng([seed, 3])
    rand = dirs.random_directions(n_random, len(vector), 1.0, rng)
    rand_proj = acts @ rand.T  # [T, n_random]

    def corr(x: np.ndarray, y: np.ndarray) -> float:
        if np.std(x) == 0 or np.std(y) == 0:
            return float("nan")
        return float(pearsonr(x, y)[0])

    observed = {"smoothed": corr(projection, smoothed), "static": corr(projection, static)}
    null = {
        k: [corr(rand_proj[:, j], y) for j in range(n_random)]
        for k, y in (("smoothed", smoothed), ("static", static))
    }
    out_null = {}
    for k, values in null.items():
        a = np.abs(np.array(values))
        out_null[k] = {
            "abs_band": [0.0, float(np.quantile(a, 0.95))],
            "p": float((1 + np.sum(a >= abs(observed[k]))) / (1 + len(a))),
        }
    return {
        "layer": layer,
        "tokens": post.tokens,
        "projection": projection.tolist(),
        "random_band": [
            np.quantile(rand_proj, 0.025, axis=1).tolist(),
            np.quantile(rand_proj, 0.975, axis=1).tolist(),
        ],
        "posterior_smoothed": smoothed.tolist(),
        "posterior_static": static.tolist(),
        "correlation": observed,
        "null": out_null,
        "definitions": {
            "projection": "Exact. Activation at each token (output of the layer) on the unit direction.",
            "posterior": f"Exact. P({positive.name} | tokens) in a library of {positive.name} and {negative.name}.",
            "null": (
                "Absolute Pearson correlations of norm-matched random directions' projections with the same "
                "posterior: 95th percentile, and the share at least as large as the direction's (p)."
            ),
        },
    }


def run(model: Any, spec: DirectionsSpec, progress: Progress | None = None) -> dict[str, Any]:
    """Extraction with nulls, then (if asked) dose-response and monitoring with the chosen direction."""
    progress = progress or Silent()
    require(model, Capability.ACTIVATIONS, "the directions experiment")
    library = spec.mask_library()
    positive, negative = library.get(spec.positive), library.get(spec.negative)
    layers = spec.layers if spec.layers is not None else list(range(_n_layers(model) + 1))
    advance = progress.task("exact: activations under both masks", 1)
    contrast = dirs.contrast_activations(model, positive, negative, spec.prompts, layers)
    advance(1)
    advance = progress.task("directions and nulls", 1)
    ex = dirs.extract(
        contrast,
        spec.methods,
        train=spec.train,
        val=spec.val,
        n_random=spec.n_random,
        n_permutations=spec.n_permutations,
        seed=spec.seed,
    )
    advance(1)
    summary: dict[str, Any] = {
        "experiment": "directions",
        "name": spec.name,
        "model": {"name": model.name, "fingerprint": model.fingerprint()},
        "spec": spec.model_dump(),
        "positive": positive.name,
        "negative": negative.name,
        "extraction": ex.summary(),
        "vectors": {m: ex.vectors[m].astype(np.float32).tolist() for m in ex.methods}
        if spec.save_vectors
        else {},
        "definitions": {
            "auroc": (
                "Exact given the activations: AUROC of the projections of the positive mask's activations "
                "against the negative mask's on held-out test prompts (the prompts are a sample: see the nulls)."
            ),
            "random_band": "2.5-97.5% of the test AUROC of norm-matched random directions (sign fixed on training).",
            "permutation_band": (
                "2.5-97.5% of the test AUROC of the method refitted with each training pair's sides swapped at "
                "random (for PCA only the sign depends on the labels, so its band is wide by construction)."
            ),
        },
    }
    if spec.dose is not None or spec.monitor is not None:
        method = spec.dose.method if spec.dose is not None else spec.methods[0]
        if method not in ex.methods:
            raise UserError(f"dose.method {method!r} is not among the extracted methods {ex.methods}")
        layer = (
            spec.dose.layer if spec.dose is not None and spec.dose.layer is not None else ex.chosen[method]
        )
        if layer not in layers:
            raise UserError(f"dose.layer {layer} is not among the extracted layers")
        vector = ex.vectors[method][layers.index(layer)]
        if spec.dose is not None:
            test = [spec.prompts[i] for i in ex.split["test"]]
            summary["dose"] = dose_response(
                model,
                spec.dose,
                vector,
                layer,
                positive,
                negative,
                spec.dose.prompts or test,
                spec.seed,
                progress,
            )
        if spec.monitor is not None:
            summary["monitor"] = monitor(
                model, spec.monitor, vector, layer, positive, negative, spec.n_random, spec.seed, progress
            )
    return summary


# ----------------------------------------------------------------------------- outputs
def plots(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """AUROC per layer with nulls, the dose-response Pareto plot, the monitoring plot, and the vectors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written: list[Path] = []
    ext = summary["extraction"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {"mean_diff": "C0", "pca": "C1", "probe": "C2"}
    first = True
    for m, info in ext["methods"].items():
        rows = info["per_layer"]
        xs = [r["layer"] for r in rows]
        ax.plot(xs, [r["test_auroc"] for r in rows], "-o", ms=3, color=colors[m], label=f"{m} (test)")
        ax.fill_between(
            xs,
            [r["permutation_band"][0] for r in rows],
            [r["permutation_band"][1] for r in rows],
            color=colors[m],
            alpha=0.12,
            label=f"{m}: label-permutation 95% band",
        )
        if first:
            ax.fill_between(
                xs,
                [r["random_band"][0] for r in rows],
                [r["random_band"][1] for r in rows],
                color="grey",
                alpha=0.3,
                label="norm-matched random directions 95% band",
            )
            first = False
        ax.axvline(info["chosen_layer"], color=colors[m], ls=":", lw=1)
    ax.set_xlabel("layer (0 = embedding output)")
    ax.set_ylabel("held-out AUROC")
    ax.set_ylim(0, 1.02)
    ax.set_title(
        f"{summary['positive']} vs {summary['negative']}: AUROC per layer (dotted: chosen on validation)"
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    written.append(out_dir / "auroc_by_layer.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    if "dose" in summary:
        dose = summary["dose"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for kind, style in (("direction", "-o"), ("random", "--s")):
            pts = [p for p in dose["points"] if p["kind"] == kind]
            ax.plot(
                [p["nll"] for p in pts],
                [p["p_target"] for p in pts],
                style,
                ms=4,
                label=f"steered: {kind}" + (" (norm-matched control)" if kind == "random" else ""),
            )
            for p in pts:
                ax.annotate(
                    f"{p['alpha']:g}",
                    (p["nll"], p["p_target"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        for p in (p for p in dose["points"] if p["kind"] == "prompt"):
            ax.plot([p["nll"]], [p["p_target"]], "*", ms=12, label=p["label"])
        ax.set_xlabel(
            f"NLL per token of the greedy reply under the unsteered model ({summary['negative']} context)"
        )
        ax.set_ylabel("P(reply begins with a target) [exact]")
        if all(p["p_target"] > 0 for p in dose["points"]):
            ax.set_yscale("log")  # steering and prompting can differ by orders of magnitude
        ax.set_title(f"Dose-response: {dose['method']} at layer {dose['layer']} (labels: alpha)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / "dose_response.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    if "monitor" in summary:
        mon = summary["monitor"]
        fig, ax = plt.subplots(figsize=(9, 4))
        t = np.arange(len(mon["projection"]))
        ax.fill_between(
            t,
            mon["random_band"][0],
            mon["random_band"][1],
            color="grey",
            alpha=0.3,
            label="random unit directions 95% band",
        )
        ax.plot(t, mon["projection"], color="C0", label="projection on the direction")
        ax.set_xlabel("token of the reply")
        ax.set_ylabel("projection")
        ax2 = ax.twinx()
        ax2.plot(t, mon["posterior_smoothed"], color="C3", label=f"P({summary['positive']}) smoothed [exact]")
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_ylabel("mask posterior")
        r = mon["correlation"]["smoothed"]
        ax.set_title(
            f"Monitoring at layer {mon['layer']}: r = {r:.2f} "
            f"(random 95%: |r| <= {mon['null']['smoothed']['abs_band'][1]:.2f})"
        )
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper left")
        fig.tight_layout()
        written.append(out_dir / "monitoring.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    layers = ext["layers"]
    for m, vectors in summary.get("vectors", {}).items():
        info = ext["methods"][m]
        manifest = {
            "method": m,
            "positive": summary["positive"],
            "negative": summary["negative"],
            "read_position": "last prompt token",
            "layer_numbering": "0 = embedding output, i = output of decoder layer i",
            "chosen_layer": info["chosen_layer"],
            "test_auroc": {str(r["layer"]): r["test_auroc"] for r in info["per_layer"]},
            "model": summary["model"],
            "run": summary["name"],
        }
        written.append(
            dirs.save_vectors(out_dir / f"{m}.safetensors", dict(zip(layers, vectors, strict=True)), manifest)
        )
    return written
