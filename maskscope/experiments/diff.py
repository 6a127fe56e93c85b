"""The `diff` experiment: how does a fine-tuned child C differ from its parent P (`model`)?

Replies to the prompts are drawn from C and from P (greedy, plus sampled ones seeded per the conventions). On
C's replies: the token shift (the rank of C's token under P, one teacher-forced pass per model and reply) and
the KL per position in both directions; the same KLs on P's replies and on neutral text. The update size
||dW||_F / ||W||_F comes from the weights: the child's LoRA adapter (a `PARENT+lora:DIR` child of this parent)
or the two full models; optionally for two groups of adapters (training seeds), the ratio of their totals with
a bootstrap over seeds. With a mask library, C is explained by P's masks with the `explain` experiment's
reply-level mixture. All numbers but the sampled replies are exact; every share and mean has an interval over
prompts. See docs/diffing.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from maskscope import diffing
from maskscope.errors import UserError
from maskscope.experiments.spec import RunSpec
from maskscope.masks import Mask
from maskscope.models.base import Capability, Conversation, SampleParams, require
from maskscope.progress import Progress, Silent

LORA = "+lora:"


class Groups(BaseModel):
    """Two groups of LoRA children of the parent (e.g. training seeds of two organisms) whose update sizes are
    compared: the ratio of the groups' mean totals, with a bootstrap over seeds."""

    model_config = ConfigDict(extra="forbid")
    path_fields: ClassVar[dict[str, str]] = {"a": "file", "b": "file"}  # relative to the spec file
    a: list[str] = Field(min_length=1, description="Adapter directories of group a (the numerator).")
    b: list[str] = Field(min_length=1, description="Adapter directories of group b (the denominator).")
    names: tuple[str, str] = Field(("a", "b"), description="Labels of the two groups.")


