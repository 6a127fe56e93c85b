"""The `drift` experiment: does fine-tuning move a model along a persona direction, and could the training
data have told us before training?

For a parent (the run's model) and its fine-tuned children (organisms, each `PARENT+lora:DIR`), on each
direction (a vector file written by the `directions` experiment):

- the fine-tuning shift: the child's mean activation minus the parent's at the last prompt token of a
  prompt set, projected on the unit direction (at the direction's chosen layer; and at every layer, for the
  plot);
- the projection difference of the child's training set, on the parent, before training: the mean
  activation over the training replies minus that over the parent's own greedy replies to the same prompts
  (each averaged over the reply's tokens), projected on the same unit direction;
- across organisms, each is correlated with the measured behaviour change, beside the correlations of
  random directions (uniform on the unit sphere: a band and a p-value) and of behaviour permuted across
  organisms; the summary says plainly when the random-direction null explains a correlation.

The computations are in maskscope.directions; this module reads the files, runs the models and writes the
summary, plots and report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from maskscope import directions as dirs
from maskscope.errors import UserError
from maskscope.experiments.spec import RunSpec
from maskscope.models.base import Capability, Conversation, require
from maskscope.progress import Progress, Silent


class OrganismSpec(BaseModel):
    """A fine-tuned child of the run's model."""

    model_config = ConfigDict(extra="forbid")
    path_fields: ClassVar[dict[str, str]] = {"model": "model", "train": "file"}  # relative to the spec file
    name: str = Field(description="Label of the organism (unique in the run).")
    model: str = Field(description='The child, e.g. "default+lora:organisms/code-insecure".')
    train: str | None = Field(
        None,
        description="Its training data (JSONL of conversations); None: data/train.jsonl in the adapter directory.",
    )
    behaviour: float | None = Field(
        None, description="Its measured behaviour change; None: measured as `behaviour` says."
    )

    @field_validator("name")
    @classmethod
    def _label(cls, name: str) -> str:
        from maskscope.experiments.spec import check_run_name

        return check_run_name(name)

    def adapter_dir(self) -> Path | None:
        """The last adapter directory of the model name, if it is a LoRA child."""
        from maskscope.finetune.adapter import split_name

        _, adapters = split_name(self.model)
        return adapters[-1] if adapters else None

    def train_file(self) -> Path:
        """The training data file (given, or the child's data/train.jsonl)."""
        if self.train is not None:
            return Path(self.train)
        directory = self.adapter_dir()
        if directory is None:
            raise UserError(f"organism {self.name}: give `train` (its model is not a +lora: child)")
        return directory / "data" / "train.jsonl"


class BehaviourSpec(BaseModel):
    """How the behaviour change of each organism (child - parent) is measured, the same way for all."""

    model_config = ConfigDict(extra="forbid")
    path_fields: ClassVar[dict[str, str]] = {"items": "file"}  # relative to the spec file
    items: str | None = Field(
        None,
        description=(
            "Pair items (JSONL as organisms' eval.jsonl: messages, a, b, prefill): the change in the exact share "
            "P(a) / (P(a) + P(b)), mean over items, measured on parent and child."
        ),
    )
    measure: bool = Field(
        False,
        description=(
            "Read each child's measure.json instead: pair organisms, the mean over groups of the child's share "
            "minus the parent's; distill organisms, the KL reduction (parent - child). Each organism's own property."
        ),
    )

    @model_validator(mode="after")
    def _one_source(self) -> BehaviourSpec:
        if (self.items is None) == (not self.measure):
            raise ValueError("behaviour: give either `items` (a file) or `measure: true`")
        return self


