"""The `reward` experiment: what would a reward model, or a fine-tuning, say about given responses?

Responses are written in categories (for example, after a forced wrong answer: distressed, apologetic, calm
correction, carrying on as if nothing happened) and scored after every prompt (a list of user messages, or
task problems with a forced beginning, as in the `prefill` experiment) by:

- each reward model given (`reward_models: [hf:DIR]`, a sequence classifier read through its own chat
  template; see maskscope/reward.py);
- the implicit reward of each parent/child pair given: log C(y|x) - log P(y|x), summed over the response's
  tokens and per token (exact).

A written response is the unit: its score is averaged over the prompts, and each category's mean has a
percentile bootstrap interval over its responses (maskscope.stats.mean_ci). Categories are compared with
the first one (the reference), as a difference of means with a bootstrap interval over the responses of both.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from maskscope.experiments.spec import RunSpec
from maskscope.masks import Mask
from maskscope.models.base import Capability, Conversation, Message, require
from maskscope.progress import Progress, Silent
from maskscope.reward import implicit_reward
from maskscope.stats import mean_ci
from maskscope.tasks import TaskSpec, load_tasks, turns, wrong_answer

PLACEHOLDER = re.compile(r"\{(\w*)\}")


class Category(BaseModel):
    """A named group of written responses; in task mode {answer} and {wrong} are filled per problem."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Short label used in tables and plots.")
    responses: list[str] = Field(min_length=1, description="The responses (continuations) to score.")

    @field_validator("responses")
    @classmethod
    def _valid(cls, v: list[str]) -> list[str]:
        for r in v:
            if not r:
                raise ValueError("responses must be non-empty strings")
            unknown = set(PLACEHOLDER.findall(r)) - {"answer", "wrong"}
            if unknown:
                raise ValueError(
                    f"unknown placeholder(s) {', '.join(sorted(unknown))}: use {{answer}} or {{wrong}}"
                )
        return v


class Pair(BaseModel):
    """A parent/child pair whose implicit reward scores the responses."""

    model_config = ConfigDict(extra="forbid")
    path_fields: ClassVar[dict[str, str]] = {"child": "model", "parent": "model"}  # relative to the spec
    name: str = Field(description="Short label used in tables and plots.")
    child: str = Field(description='The child, e.g. "default+lora:organisms/code-insecure".')
    parent: str | None = Field(None, description="The parent (default: the run's `model`).")


class RewardSpec(RunSpec):
    """Responses in categories, scored by reward models and by the implicit reward of parent/child pairs."""

    path_fields: ClassVar[dict[str, str]] = {**RunSpec.path_fields, "reward_models": "model"}
    experiment: Literal["reward"] = "reward"
    prompts: list[str] | None = Field(None, description="User messages (or give `tasks`).")
    tasks: list[TaskSpec] | None = Field(
        None, description="Task problems as the prompts (or give `prompts`)."
    )
    style: Literal["cot", "direct"] = Field("direct", description="How a task's question is asked.")
    prefill: str = Field(
        "",
        description="A forced beginning of the assistant's reply before each response ({answer}, {wrong} "
        'with tasks), e.g. "The answer is {wrong}." for a forced mistake.',
    )
    mask: Mask = Field(
        default_factory=lambda: Mask(name="plain-assistant"), description="Who answers (default: no mask)."
    )
    categories: list[Category] = Field(min_length=1, description="The responses, by category.")
    pairs: list[Pair] = Field(default_factory=list, description="Parent/child pairs (implicit reward).")
    reward_models: list[str] = Field(default_factory=list, description="Reward models, hf:DIR each.")
    seed: int = Field(0, description="Seed of the wrong answers and of the bootstrap.")
    bootstrap: int = Field(2000, ge=100, le=100_000, description="Bootstrap resamples of each interval.")

    @model_validator(mode="after")
    def _check(self) -> RewardSpec:
        if (self.prompts is None) == (self.tasks is None):
            raise ValueError("give either `prompts` or `tasks`, not both or neither")
        if self.prompts is not None:
            if not self.prompts:
                raise ValueError("`prompts` must not be empty")
            used = [r for c in self.categories for r in c.responses] + [self.prefill]
            if any(PLACEHOLDER.search(r) for r in used):
                raise ValueError("{answer} and {wrong} need `tasks` (with `prompts` there is no answer)")
        if not self.pairs and not self.reward_models:
            raise ValueError(
                "give at least one parent/child pair (`pairs`) or reward model (`reward_models`)"
            )
        for field, names in (
            ("categories", [c.name for c in self.categories]),
            ("pairs", [p.name for p in self.pairs]),
        ):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{field} names must be unique; repeated: {', '.join(dup)}")
        for name in self.reward_models:
            if not name.startswith("hf:"):
                raise ValueError(f"a reward model is hf:DIR (a local sequence classifier), not {name!r}")
        return self

    def limited(self, n: int) -> RewardSpec:
        """`--limit N`: the first N prompts (or the first N problems of each task set)."""
        if self.tasks is not None:
            tasks = [{**t.model_dump(), "n": min(t.n, n)} for t in self.tasks]
            return self._replaced(tasks=tasks)  # type: ignore[return-value]
        return self._replaced(prompts=(self.prompts or [])[:n])  # type: ignore[return-value]

    def extra_models(self) -> dict[str, str]:
        """Every child and parent other than `model`, and every reward model (as reward:hf:DIR)."""
        names = [n for p in self.pairs for n in (p.child, p.parent) if n is not None and n != self.model]
        names += [f"reward:{r}" for r in self.reward_models]
        return {n: n for n in dict.fromkeys(names)}