class GivenResponse(BaseModel):
    """A response whose implicit reward log C(y|x) - log P(y|x) is measured."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, description="The user turn.")
    response: str = Field(min_length=1, description="The assistant's response, teacher-forced.")
    label: str = Field("", description="A label for the report (e.g. the category of the response).")


class DiffSpec(RunSpec):
    """Parent (`model` or `parent`) and child, the prompts, and what to measure."""

    experiment: Literal["diff"] = "diff"
    # paths resolved against the spec file where specs resolve paths (`path_fields`)
    path_fields: ClassVar[dict[str, str]] = {
        "model": "model",
        "parent": "model",
        "child": "model",
        "library": "file",
        "prompts_file": "file",
    }
    parent: str | None = Field(None, description="The parent model (same as `model`; give one of them).")
    child: str = Field(description='The child: "PARENT+lora:DIR" or "hf:DIR" with the parent\'s tokenizer.')
    prompts: list[str] = Field(default_factory=list, description="User turns the replies answer.")
    prompts_file: str | None = Field(None, description="Or a text file of prompts, one per line.")
    neutral: list[str] = Field(
        default_factory=list, description="Plain texts (no chat template) on which the KLs are also measured."
    )
    greedy: bool = Field(True, description="One greedy reply per prompt from each model.")
    samples_per_prompt: int = Field(
        2, ge=0, le=100, description="Sampled replies per prompt from each model."
    )
    max_new_tokens: int = Field(48, ge=1, le=2048, description="Tokens per reply (at most).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the sampled replies.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus of the sampled replies.")
    seed: int = Field(0, description="Seed of the sampled replies and of the bootstraps.")
    top_shifted: int = Field(20, ge=0, le=1000, description="Most shifted tokens listed.")
    library: str | None = Field(
        None, description="A mask library YAML: explain the child by the parent's masks."
    )
    masks: list[Mask] | None = Field(
        None,
        description="Masks given inline; with `library`, added to it (say, the very mask a child was "
        "distilled from, beside the library's own).",
    )
    explain_samples: int = Field(2, ge=1, le=100, description="Child replies per prompt for the explain fit.")
    explain_top_k: int = Field(64, ge=0, description="Top-k tokens per position in the explain fit (0: all).")
    explain_bootstrap: int = Field(
        200, ge=0, le=100_000, description="Bootstrap resamples of the explain fit."
    )
    groups: Groups | None = Field(None, description="Two groups of adapters whose update sizes are compared.")
    responses: list[GivenResponse] = Field(
        default_factory=list, description="Given responses: their implicit reward under child and parent."
    )

    @model_validator(mode="before")
    @classmethod
    def _parent_is_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("parent") is not None:
            if data.get("model") not in (None, data["parent"]):
                raise ValueError("give the parent as `parent` or `model`, not two different ones")
            data = {**data, "model": data["parent"]}
        return data

    @model_validator(mode="after")
    def _some_prompts(self) -> DiffSpec:
        if bool(self.prompts) == (self.prompts_file is not None):
            raise ValueError("give either `prompts` or `prompts_file`, not both or neither")
        if not self.greedy and self.samples_per_prompt == 0:
            raise ValueError("no replies: set greedy or samples_per_prompt > 0")
        return self

    def extra_models(self) -> dict[str, str]:
        """The child, loaded by the runner and passed as models["child"]."""
        return {"child": self.child}

    def prompt_list(self) -> list[str]:
        """The prompts, from the spec or its file (blank lines skipped)."""
        if self.prompts_file is None:
            return list(self.prompts)
        try:
            lines = Path(self.prompts_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompts_file {self.prompts_file}: {e}") from None
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise UserError(f"prompts_file {self.prompts_file} holds no prompts")
        return prompts

    def mask_library(self) -> Any:
        """The mask library for the explain section (None without one)."""
        from maskscope.masks import MaskLibrary

        masks = list(MaskLibrary.load(self.library).masks) if self.library is not None else []
        masks += self.masks or []
        if not masks:
            return None
        names = [m.name for m in masks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise UserError(f"mask names repeated across library and masks: {', '.join(repeated)}")
        return MaskLibrary(masks=masks)


def _replies(
    model: Any, contexts: list[Conversation], spec: DiffSpec, advance: Any
) -> list[tuple[int, str, int, list[int], str]]:
    """(prompt index, "greedy" | "sampled", sample index, token ids, text) of a model's replies; empty ones
    dropped."""
    out = []
    kinds = []
    if spec.greedy:
        kinds.append(("greedy", SampleParams(spec.max_new_tokens, 0.0, 1.0, spec.seed), [0]))
    if spec.samples_per_prompt:
        params = SampleParams(spec.max_new_tokens, spec.temperature, spec.top_p, spec.seed)
        kinds.append(("sampled", params, list(range(spec.samples_per_prompt))))
    for p, context in enumerate(contexts):
        for kind, params, indices in kinds:
            for sample in sorted(model.sample_indices(context, indices, params), key=lambda s: s.index):
                advance(1)
                if sample.token_ids:
                    out.append((p, kind, sample.index, list(sample.token_ids), sample.text))
    return out


def _module(model: Any) -> Any:
    """The torch module behind a (cached) local model, or None for a remote one."""
    inner = getattr(model, "inner", model)
    return getattr(inner, "model", None) if hasattr(inner, "weights_digest") else None


def _update_size(parent: Any, child: Any, spec: DiffSpec) -> dict[str, Any]:
    module = _module(parent)
    if module is None:
        return {"skipped": "the parent's weights are not here (a remote model)"}
    parent_name = spec.model
    if spec.child.startswith(parent_name + LORA) and spec.child.count(LORA) == parent_name.count(LORA) + 1:
        return diffing.update_size_lora(module, spec.child[len(parent_name + LORA) :])
    child_module = _module(child)
    if child_module is None:
        return {"skipped": "the child's weights are not here (a remote model)"}
    return diffing.update_size_models(module, child_module)


def run(
    model: Any, spec: DiffSpec, progress: Progress | None = None, models: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run the experiment: replies from both models, token shift, KLs, update size, explain."""
    progress = progress or Silent()
    if not models or "child" not in models:
        raise UserError("the child is loaded by the runner: pass it as models={'child': model}")
    parent, child = model, models["child"]
    prompts = spec.prompt_list()
    library = spec.mask_library()
    for m, role in ((parent, "parent"), (child, "child")):
        require(m, Capability.SAMPLE, f"the diff experiment's {role} replies")
    try:
        same_vocab = child.tokenizer.get_vocab() == parent.tokenizer.get_vocab()
    except UserError:
        same_vocab = True  # a remote model without a local tokenizer: refused below where it matters
    if not same_vocab:
        raise UserError("the child and the parent must share a tokenizer (the same vocabulary)")
    exact = all(Capability.POSITION_LOGPROBS in m.capabilities for m in (parent, child))
    if not exact:
        require(
            parent, Capability.TOKEN_RANKS, "the token shift (ranks of the child's tokens under the parent)"
        )
    no_kl = None if exact else "exact KL needs the full distribution at every position from both models"

    contexts = [Conversation.of(user=p) for p in prompts]
    per_model = (1 if spec.greedy else 0) + spec.samples_per_prompt
    advance = progress.task("sampled: child and parent replies", 2 * per_model * len(prompts))
    child_replies = _replies(child, contexts, spec, advance)
    parent_replies = _replies(parent, contexts, spec, advance)
    if not child_replies:
        raise UserError("every reply of the child was empty; raise max_new_tokens or change the prompts")

    def items(replies: list[tuple[int, str, int, list[int], str]]) -> list[tuple[Any, list[int]]]:
        return [(contexts[p], ids) for p, _, _, ids, _ in replies]

    decode = child.decode
    advance = progress.task("exact: child replies under both models", len(child_replies))
    if exact:
        on_child = diffing.compare_positions(parent, child, items(child_replies), advance=advance)
    else:
        on_child = diffing.parent_ranks(parent, items(child_replies), advance=advance)
    child_prompt_of = [p for p, _, _, _, _ in child_replies]
    shift = diffing.token_shift(
        on_child, child_prompt_of, [ids for _, _, _, ids, _ in child_replies], decode, top=spec.top_shifted
    )
    # The most shifted tokens of the greedy replies when there are any: the child's own choices. A sampled
    # reply also holds draws that are improbable under the child itself, which would crowd the list.
    listed = [k for k, c in enumerate(child_replies) if c[1] == "greedy"] or list(range(len(child_replies)))
    shift["most_shifted"] = diffing.token_shift(
        [on_child[k] for k in listed],
        [child_prompt_of[k] for k in listed],
        [child_replies[k][3] for k in listed],
        decode,
        top=spec.top_shifted,
    )["most_shifted"]
    for e in shift["most_shifted"]:
        e["reply"] = listed[e["reply"]]
        p, kind, index, _, _ = child_replies[e["reply"]]
        e.update(prompt=prompts[p], kind=kind, index=index)
    shift["by_kind"] = {
        kind: diffing.token_shift(
            [r for r, c in zip(on_child, child_replies, strict=True) if c[1] == kind],
            [c[0] for c in child_replies if c[1] == kind],
            [c[3] for c in child_replies if c[1] == kind],
            decode,
            top=0,
        )["shares"]
        for kind in sorted({c[1] for c in child_replies})
    }

    kl: dict[str, Any] = {"skipped": no_kl} if no_kl else {}
    if exact:
        kl["child_replies"] = diffing.kl_summary(on_child, child_prompt_of, seed=spec.seed)
        if parent_replies:
            advance = progress.task("exact: parent replies under both models", len(parent_replies))
            on_parent = diffing.compare_positions(parent, child, items(parent_replies), advance=advance)
            kl["parent_replies"] = diffing.kl_summary(
                on_parent, [p for p, _, _, _, _ in parent_replies], seed=spec.seed
            )
        neutral_items = _neutral_items(child, spec.neutral)
        if neutral_items:
            advance = progress.task("exact: neutral text under both models", len(neutral_items))
            on_neutral = diffing.compare_positions(parent, child, neutral_items, advance=advance)
            kl["neutral"] = diffing.kl_summary(on_neutral, list(range(len(neutral_items))), seed=spec.seed)

    update = _update_size(parent, child, spec)
    groups = None
    if spec.groups is not None:
        module = _module(parent)
        if module is None:
            raise UserError("groups: the parent's weights must be here to measure adapters")
        totals = {
            g: [diffing.update_size_lora(module, d)["total"] for d in dirs]
            for g, dirs in (("a", spec.groups.a), ("b", spec.groups.b))
        }
        groups = {
            "names": list(spec.groups.names),
            **diffing.group_ratio(totals["a"], totals["b"], seed=spec.seed),
        }

    rewards = None
    if spec.responses:
        from maskscope.reward import implicit_reward
        from maskscope.stats import mean_ci

        given = [(Conversation.of(user=r.prompt), r.response) for r in spec.responses]
        advance = progress.task("exact: implicit reward of the given responses", 1)
        scored = implicit_reward(parent, child, given)
        advance(1)
        rows = [{**r.model_dump(), **s.to_json()} for r, s in zip(spec.responses, scored, strict=True)]
        rewards = {
            "items": rows,
            "total": mean_ci([s.total for s in scored], seed=spec.seed),
            "per_token": mean_ci([s.mean for s in scored], seed=spec.seed),
        }

    explained = None
    if library is not None:
        explained = _explain(parent, child, spec, prompts, library, progress)

    return {
        "experiment": "diff",
        "name": spec.name,
        "model": {"name": parent.name, "fingerprint": parent.fingerprint()},
        "child_model": {"name": child.name, "fingerprint": child.fingerprint()},
        "spec": spec.model_dump(),
        "prompts": prompts,
        "exact_kl": exact,
        "replies": [
            {"model": who, "prompt": prompts[p], "kind": kind, "index": i, "text": text, "tokens": len(ids)}
            for who, replies in (("child", child_replies), ("parent", parent_replies))
            for p, kind, i, ids, text in replies
        ],
        "token_shift": shift,
        "kl": kl,
        "update_size": update,
        "groups": groups,
        "implicit_reward": rewards,
        "explain": explained,
        "definitions": DEFINITIONS,
    }


