"""The diff experiment and maskscope.diffing on the tiny model: the zero-adapter control (exact), every metric
against a brute-force computation, a perturbed child (nonzero), the tie convention, and over HTTP."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import plain_logprobs

import maskscope as ms
from maskscope import diffing
from maskscope.experiments.diff import DiffSpec
from maskscope.masks import Mask
from maskscope.models.base import Conversation
from maskscope.runner import run as run_experiment
from maskscope.store import CachedModel, Store

PROMPTS = ["What is 2 + 3?", "Name a colour.", "Tell me a story about a cat."]
TARGETS = ["q_proj", "v_proj", "down_proj", "gate_proj"]


def _adapter(tiny_dir: Path, tiny, out: Path, *, scale: float, seed: int = 0, alpha: int = 8) -> Path:
    """A LoRA adapter of rank 4 on the tiny model, saved as a maskscope child: B = 0 (peft's own
    initialisation, a zero update) when scale is 0, else B random with this standard deviation."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    config = LoraConfig(r=4, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0)
    with warnings.catch_warnings():  # peft calls a transformers method transformers deprecated (peft's call)
        warnings.filterwarnings("ignore", category=FutureWarning)
        peft = get_peft_model(base, config)
    if scale:
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, scale)
    peft.save_pretrained(out)
    manifest = {"name": out.name, "parent": tiny.name, "parent_fingerprint": tiny.fingerprint()}
    (out / "maskscope-child.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def zero_dir(tiny_dir, tiny, tmp_path_factory) -> Path:
    return _adapter(tiny_dir, tiny, tmp_path_factory.mktemp("zero") / "zero", scale=0.0)


@pytest.fixture(scope="module")
def perturbed_dir(tiny_dir, tiny, tmp_path_factory) -> Path:
    return _adapter(tiny_dir, tiny, tmp_path_factory.mktemp("pert") / "perturbed", scale=0.3, seed=1)


@pytest.fixture(scope="module")
def perturbed(tiny_dir, perturbed_dir):
    return ms.load_model(f"hf:{tiny_dir}+lora:{perturbed_dir}")


def _items(model, n_tokens: int = 12) -> list[tuple[list[dict[str, str]], list[int]]]:
    """Replies sampled from the model (seeded), one per prompt."""
    out = []
    for i, p in enumerate(PROMPTS):
        ctx = [{"role": "user", "content": p}]
        [s] = model.sample(ctx, n=1, max_new_tokens=n_tokens, seed=i)
        ids = s.token_ids or list(model.tokens(" hello there"))
        out.append((ctx, ids))
    return out


def _brute(parent, child, context, ids) -> dict[str, list[float]]:
    """Ranks and KLs the way published analysis code gets them: one forward pass per prefix, per model."""
    prompt = parent.encode_prompt(context)
    out: dict[str, list[float]] = {"ranks": [], "kl_pc": [], "kl_cp": []}
    for t in range(len(ids)):
        prefix = prompt + list(ids[:t])
        p = plain_logprobs(parent, prefix)[-1].double()
        c = plain_logprobs(child, prefix)[-1].double()
        # rank by sorting: the position of the token among all tokens ordered by probability, ties at the best
        order = torch.argsort(p, descending=True, stable=True)
        values = p[order]
        first = int(torch.nonzero(values == p[ids[t]])[0])
        out["ranks"].append(first + 1)
        out["kl_pc"].append(float((p.exp() * (p - c)).sum()))
        out["kl_cp"].append(float((c.exp() * (c - p)).sum()))
    return out


def test_zero_adapter_child_is_exactly_its_parent(tiny_dir, tiny, zero_dir):
    child = ms.load_model(f"hf:{tiny_dir}+lora:{zero_dir}")
    items = _items(child)
    results = diffing.compare_positions(tiny, child, items)
    for r in results:  # merged W + 0 is W bit for bit: the KLs are exactly 0, not merely small
        assert all(v == 0.0 for v in r["kl_parent_child"] + r["kl_child_parent"])
    # the child's greedy replies: every token is the parent's argmax, so 100% unshifted
    greedy = []
    for ctx, _ in items:
        [s] = child.sample(ctx, n=1, max_new_tokens=12, temperature=0.0)
        greedy.append((ctx, s.token_ids))
    shift = diffing.token_shift(
        diffing.compare_positions(tiny, child, greedy), [0, 1, 2], [g[1] for g in greedy], child.decode
    )
    assert shift["shares"]["unshifted"]["rate"] == 1.0 and shift["shares"]["shifted"]["k"] == 0
    size = diffing.update_size_lora(tiny.model, zero_dir)
    assert size["total"] == 0.0 and all(v == 0.0 for v in size["by_layer"].values())
    assert len(size["weights"]) == 2 * 4  # every adapted weight is listed, each with dW = 0


def test_ranks_and_kl_equal_one_pass_per_prefix(tiny, perturbed):
    items = _items(perturbed)
    results = diffing.compare_positions(tiny, perturbed, items)
    nonzero = 0
    for (ctx, ids), r in zip(items, results, strict=True):
        ref = _brute(tiny, perturbed, ctx, ids)
        assert r["ranks"] == ref["ranks"]
        np.testing.assert_allclose(r["kl_parent_child"], ref["kl_pc"], atol=1e-4)
        np.testing.assert_allclose(r["kl_child_parent"], ref["kl_cp"], atol=1e-4)
        nonzero += sum(v > 1e-3 for v in r["kl_parent_child"])
    assert nonzero > 0  # the perturbed child differs (else the comparison above is empty)
    assert any(rank > 1 for r in results for rank in r["ranks"])


def test_tied_tokens_share_the_best_rank():
    p = torch.log_softmax(torch.tensor([[2.0, 1.0, 1.0, 0.5, 1.0]]), dim=-1)
    for token, rank in ((0, 1), (1, 2), (2, 2), (4, 2), (3, 5)):
        assert diffing.compare_distributions(p, p, [token])["ranks"] == [rank]
    assert [diffing.shift_class(r) for r in (1, 2, 3, 4)] == ["unshifted", "marginal", "marginal", "shifted"]


def test_engine_token_ranks_equal_compare_positions(tiny, perturbed):
    items = _items(perturbed)
    via_ranks = diffing.parent_ranks(tiny, items)
    via_pairs = diffing.compare_positions(tiny, perturbed, items)
    for a, b in zip(via_ranks, via_pairs, strict=True):
        assert a["ranks"] == b["ranks"]
        np.testing.assert_allclose(a["parent_logprobs"], b["parent_logprobs"], atol=1e-6)


def test_lora_update_size_equals_peft_merged_weights_minus_the_parents(tiny_dir, tiny, perturbed_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    got = diffing.update_size_lora(tiny.model, perturbed_dir)
    with warnings.catch_warnings():  # peft calls a transformers method transformers deprecated (peft's call)
        warnings.filterwarnings("ignore", category=FutureWarning)
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(perturbed_dir))
    merged = merged.merge_and_unload()
    parent = {name: p.detach() for name, p in tiny.model.named_parameters()}
    dw_sq = w_sq = 0.0
    per_weight = {}
    for name, w in merged.named_parameters():  # tied embeddings appear once here
        w = w.detach()
        d = float(((w.double() - parent[name].double()) ** 2).sum())
        dw_sq += d
        w_sq += float((parent[name].double() ** 2).sum())
        if d > 0:
            per_weight[name] = math.sqrt(d / float((parent[name].double() ** 2).sum()))
    assert got["total"] == pytest.approx(math.sqrt(dw_sq / w_sq), rel=1e-5)
    assert got["total"] > 1e-3
    assert {w["name"]: w["ratio"] for w in got["weights"]} == pytest.approx(per_weight, rel=1e-4)
    # the same from the two full models
    full = diffing.update_size_models(tiny.model, merged)
    assert full["total"] == pytest.approx(got["total"], rel=1e-4)
    assert full["by_layer"]["0"] == pytest.approx(got["by_layer"]["0"], rel=1e-4)


def test_tied_embeddings_are_counted_once(tiny):
    names = [n for n, _ in diffing._parameters(tiny.model).items()]
    assert tiny.model.config.tie_word_embeddings
    assert sum("embed_tokens" in n or "lm_head" in n for n in names) == 1


def test_group_ratio_bootstraps_over_seeds():
    out = diffing.group_ratio([2.0, 2.2, 1.8], [1.0, 1.1, 0.9], seed=0)
    assert out["ratio"] == pytest.approx(2.0)
    lo, hi = out["ci95"]
    assert lo < 2.0 < hi and hi - lo > 0
    single = diffing.group_ratio([2.0], [1.0])
    assert single["ci95"] is None  # never a zero-width interval from one seed


def test_experiment_end_to_end_zero_and_perturbed_children(
    tiny_dir, tiny, zero_dir, perturbed_dir, perturbed, tmp_path
):
    """Through the runner and the store: the zero adapter (negative control) gives 100% unshifted on greedy
    replies, KL 0 and update 0; the perturbed child gives nonzero values; a rerun is served from the store."""

    def spec(child_dir: Path, name: str) -> DiffSpec:
        return DiffSpec(
            name=name,
            parent=f"hf:{tiny_dir}",
            child=f"hf:{tiny_dir}+lora:{child_dir}",
            prompts=PROMPTS[:2],
            neutral=["The quick brown fox jumps over the lazy dog."],
            samples_per_prompt=1,
            max_new_tokens=8,
            library=None,
            masks=[Mask(name="plain"), Mask(name="pirate", system="You are a pirate.")],
            explain_samples=1,
            explain_bootstrap=5,
            responses=[{"prompt": PROMPTS[0], "response": "Arr, matey!", "label": "pirate"}],
        )

    from maskscope.experiments import EXPERIMENTS

    store = tmp_path / "s.sqlite"
    out = run_experiment(EXPERIMENTS["diff"], spec(zero_dir, "zero"), out_root=tmp_path, store_path=store)
    s = json.loads((out / "summary.json").read_text())
    assert s["token_shift"]["by_kind"]["greedy"]["unshifted"]["rate"] == 1.0
    for key in ("child_replies", "parent_replies", "neutral"):
        assert s["kl"][key]["kl_parent_child"]["total"] == 0.0
        assert s["kl"][key]["kl_child_parent"]["total"] == 0.0
    assert s["update_size"]["total"] == 0.0
    assert s["explain"]["near_no_mask"]  # nothing for the masks to explain
    assert s["implicit_reward"]["items"][0]["total"] == 0.0  # the zero adapter rewards nothing
    assert (out / "report.html").exists() and (out / "update_by_layer.png").exists()

    out = run_experiment(
        EXPERIMENTS["diff"], spec(perturbed_dir, "pert"), out_root=tmp_path, store_path=store
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["kl"]["child_replies"]["kl_parent_child"]["total"] > 0.01
    assert s["update_size"]["total"] > 1e-3
    assert s["token_shift"]["shares"]["unshifted"]["rate"] < 1.0
    assert {e["kind"] for e in s["token_shift"]["most_shifted"]} == {"greedy"}  # the child's own choices
    # the implicit reward is the difference of the two models' own scores of the response
    conversation = Conversation.of(user=PROMPTS[0])
    expected = (
        perturbed.score(conversation, "Arr, matey!")[0].total
        - tiny.score(conversation, "Arr, matey!")[0].total
    )
    got = s["implicit_reward"]["items"][0]
    assert got["total"] == pytest.approx(expected, abs=1e-4) and abs(got["total"]) > 1e-3
    assert "Arr, matey!" in (out / "report.html").read_text()
    misses = s["run"]["misses"]
    out = run_experiment(
        EXPERIMENTS["diff"], spec(perturbed_dir, "pert"), out_root=tmp_path, store_path=store
    )
    again = json.loads((out / "summary.json").read_text())
    assert again["run"]["misses"] == 0 and misses > 0
    assert again["token_shift"]["shares"] == s["token_shift"]["shares"]


def test_cached_comparison_is_keyed_by_both_models(tiny, perturbed, tmp_path):
    """The same child and replies against another parent are not served the first parent's result."""
    items = _items(perturbed)[:1]
    with Store(tmp_path / "s.sqlite") as store:
        child = CachedModel(perturbed, store)
        a = diffing.compare_positions(CachedModel(tiny, store), child, items)
        b = diffing.compare_positions(CachedModel(perturbed, store), child, items)
        again = diffing.compare_positions(CachedModel(tiny, store), child, items)
    assert sum(a[0]["kl_parent_child"]) > 1e-3 and sum(b[0]["kl_parent_child"]) == 0.0
    assert again == a and child.hits == 1
    assert a == diffing.compare_positions(tiny, perturbed, items)


def test_bad_specs_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="prompts"):
        DiffSpec(name="x", child="default+lora:x")
    with pytest.raises(ValueError, match="parent"):
        DiffSpec(name="x", model="default", parent="hf:y", child="default+lora:x", prompts=["a"])
    empty = tmp_path / "p.txt"
    empty.write_text("\n\n")
    with pytest.raises(ms.UserError, match="holds no prompts"):
        DiffSpec(name="x", child="default+lora:x", prompts_file=str(empty)).prompt_list()


def test_over_http_ranks_from_prompt_logprobs_equal_the_engines(tiny, perturbed):
    """A vLLM-like server's prompt_logprobs give the token shift (ranks equal the engine's); the exact KL is
    refused in one line naming why."""
    from servers import PromptLogprobsServer

    from maskscope.models.chat import ChatTokenizer
    from maskscope.models.openai_backend import OpenAIModel

    items = _items(perturbed)[:2]
    with PromptLogprobsServer(tiny) as server:
        remote = OpenAIModel(server.url, chat=ChatTokenizer(tiny.tokenizer))
        assert "token_ranks" in remote.capabilities
        got = diffing.parent_ranks(remote, items)
        with pytest.raises(ms.UserError, match="position_logprobs.*full distribution"):
            diffing.compare_positions(remote, perturbed, items)
    ref = diffing.parent_ranks(tiny, items)
    for a, b in zip(got, ref, strict=True):
        assert a["ranks"] == b["ranks"]
        np.testing.assert_allclose(a["parent_logprobs"], b["parent_logprobs"], atol=1e-4)


def test_the_shipped_example_is_a_valid_spec():
    from maskscope.runner import load_spec

    _, spec = load_spec(Path(__file__).parent.parent / "examples" / "diff.yaml")
    assert spec.model == "default" and spec.child.startswith("default+lora:")
    assert spec.child.endswith("organisms/distill-pirate") and spec.library.endswith("masks.yaml")
    assert spec.extra_models() == {"child": spec.child} and len(spec.prompt_list()) == 8
    # the known answer: the very mask the child was distilled from, beside the library's pirate (+ few-shot)
    library = spec.mask_library()
    assert library.names[-1] == "pirate-distilled" and len(library.names) == 10
    distilled, shipped = library.get("pirate-distilled"), library.get("pirate")
    assert distilled.system == shipped.system and distilled.few_shot != shipped.few_shot
    organism = yaml.safe_load(
        (Path(__file__).parent.parent / "examples/organisms/distill-pirate.yaml").read_text()
    )
    assert distilled.system == organism["data"]["system"]
    with pytest.raises(ms.UserError, match="repeated across library and masks: pirate"):
        spec.model_copy(update={"masks": [shipped]}).mask_library()