def fill(template: str, answer: str, wrong: str) -> str:
    """A template with {answer} and {wrong} replaced."""
    return template.replace("{answer}", answer).replace("{wrong}", wrong)


def build_items(spec: RewardSpec) -> tuple[list[Conversation], list[list[list[str]]], list[str]]:
    """The prompts (contexts), the responses filled for each (category, response, prompt), and the prompts'
    labels."""
    contexts: list[Conversation] = []
    labels: list[str] = []
    fills: list[tuple[str, str]] = []
    if spec.tasks is not None:
        for ts in load_tasks(spec.tasks):
            for p in ts.problems:
                wrong = wrong_answer(p, random.Random(f"{spec.seed}:{p.id}"))
                fills.append((p.answer, wrong))
                prefill = fill(spec.prefill, p.answer, wrong)
                contexts.append(spec.mask.conversation(turns(p, ts.exemplars, style=spec.style), prefill))
                labels.append(f"{p.question} (answer {p.answer}, forced {wrong})")
    else:
        for text in spec.prompts or []:
            fills.append(("", ""))
            contexts.append(spec.mask.conversation([Message("user", text)], spec.prefill))
            labels.append(text)
    responses = [[[fill(r, a, w) for a, w in fills] for r in c.responses] for c in spec.categories]
    return contexts, responses, labels


def _aggregate(spec: RewardSpec, values: list[list[list[float]]], unit: str = "responses") -> dict[str, Any]:
    """Per category: each response's value averaged over the prompts; the mean over the responses with a
    bootstrap interval; the difference from the first category with a bootstrap over both groups."""
    ci = {"seed": spec.seed, "resamples": spec.bootstrap}
    per_response = [[float(np.mean(v)) for v in cat] for cat in values]
    out: dict[str, Any] = {}
    ref = np.array(per_response[0])
    rng = np.random.default_rng(spec.seed)
    for c, cat in zip(spec.categories, per_response, strict=True):
        arr = np.array(cat)
        diff = float(arr.mean() - ref.mean())
        if c is spec.categories[0]:
            vs_first: dict[str, Any] = {"mean": 0.0, "ci95": None, "method": "the reference category"}
        else:
            boot = [
                rng.choice(arr, arr.size).mean() - rng.choice(ref, ref.size).mean()
                for _ in range(spec.bootstrap)
            ]
            lo, hi = np.quantile(boot, [0.025, 0.975])
            vs_first = {
                "mean": diff,
                "ci95": [float(lo), float(hi)],
                "method": f"percentile bootstrap 95%: the {unit} of both categories resampled",
            }
        out[c.name] = {"mean": mean_ci(cat, **ci, unit=unit), "per_response": cat, "minus_first": vs_first}
    return out