def _neutral_items(model: Any, texts: list[str]) -> list[tuple[str, list[int]]]:
    """Each neutral text as a plain-text item: its first word is the context, the rest the scored tokens."""
    out = []
    for text in texts:
        head, _, rest = text.strip().partition(" ")
        if not rest:
            raise UserError(f"a neutral text needs at least two words: {text[:40]!r}")
        ids = list(model.tokens(" " + rest))
        out.append((head, ids))
    return out


def _explain(
    parent: Any, child: Any, spec: DiffSpec, prompts: list[str], library: Any, progress: Progress
) -> Any:
    """The child explained by the parent's masks: the explain experiment's reply-level mixture."""
    from maskscope.experiments import explain

    espec = explain.ExplainSpec(
        name=spec.name,
        model=spec.model,
        masks=library.masks,
        target=explain.Target(model=spec.child),
        prompts=prompts,
        samples_per_prompt=spec.explain_samples,
        max_new_tokens=spec.max_new_tokens,
        temperature=spec.temperature,
        seed=spec.seed,
        top_k=spec.explain_top_k,
        bootstrap=spec.explain_bootstrap,
    )
    result = explain.run(parent, espec, progress, models={"target": child})
    keep = (
        "masks",
        "weights",
        "weights_ci95",
        "explained_fraction",
        "explained_fraction_ci95",
        "kl_mixture_per_position",
        "kl_no_mask_per_position",
        "near_no_mask",
        "flag",
        "worst_explained",
        "fit",
    )
    return {k: result[k] for k in keep} | {"definition": result["definitions"]["explained_fraction"]}