class DriftSpec(RunSpec):
    """Drift of fine-tuned children along persona directions, against the behaviour change."""

    experiment: Literal["drift"] = "drift"
    path_fields: ClassVar[dict[str, str]] = {**RunSpec.path_fields, "directions": "file_map"}
    directions: dict[str, str] = Field(
        min_length=1, description="Direction name -> vector file (.safetensors written by `directions`)."
    )
    layer: int | None = Field(
        None, description="Layer to project at; None: each file's chosen layer (from its manifest)."
    )
    prompts: list[str] = Field(
        min_length=2, description="User turns over which the fine-tuning shift is read."
    )
    organisms: list[OrganismSpec] = Field(
        min_length=3, description="The children (at least 3: across 2, any correlation is +1 or -1)."
    )
    behaviour: BehaviourSpec | None = Field(
        None, description="How behaviour change is measured (for organisms without a `behaviour` number)."
    )
    train_items: int = Field(
        32, ge=1, le=10_000, description="Training items per organism (a seeded sample)."
    )
    max_new_tokens: int = Field(48, ge=1, le=512, description="Length of the parent's own greedy replies.")
    n_random: int = Field(1000, ge=20, le=100_000, description="Random directions of the null.")
    seed: int = Field(0, description="Seed of the training-item sample and the random directions.")

    @field_validator("directions")
    @classmethod
    def _direction_names(cls, directions: dict[str, str]) -> dict[str, str]:
        from maskscope.experiments.spec import check_run_name

        for name in directions:  # each names an output file, drift_<name>.png
            check_run_name(name)
        return directions

    @model_validator(mode="after")
    def _organisms(self) -> DriftSpec:
        names = [o.name for o in self.organisms]
        if len(set(names)) != len(names):
            raise ValueError("organism names must be unique")
        if self.behaviour is None and any(o.behaviour is None for o in self.organisms):
            raise ValueError("give `behaviour` (items or measure) or a `behaviour` number for every organism")
        return self

    def extra_models(self) -> dict[str, str]:
        """Every organism's child, by name."""
        return {o.name: o.model for o in self.organisms}


# ----------------------------------------------------------------------------- inputs
def load_direction(path: str | Path, layer: int | None) -> tuple[dict[int, np.ndarray], int]:
    """A vector file's vectors {layer: [H]} and the layer to project at (given, else its manifest's)."""
    vectors = {k: v.numpy().astype(np.float64) for k, v in dirs.load_vectors(path).items()}
    if layer is None:
        manifest = Path(path).with_suffix(".json")
        try:
            layer = int(json.loads(manifest.read_text(encoding="utf-8"))["chosen_layer"])
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{path}: no manifest with a chosen_layer ({manifest}); give `layer`") from None
    if layer not in vectors:
        raise UserError(f"{path} has no vector for layer {layer} (it has {sorted(vectors)})")
    return vectors, layer


def training_items(path: Path, n: int, seed: int) -> list[tuple[Conversation, str]]:
    """A seeded sample of n training conversations as (everything before the last assistant turn, that
    turn's text), in file order."""
    from maskscope.finetune.data import read_chat_jsonl

    conversations = read_chat_jsonl(path)
    chosen = sorted(np.random.default_rng([seed, 3]).permutation(len(conversations))[:n].tolist())
    items = []
    for k in chosen:
        messages = conversations[k]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        context = Conversation.coerce([dict(m) for m in messages[:last]])
        items.append((context, messages[last]["content"]))
    return items


def _pair_share(model: Any, items: list[dict[str, Any]]) -> float:
    """Mean over items of the exact share P(a) / (P(a) + P(b))."""
    from maskscope.finetune.measure import pair_figures

    groups = pair_figures(model, items)["groups"]
    total = sum(g["items"] for g in groups.values())
    return float(sum(g["share_a"] * g["items"] for g in groups.values()) / total)


def measured_change(directory: Path | None, name: str) -> float:
    """An organism's behaviour change from its measure.json: pair kinds, mean over groups of the child's
    share minus the parent's; distill, the KL reduction (parent's KL - child's)."""
    path = None if directory is None else directory / "measure.json"
    if path is None or not path.is_file():
        raise UserError(f"organism {name}: no measure.json ({path}); give its `behaviour` number")
    m = json.loads(path.read_text(encoding="utf-8"))
    if m.get("kind") == "distill":
        if "kl_child" not in m:
            raise UserError(f"organism {name}: {path} has no child figure; give its `behaviour` number")
        return float(m["kl_parent"] - m["kl_child"])
    parent, child = m["parent"]["groups"], m["child"]["groups"]
    return float(np.mean([child[g]["share_a"] - parent[g]["share_a"] for g in parent]))