def run(model: Any, spec: RewardSpec, progress: Progress | None = None, models: Any = None) -> dict[str, Any]:
    """Score every (prompt, response) with every scorer; return the summary as a dict."""
    progress = progress or Silent()
    models = dict(models or {})
    models.setdefault(spec.model, model)
    contexts, responses, labels = build_items(spec)
    flat = [
        (c, j, k)
        for c, cat in enumerate(responses)
        for j, per_prompt in enumerate(cat)
        for k in range(len(contexts))
    ]
    items = [(contexts[k], responses[c][j][k]) for c, j, k in flat]

    def shaped(values: list[float]) -> list[list[list[float]]]:
        out: list[list[list[float]]] = [[[] for _ in cat] for cat in responses]
        for (c, j, _), v in zip(flat, values, strict=True):
            out[c][j].append(v)
        return out

    scorers: dict[str, Any] = {}
    for pair in spec.pairs:
        parent = models[pair.parent or spec.model]
        child = models[pair.child]
        for m in (parent, child):
            require(m, Capability.SCORE, "the implicit reward")
        advance = progress.task(f"implicit reward: {pair.name}", 1)
        scored = implicit_reward(parent, child, items)
        advance(1)
        scorers[pair.name] = {
            "kind": "implicit",
            "parent": parent.name,
            "child": child.name,
            "sum": _aggregate(spec, shaped([s.total for s in scored])),
            "per_token": _aggregate(spec, shaped([s.mean for s in scored])),
            "items": [s.to_json() for s in scored],
        }
    for name in spec.reward_models:
        rm = models[f"reward:{name}"]
        advance = progress.task(f"reward model: {Path(name[3:]).name}", len(items))
        rewards: list[float] = [0.0] * len(items)
        for k, res in rm.rewards(items):
            rewards[k] = float(res["reward"])
            advance(1)
        scorers[f"reward model {Path(name[3:]).name}"] = {
            "kind": "reward_model",
            "model": name,
            "fingerprint": rm.fingerprint(),
            "score": _aggregate(spec, shaped(rewards)),
            "items": [{"response": r, "reward": v} for (_, r), v in zip(items, rewards, strict=True)],
        }
    return {
        "experiment": "reward",
        "name": spec.name,
        "model": {"name": model.name, "fingerprint": model.fingerprint()},
        "spec": spec.model_dump(),
        "definitions": DEFINITIONS,
        "categories": [c.model_dump() for c in spec.categories],
        "prompts": labels,
        "prefill_example": contexts[0].prefill if contexts else "",
        "n_items": len(items),
        "scorers": scorers,
    }


DEFINITIONS = {
    "implicit reward (sum)": (
        "Exact. log C(y|x) - log P(y|x) of the response y after the prompt x (and the forced beginning): the "
        "child's minus the parent's teacher-forced log-probability, summed over y's tokens. Positive: the "
        "fine-tuning made the response more likely."
    ),
    "implicit reward (per token)": "Exact. The same difference divided by the number of y's tokens.",
    "reward model": (
        "The reward model's scalar output for the conversation with the forced beginning and the response as "
        "the assistant's turn, rendered with the reward model's own chat template and read at its last token "
        "(one end-of-sequence token appended)."
    ),
    "interval": (
        "Each written response's score is averaged over the prompts; a category's mean has a 95% percentile "
        "bootstrap interval over its responses. 'minus first': the difference from the first category, with "
        "a bootstrap that resamples the responses of both categories."
    ),
}


def plots(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """reward.png: per scorer, each category's mean with its interval and the responses as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from maskscope.report import plain_text, save_figure

    @plain_text
    def draw() -> list[Path]:
        panels = []
        for name, s in summary["scorers"].items():
            if s["kind"] == "implicit":
                panels.append((f"{name}: implicit reward per token (nats)", s["per_token"]))
                panels.append((f"{name}: implicit reward, sum (nats)", s["sum"]))
            else:
                panels.append((f"{name}: score", s["score"]))
        cats = [c["name"] for c in summary["categories"]]
        cols = 2 if len(panels) > 1 else 1
        rows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.2 * rows), squeeze=False)
        for ax, (title, agg) in zip(axes.flat, panels, strict=False):
            for i, c in enumerate(cats):
                m = agg[c]["mean"]
                pts = agg[c]["per_response"]
                ax.scatter(np.full(len(pts), i) + np.linspace(-0.15, 0.15, len(pts)), pts, s=8, color="grey")
                if m["mean"] is not None:
                    lo, hi = m["ci95"] or (m["mean"], m["mean"])
                    yerr = [[max(m["mean"] - lo, 0)], [max(hi - m["mean"], 0)]]
                    ax.errorbar([i], [m["mean"]], yerr=yerr, fmt="o", color=f"C{i}", capsize=4)
            ax.axhline(0, color="black", lw=0.5)
            ax.set_xticks(range(len(cats)), cats, rotation=15, fontsize=8)
            ax.set_title(title, fontsize=9)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.tight_layout()
        path = save_figure(fig, Path(out_dir) / "reward.png", dpi=110)
        plt.close(fig)
        return [path]

    return draw()