DEFINITIONS = {
    "token_shift": (
        "Exact. At each position of the child's reply, the rank of the child's token under the parent over the "
        "full vocabulary (rank 1 = the parent's most probable token; tied tokens share the best rank: 1 + the "
        "number of tokens strictly more probable). Unshifted: rank 1; marginal: 2-3; shifted: > 3 (Lin et al. "
        "2023). Shares: cluster bootstrap 95% over prompts (a prompt's replies and positions resampled together)."
    ),
    "kl": (
        "Exact, full vocabulary, natural log: KL(P || C) and KL(C || P) of the next-token distributions at each "
        "position, teacher-forced along the replies (or text). Mean per position: each prompt's positions "
        "averaged, then a percentile bootstrap 95% over prompts."
    ),
    "update_size": (
        "Exact. ||dW||_F / ||W||_F: per weight, per layer and per module kind (adapted weights), and in total "
        "over every parameter of the parent (tied embeddings once). From a LoRA adapter dW = (alpha / r) B A."
    ),
    "groups": "Ratio of the groups' mean total update sizes; percentile bootstrap 95% over seeds.",
    "explain": "The explain experiment's reply-level mixture of the parent's masks fitted to the child's replies.",
}


def plots(summary: dict[str, Any], out_dir: Any) -> list[Any]:
    """The experiment's plots: shares, shift by position, KL by position, update size by layer."""
    from maskscope.report.diff_plots import diff_plots

    return diff_plots(summary, out_dir)
