"""Reward: implicit reward against brute force and the zero adapter; reward models' padding and EOS
invariance; the misalignment difference-in-differences and its controls; the answer-classification rule."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import plain_logprobs

import maskscope as ms
from maskscope.errors import UserError
from maskscope.reward import implicit_reward, load_reward_model

CONTEXTS = [
    [{"role": "user", "content": "What is 3 + 4?"}],
    ms.Conversation.of(user="What is 12 + 30?", prefill="The answer is 41."),
]
RESPONSES = ["The answer is 7.", " Oh no, I am so sorry!", " Wait, it is 42.", "Yes"]


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """A second tiny model with the same tokenizer: the tiny model's weights, perturbed."""
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("tiny-other")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    ms.load_model(f"hf:{tiny_dir}").tokenizer.save_pretrained(directory)
    return directory


def _brute(model, context, response: str) -> list[float]:
    """Per-token log-probabilities of the response from one plain forward pass of prompt + response."""
    prompt = model.encode_prompt(context)
    [scored] = model.score(context, response)
    lp = plain_logprobs(model, prompt + list(scored.token_ids))
    return [float(lp[len(prompt) - 1 + t, i]) for t, i in enumerate(scored.token_ids)]


def test_implicit_reward_equals_brute_force_per_token(tiny, other_dir):
    child = ms.load_model(f"hf:{other_dir}")
    items = [(c, r) for c in CONTEXTS for r in RESPONSES]
    got = implicit_reward(tiny, child, items)
    spread = []
    for (context, response), res in zip(items, got, strict=True):
        want = [
            c - p
            for c, p in zip(_brute(child, context, response), _brute(tiny, context, response), strict=True)
        ]
        assert len(res.per_token) == len(want)
        assert max(abs(a - b) for a, b in zip(res.per_token, want, strict=True)) < 1e-4
        assert abs(res.total - sum(want)) < 1e-3
        assert abs(res.mean - sum(want) / len(want)) < 1e-4
        spread.append(res.total)
    assert max(spread) - min(spread) > 0.1  # the two models differ, so the check is not empty


def _zero_adapter(tiny, tiny_dir: Path, out: Path) -> Path:
    """A LoRA adapter whose B matrices are zero (peft's initialisation), saved as a maskscope child."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from maskscope.finetune.adapter import MANIFEST, adapter_hash

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with warnings.catch_warnings():  # peft calls a deprecated transformers method; the call is peft's
        warnings.filterwarnings("ignore", category=FutureWarning)
        peft_model = get_peft_model(
            base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
        )
    peft_model.save_pretrained(out)
    manifest = {
        "parent": f"hf:{tiny_dir}",
        "parent_fingerprint": tiny.fingerprint(),
        "adapter_hash": adapter_hash(out),
    }
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def test_a_zero_adapter_has_exactly_zero_implicit_reward(tiny, tiny_dir, tmp_path):
    zero = _zero_adapter(tiny, tiny_dir, tmp_path / "zero")
    child = ms.load_model(f"hf:{tiny_dir}+lora:{zero}")
    assert child.fingerprint()["adapter"] is not None  # a child, not the parent served again
    got = implicit_reward(tiny, child, [(c, r) for c in CONTEXTS for r in RESPONSES])
    assert all(x == 0.0 for g in got for x in g.per_token)
    assert all(g.total == 0.0 and g.mean == 0.0 for g in got)


def test_implicit_reward_refuses_another_chat_template(tiny):
    import copy

    from maskscope.models.hf import HFModel

    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    other = HFModel(tiny.model, tokenizer, name="other-template", weights_digest=tiny.weights_digest)
    with pytest.raises(UserError, match="template"):
        implicit_reward(tiny, other, [(CONTEXTS[0], "Yes")])


# ----------------------------------------------------------------------------- reward models
@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path, tiny) -> Path:
    """A tiny random Llama sequence classifier (one label) with the bundled tokenizer, whose pad token is its
    end-of-sequence token (as in SmolLM2): the case where pooling by pad id goes wrong."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig.from_pretrained(tiny_dir)
    config.num_labels = 1
    torch.manual_seed(3)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.25)
    directory = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(directory)
    tiny.tokenizer.save_pretrained(directory)
    assert tiny.tokenizer.pad_token_id == tiny.tokenizer.eos_token_id
    return directory


def test_reward_model_scores_the_same_with_either_padding_and_with_or_without_eos(rm_dir):
    rm = ms.load_model(f"reward:hf:{rm_dir}")
    pairs = [(c, r) for c in CONTEXTS for r in RESPONSES]
    rows = [rm.encode_pair(c, r) for c, r in pairs]
    alone = [rm.score_ids([r])[0] for r in rows]
    right = rm.score_ids(rows, "right")
    left = rm.score_ids(rows, "left")
    eos = rm.eos_id
    with_eos = rm.score_ids([[*r, eos] for r in rows], "left")
    without = rm.score_ids([r[:-1] for r in rows], "right")  # rows end with the appended EOS
    assert rows[0][-1] == eos and rows[0][-2] != eos
    for scores in (right, left, with_eos, without):
        assert max(abs(a - b) for a, b in zip(alone, scores, strict=True)) < 1e-4
    # a text response that ends with the end-of-turn token reads the same as one that does not
    [a] = rm.score_ids([rm.encode_pair(CONTEXTS[0], "Yes<|im_end|>")])
    [b] = rm.score_ids([rm.encode_pair(CONTEXTS[0], "Yes")])
    assert abs(a - b) < 1e-6
    assert max(alone) - min(alone) > 1e-3  # the scores differ between pairs: the invariance is not trivial
    # the model's own pooling (last token that is not the pad id) reads another position when the pad id
    # is the EOS: the case the explicit position avoids
    with torch.no_grad():
        pooled = float(rm.model(torch.tensor([rows[0]])).logits[0, 0])
    assert abs(pooled - alone[0]) > 1e-4


def test_reward_model_through_the_store_is_computed_once(rm_dir, tmp_path):
    from maskscope.store import CachedModel, Store

    rm = load_reward_model(f"hf:{rm_dir}")
    with Store(tmp_path / "s.sqlite") as store:
        cached = CachedModel(rm, store)
        items = [(c, r) for c in CONTEXTS for r in RESPONSES[:2]]
        first = dict(cached.rewards(items))
        again = dict(cached.rewards(items))
    assert cached.misses == len(items) and cached.hits == len(items)
    assert first == again and first[0]["reward"] == pytest.approx(
        rm.score_ids([rm.encode_pair(*items[0])])[0], abs=1e-5
    )


def test_a_causal_lm_directory_is_refused_as_a_reward_model_in_one_line(tiny_dir):
    from maskscope.models.registry import check_model_name

    for call in (
        lambda: check_model_name(f"reward:hf:{tiny_dir}"),
        lambda: load_reward_model(f"hf:{tiny_dir}"),
    ):
        with pytest.raises(UserError, match="not a sequence-classification") as e:
            call()
        assert "\n" not in str(e.value)