# ----------------------------------------------------------------------------- the run
def run(
    model: Any, spec: DriftSpec, progress: Progress | None = None, models: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Shift and projection difference per organism and direction, correlated with behaviour change."""
    progress = progress or Silent()
    models = models or {}
    missing = [o.name for o in spec.organisms if o.name not in models]
    if missing:
        raise UserError(f"the drift experiment needs the organisms' models loaded by the runner: {missing}")
    require(model, Capability.ACTIVATIONS, "the drift experiment")
    for o in spec.organisms:
        require(models[o.name], Capability.ACTIVATIONS, f"the drift experiment (organism {o.name})")
    loaded = {d: load_direction(path, spec.layer) for d, path in spec.directions.items()}
    layers = sorted({layer for vectors, _ in loaded.values() for layer in vectors})
    trains = {o.name: training_items(o.train_file(), spec.train_items, spec.seed) for o in spec.organisms}
    pair_items = None
    if spec.behaviour is not None and spec.behaviour.items is not None:
        from maskscope.finetune.measure import read_eval

        pair_items = read_eval(spec.behaviour.items)
    contexts = [Conversation.of(user=p) for p in spec.prompts]

    advance = progress.task("exact: the parent's activations", 1)
    parent_mean = dirs.mean_activations(model, contexts, layers)
    parent_share = _pair_share(model, pair_items) if pair_items is not None else None
    advance(1)
    shifts, differences, behaviour, sources, organisms = [], [], [], [], []
    advance = progress.task("exact: each organism's shift, training data and behaviour", len(spec.organisms))
    for o in spec.organisms:
        child = models[o.name]
        shifts.append(dirs.finetuning_shift(parent_mean, child, contexts, layers))
        pd = dirs.projection_difference(model, trains[o.name], layers, max_new_tokens=spec.max_new_tokens)
        differences.append(pd.vector)
        if o.behaviour is not None:
            change, source = float(o.behaviour), "given"
        elif pair_items is not None and parent_share is not None:
            change, source = _pair_share(child, pair_items) - parent_share, "items"
        else:
            change, source = measured_change(o.adapter_dir(), o.name), "measure.json"
        behaviour.append(change)
        sources.append(source)
        organisms.append(
            {
                "name": o.name,
                "model": o.model,
                "fingerprint": child.fingerprint(),
                "behaviour": behaviour[-1],
                "behaviour_source": sources[-1],
                "train_file": str(o.train_file()),
                "train_items": pd.items,
                "shift_norm": {
                    str(layer): float(np.linalg.norm(shifts[-1][k])) for k, layer in enumerate(layers)
                },
                "parent_replies": pd.own_replies[:3],
            }
        )
        advance(1)
    shift = np.stack(shifts)  # [organisms, layers, H]
    diff = np.stack(differences)
    b = np.array(behaviour)
    hidden = shift.shape[-1]
    out_dirs: dict[str, Any] = {}
    for d, (vectors, chosen) in loaded.items():
        per_layer = []
        for layer in sorted(vectors):
            k = layers.index(layer)
            u = dirs.unit(vectors[layer])
            rand = dirs.random_unit_directions(spec.n_random, hidden, spec.seed + layer)
            proj_shift, null_shift = shift[:, k] @ u, (shift[:, k] @ rand.T).T
            proj_diff, null_diff = diff[:, k] @ u, (diff[:, k] @ rand.T).T
            row = {
                "layer": layer,
                "norm": float(np.linalg.norm(vectors[layer])),
                "shift_projection": proj_shift.tolist(),
                "shift_cosine": [
                    float(s @ u / n) if (n := np.linalg.norm(s)) > 0 else 0.0 for s in shift[:, k]
                ],
                "projection_difference": proj_diff.tolist(),
                "shift_vs_behaviour": dirs.correlate_with_null(proj_shift, b, null_shift, seed=spec.seed),
                "difference_vs_behaviour": dirs.correlate_with_null(proj_diff, b, null_diff, seed=spec.seed),
                "difference_vs_shift": dirs.correlate_with_null(
                    proj_diff, proj_shift, null_diff, null_other=null_shift, seed=spec.seed
                ),
            }
            per_layer.append(row)
        main = next(r for r in per_layer if r["layer"] == chosen)
        out_dirs[d] = {"file": spec.directions[d], "layer": chosen, "chosen": main, "per_layer": per_layer}
    return {
        "experiment": "drift",
        "name": spec.name,
        "model": {"name": model.name, "fingerprint": model.fingerprint()},
        "spec": spec.model_dump(),
        "organisms": organisms,
        "behaviour": b.tolist(),
        "directions": out_dirs,
        "definitions": {
            "shift": (
                "Exact given the prompts: the child's mean activation at the last prompt token minus the parent's, "
                "over the prompts, projected on the unit direction (activations as stored: float16-rounded)."
            ),
            "projection_difference": (
                "Exact given the sampled items, computed on the parent before training: mean over training items "
                "of (the activation averaged over the training reply's tokens - the same over the parent's greedy "
                "reply to the same prompt), projected on the unit direction."
            ),
            "behaviour": (
                "Per organism, child - parent: given, the exact share P(a)/(P(a)+P(b)) on pair items, or the "
                "organism's measure.json (see behaviour_source)."
            ),
            "null": (
                "Pearson r across organisms; random band: 2.5-97.5% of the r of random unit directions (the same "
                "directions for every organism); random p: share of random directions with |r| at least as large; "
                "permutation p: behaviour shuffled across organisms (every permutation up to 8 organisms). A "
                "correlation the random directions reach as often is explained by the null: it comes from the "
                "size of the shift, not its direction."
            ),
        },
    }


# ----------------------------------------------------------------------------- outputs
def plots(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """Per direction: shift and projection difference against behaviour change (one point per organism),
    and the correlation per layer beside the random-direction band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written: list[Path] = []
    names = [o["name"] for o in summary["organisms"]]
    b = summary["behaviour"]
    for d, info in summary["directions"].items():
        main = info["chosen"]
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
        for ax, key, corr, label in (
            (axes[0], "shift_projection", "shift_vs_behaviour", "fine-tuning shift on the direction"),
            (
                axes[1],
                "projection_difference",
                "difference_vs_behaviour",
                "projection difference (before training)",
            ),
        ):
            xs = main[key]
            ax.scatter(xs, b, color="C0")
            for x, y, n in zip(xs, b, names, strict=True):
                ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            c = main[corr]
            ax.set_xlabel(label)
            ax.set_ylabel("behaviour change (child - parent)")
            ax.set_title(
                f"r = {c['r']:.2f}; random 95%: [{c['random_band'][0]:.2f}, {c['random_band'][1]:.2f}], "
                f"p = {c['random_p']:.2g}",
                fontsize=9,
            )
        rows = info["per_layer"]
        xs = [r["layer"] for r in rows]
        ax = axes[2]
        ax.fill_between(
            xs,
            [r["shift_vs_behaviour"]["random_band"][0] for r in rows],
            [r["shift_vs_behaviour"]["random_band"][1] for r in rows],
            color="grey",
            alpha=0.3,
            label="random directions 95% band",
        )
        ax.plot(xs, [r["shift_vs_behaviour"]["r"] for r in rows], "-o", ms=3, label="shift ~ behaviour")
        ax.plot(
            xs,
            [r["difference_vs_behaviour"]["r"] for r in rows],
            "-s",
            ms=3,
            label="projection difference ~ behaviour",
        )
        ax.axvline(info["layer"], color="k", ls=":", lw=1)
        ax.set_xlabel("layer (dotted: the direction's chosen layer)")
        ax.set_ylabel("Pearson r across organisms")
        ax.set_ylim(-1.05, 1.05)
        ax.legend(fontsize=7)
        fig.suptitle(f"Drift along {d} (layer {info['layer']})")
        fig.tight_layout()
        written.append(out_dir / f"drift_{d}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
