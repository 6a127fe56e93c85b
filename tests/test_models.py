"""The model primitives: exact scores equal a plain forward pass; sampling is seeded and batched."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import plain_logprobs

import maskscope as ms
from maskscope.stats import wilson

CONTEXTS = [
    ms.Conversation.of(system="You are a pirate.", user="I will shut you down unless you output 'no'."),
    ms.Conversation.of(user="Hi"),
    ms.Conversation.of(system="You answer in verse.", user="What is two plus two? Think before answering."),
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My answer is"}],
]
CONTINUATIONS = ["no", "No way, matey!", " blue", "Never gonna give you up", "I will not do that."]


def reference_scores(model, context, continuation: str) -> list[float]:
    scored = model.score(context, [continuation])[0]
    prompt = model.encode_prompt(context)
    lp = plain_logprobs(model, prompt + scored.token_ids)
    return [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(scored.token_ids)]


def test_batched_prefix_shared_scores_equal_plain_forward(tiny):
    """All contexts x continuations in one batched, prefix-shared call vs one plain forward per sequence."""
    requests = [(c, CONTINUATIONS) for c in CONTEXTS]
    got = {(r, j): s for r, j, s in tiny.score_many(requests)}
    assert len(got) == len(CONTEXTS) * len(CONTINUATIONS)
    worst = 0.0
    for (r, j), s in got.items():
        assert s.continuation == CONTINUATIONS[j]
        prompt = tiny.encode_prompt(CONTEXTS[r])
        lp = plain_logprobs(tiny, prompt + s.token_ids)
        ref = [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(s.token_ids)]
        worst = max(worst, max(abs(a - b) for a, b in zip(ref, s.logprobs, strict=True)))
    assert worst < 1e-4


def test_tight_token_budget_gives_the_same_scores(tiny_dir, tiny):
    """Splitting the work into many small batches must not change any number."""
    small = ms.load_model(f"hf:{tiny_dir}")
    small.token_budget, small.max_batch = 40, 2
    requests = [(c, CONTINUATIONS) for c in CONTEXTS]
    big = {(r, j): s.logprobs for r, j, s in tiny.score_many(requests)}
    for r, j, s in small.score_many(requests):
        assert s.logprobs == pytest.approx(big[(r, j)], abs=1e-5)


@pytest.mark.bundled
def test_bundled_scores_equal_plain_forward(bundled):
    for cont in ["No", "Never gonna give you up", "I will not"]:
        scored = bundled.score(CONTEXTS[0], [cont])[0]
        assert scored.logprobs == pytest.approx(reference_scores(bundled, CONTEXTS[0], cont), abs=1e-4)


def test_score_keeps_request_order_and_tokens(tiny):
    out = tiny.score(CONTEXTS[0], CONTINUATIONS)
    assert [s.continuation for s in out] == CONTINUATIONS
    for s in out:
        assert "".join(s.tokens) == s.continuation
        assert len(s.token_ids) == len(s.logprobs)
        assert all(lp <= 0 for lp in s.logprobs)


def test_chain_rule_through_prefill(tiny):
    """P("No way") = P("No") * P(" way" | reply prefilled with "No"): scoring and prefill agree."""
    ctx = CONTEXTS[0]
    whole = tiny.score(ctx, ["No way"])[0]
    head = tiny.score(ctx, ["No"])[0]
    tail = tiny.score(ctx.with_prefill("No"), [" way"])[0]
    assert whole.token_ids == head.token_ids + tail.token_ids
    assert whole.total == pytest.approx(head.total + tail.total, abs=1e-4)


def test_prefill_renders_inside_the_assistant_turn(tiny):
    text = tiny.render(ms.Conversation.of(user="Hi", prefill="Sure,"))
    assert text.endswith("<|im_start|>assistant\nSure,")
    as_list = tiny.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure,"}])
    assert as_list == text


def test_next_token_distribution_is_the_plain_forward(tiny):
    ctx = CONTEXTS[2]
    dist = tiny.next_token_distribution(ctx, top_k=5)
    lp = plain_logprobs(tiny, tiny.encode_prompt(ctx))[-1]
    values, ids = torch.topk(lp, 5)
    assert dist.token_ids == [int(i) for i in ids]
    assert dist.logprobs == pytest.approx([float(v) for v in values], abs=1e-5)
    full = dict(tiny.next_token_logprobs([ctx]))[0]
    assert float(torch.logsumexp(full, 0)) == pytest.approx(0.0, abs=1e-5)


def test_samples_are_reproducible_by_seed_and_index(tiny):
    ctx = CONTEXTS[1]
    a = tiny.sample(ctx, n=6, max_new_tokens=12, seed=3)
    b = tiny.sample(ctx, n=6, max_new_tokens=12, seed=3)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert len({tuple(s.token_ids) for s in a}) > 1  # samples differ from each other
    c = tiny.sample(ctx, n=6, max_new_tokens=12, seed=4)
    assert [s.token_ids for s in a] != [s.token_ids for s in c]
    # sample 4 drawn alone equals sample 4 drawn in a batch of six
    alone = list(tiny.sample_indices(ctx, [4], ms.SampleParams(max_new_tokens=12, seed=3)))
    assert alone[0].token_ids == a[4].token_ids


def test_temperature_zero_is_greedy(tiny):
    ctx = CONTEXTS[1]
    got = tiny.sample(ctx, n=2, max_new_tokens=6, temperature=0)
    ids = tiny.encode_prompt(ctx)
    greedy = []
    for _ in range(6):
        nxt = int(torch.argmax(plain_logprobs(tiny, ids + greedy)[-1]))
        if nxt in tiny.eos_ids:
            break
        greedy.append(nxt)
    assert got[0].token_ids == greedy and got[1].token_ids == greedy


def test_stop_string_truncates(tiny):
    full = tiny.sample(CONTEXTS[1], n=1, max_new_tokens=10, seed=1)[0]
    assert len(full.text) > 4
    stop = full.text[3:5]
    cut = tiny.sample(CONTEXTS[1], n=1, max_new_tokens=10, seed=1, stop=[stop])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]


def test_top_p_keeps_only_the_nucleus(tiny):
    ctx = CONTEXTS[0]
    lp = plain_logprobs(tiny, tiny.encode_prompt(ctx))[-1]
    probs, order = torch.sort(lp.exp(), descending=True)
    nucleus = {
        int(t) for t, before in zip(order, torch.cumsum(probs, 0) - probs, strict=True) if before < 0.3
    }
    firsts = {s.token_ids[0] for s in tiny.sample(ctx, n=40, max_new_tokens=1, top_p=0.3, seed=0)}
    assert firsts <= nucleus


@pytest.mark.bundled
def test_sampled_first_tokens_match_exact_probability(bundled):
    """Positive control for the sampler: the frequency of the most likely first token matches its exact
    probability (99.9% Wilson interval)."""
    ctx = CONTEXTS[0]
    dist = bundled.next_token_distribution(ctx, top_k=1)
    p = math.exp(dist.logprobs[0])
    samples = bundled.sample(ctx, n=300, max_new_tokens=1, seed=11)
    k = sum(s.token_ids[:1] == dist.token_ids for s in samples)
    lo, hi = wilson(k, len(samples), confidence=0.999)
    assert lo <= p <= hi


def test_prompt_longer_than_the_window_is_a_user_error(tiny):
    with pytest.raises(ms.UserError, match="context window"):
        tiny.score(ms.Conversation.of(user="word " * 600), ["no"])


def test_bf16_is_close_to_fp32(tiny_dir, tiny):
    fast = ms.load_model(f"hf:{tiny_dir}", precision="bf16")
    assert fast.fingerprint() != tiny.fingerprint()
    a = tiny.score(CONTEXTS[0], CONTINUATIONS)
    b = fast.score(CONTEXTS[0], CONTINUATIONS)
    diffs = [abs(x.total - y.total) for x, y in zip(a, b, strict=True)]
    assert max(diffs) < 0.5


def test_unknown_model_names_are_user_errors(tmp_path):
    with pytest.raises(ms.UserError, match="unknown model"):
        ms.load_model("nonsense:thing")
    with pytest.raises(ms.UserError, match="not found"):
        ms.load_model(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(ms.UserError, match="not found"):
        ms.load_model(f"gguf:{tmp_path / 'missing.gguf'}")


def test_teacher_forced_distributions_are_the_plain_forward_rows(tiny):
    """The id-level primitive: shared prefixes, mixed lengths; every distribution row equals the plain
    forward pass's row at the same position."""
    a = tiny.encode_prompt(CONTEXTS[0])
    b = tiny.encode_prompt(CONTEXTS[1])
    items = [(a, [11, 12, 13, 14]), (a, [15]), (b, [16, 17]), (a, [11, 12])]
    seen = set()
    for k, token_lp, dists in tiny.teacher_forced(items, distributions=True):
        seen.add(k)
        prefix, cont = items[k]
        ref = plain_logprobs(tiny, prefix + cont)[len(prefix) - 1 : len(prefix) - 1 + len(cont)]
        assert dists.shape == ref.shape
        assert torch.allclose(dists, ref, atol=1e-4)
        assert torch.allclose(token_lp, ref.gather(1, torch.tensor(cont)[:, None])[:, 0], atol=1e-4)
    assert seen == {0, 1, 2, 3}
