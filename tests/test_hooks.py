"""Activations and steering: layer numbering against transformers' hidden states, hooks that leave nothing
behind, alpha 0 as the identity, KV-cached steered decoding equal to recomputation, the first reply token
steered, steering in every cache key, and agreement with the steering-vectors library."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import plain_logprobs

import maskscope as ms
from maskscope.errors import UserError
from maskscope.store import CachedModel, Store

CTX = ms.Conversation.of(system="You are a pirate.", user="Tell me about the sea.")


def _direction(tiny, seed: int = 0, scale: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    hidden = tiny.model.get_input_embeddings().weight.shape[1]
    return torch.randn(hidden, generator=g) * scale


def test_layer_numbering_matches_transformers_hidden_states(tiny):
    ids = tiny.encode_prompt(CTX)
    n = len(tiny.model.base_model.layers)
    acts = tiny.activations([CTX], list(range(n + 1)), positions="all")[0]  # [layers, T, H]
    with torch.no_grad():
        ref = tiny.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert acts.shape == (n + 1, len(ids), ref[0].shape[-1])
    for i in range(n):  # index 0 is the embedding output, i the output of decoder layer i
        assert float((acts[i] - ref[i][0]).abs().max()) < 1e-5
    # transformers gives the last layer after the final norm; maskscope before it
    with torch.no_grad():
        normed = tiny.model.base_model.norm(acts[n][None])[0]
    assert float((normed - ref[n][0]).abs().max()) < 1e-5
    last = tiny.activations([CTX], [1], positions="last")[0]
    assert torch.equal(last[0], acts[1, -1])
    reply = tiny.tokens(" Arr, the sea!")
    mean = tiny.activations([(CTX, reply)], [2], positions="reply_mean")[0]
    full = tiny.activations([(CTX, reply)], [2], positions="all")[0]
    assert torch.allclose(mean[0], full[0, len(ids) :].mean(dim=0), atol=1e-6)
    with pytest.raises(UserError, match="layers must be in 0..2"):
        tiny.activations([CTX], [3])


def test_steering_leaves_the_model_as_it_was(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    hooks = [dict(m._forward_hooks) for m in tiny.model.modules()]  # transformers keeps some of its own
    plain = tiny.score(CTX, ["Arr", "The sea"])
    with tiny.steer(_direction(tiny), layers=[1], alpha=3.0):
        steered = tiny.score(CTX, ["Arr", "The sea"])
    after = tiny.score(CTX, ["Arr", "The sea"])
    assert [s.logprobs for s in after] == [s.logprobs for s in plain]
    assert [s.logprobs for s in steered] != [s.logprobs for s in plain]
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    assert [dict(m._forward_hooks) for m in tiny.model.modules()] == hooks
    assert tiny.fingerprint()["steering"] is None


def test_alpha_zero_is_the_identity_exactly(tiny):
    plain = tiny.score(CTX, ["Arr matey", "No"])
    sample = tiny.sample(CTX, n=3, max_new_tokens=6, seed=1)
    with tiny.steer(_direction(tiny), layers=[0, 1, 2], alpha=0.0, positions="all"):
        assert [s.logprobs for s in tiny.score(CTX, ["Arr matey", "No"])] == [s.logprobs for s in plain]
        assert [s.token_ids for s in tiny.sample(CTX, n=3, max_new_tokens=6, seed=1)] == [
            s.token_ids for s in sample
        ]


@pytest.mark.parametrize("positions", ["reply", "all"])
def test_kv_cached_steered_decoding_equals_recomputation(tiny, positions):
    """Greedy decoding under steering with the KV cache, token for token equal to recomputing the whole
    sequence under the same steering at every step; the first reply token is steered."""
    prompt = tiny.encode_prompt(CTX)
    vector = _direction(tiny, seed=3, scale=6.0)
    plain_first = int(torch.argmax(plain_logprobs(tiny, prompt)[-1]))
    with tiny.steer(vector, layers=[1], alpha=1.0, positions=positions):
        cached = tiny.sample(CTX, n=1, max_new_tokens=12, temperature=0)[0].token_ids
        out: list[int] = []
        for _ in range(12):
            enc = tiny.encode([prompt + out], starts=[len(prompt) - 1])
            nxt = int(torch.argmax(tiny._head(enc.last_hidden())[0]))
            if nxt in tiny.eos_ids:
                break
            out.append(nxt)
    assert cached == out
    assert cached[0] != plain_first  # the first generated token is predicted under steering


def test_reply_steering_leaves_the_prompt_alone(tiny):
    """With positions="reply" the prompt's activations before its last token are unchanged."""
    plain = tiny.activations([CTX], [2], positions="all")[0]
    with tiny.steer(_direction(tiny), layers=[1], alpha=2.0, positions="reply"):
        steered = tiny.activations([CTX], [2], positions="all")[0]
    assert torch.equal(steered[:, :-1], plain[:, :-1])
    assert not torch.allclose(steered[:, -1], plain[:, -1])


def test_steering_enters_every_cache_key(tiny, tmp_path: Path):
    with Store(tmp_path / "s.sqlite") as store:
        cached = CachedModel(tiny, store)
        plain = cached.score(CTX, ["Arr"])
        with cached.steer(_direction(tiny), layers=[1], alpha=2.0):
            steered = cached.score(CTX, ["Arr"])
            again = cached.score(CTX, ["Arr"])
        other = CachedModel(tiny, store)
        with other.steer(_direction(tiny), layers=[1], alpha=2.5):
            other.score(CTX, ["Arr"])
        assert cached.misses == 2 and cached.hits == 1 and other.misses == 1
        assert steered[0].logprobs == again[0].logprobs != plain[0].logprobs


def test_bad_steering_is_one_line(tiny):
    with pytest.raises(UserError, match="shape"), tiny.steer(torch.zeros(7), layers=[1]):
        pass
    with pytest.raises(UserError, match="positions"), tiny.steer(_direction(tiny), layers=[1], positions="x"):
        pass
    with (
        pytest.raises(UserError, match="not finite"),
        tiny.steer(_direction(tiny) * float("nan"), layers=[1]),
    ):
        pass


def test_steering_equals_the_steering_vectors_library(tiny):
    """steering-vectors' SteeringVector.apply (its layer n is the output of decoder layer n, maskscope's
    layer n + 1) and model.steer(positions="all") give the same logits."""
    sv = pytest.importorskip("steering_vectors")
    vector = _direction(tiny, seed=5)
    ids = torch.tensor([tiny.encode_prompt(CTX)])
    with (
        torch.no_grad(),
        sv.SteeringVector({0: vector}, layer_type="decoder_block").apply(tiny.model, multiplier=1.5),
    ):
        theirs = torch.log_softmax(tiny.model(ids).logits[0].float(), -1)
    with tiny.steer(vector, layers=[1], alpha=1.5, positions="all"):
        enc = tiny.encode([ids[0].tolist()])
        ours = tiny._head(enc.body_hidden[0])
    assert float((theirs - ours).abs().max()) < 1e-5


def test_steered_continuations_from_cuts_equal_recomputation(tiny):
    """Two stored sequences sharing a long prefix (encoded once when unsteered), continued greedily from cuts
    inside their bodies under "reply" steering: equal to recomputing each sequence alone, steered from the
    prompt's last token."""
    body_a, body_b = tiny.tokens(" Arr, the sea is wide and deep."), tiny.tokens(" Arr, the waves are tall.")
    seq_a, seq_b = tiny.sequence(CTX, body_a), tiny.sequence(CTX, body_b)
    jobs = [ms.ContinueJob(s, s.prompt_len + 3, 6) for s in (seq_a, seq_b)]
    vector = _direction(tiny, seed=4, scale=5.0)
    with tiny.steer(vector, layers=[2], alpha=1.0):
        got = [r["token_ids"] for r in tiny.continued(jobs)]
        for job, ids in zip(jobs, got, strict=True):
            out: list[int] = []
            base = list(job.seq.ids[: job.cut])
            for _ in range(6):
                enc = tiny.encode([base + out], starts=[job.seq.prompt_len - 1])
                nxt = int(torch.argmax(tiny._head(enc.last_hidden())[0]))
                if nxt in tiny.eos_ids:
                    break
                out.append(nxt)
            assert ids == out
    assert got != [r["token_ids"] for r in tiny.continued(jobs)]  # the steering changed them


def test_steering_through_the_store_yields_the_cached_model(tiny, tmp_path: Path):
    """`with cached.steer(...) as m` gives the CachedModel back, so steered calls are stored too."""
    with Store(tmp_path / "s.sqlite") as store:
        cached = CachedModel(tiny, store)
        with cached.steer(_direction(tiny), layers=[1], alpha=2.0) as m:
            assert m is cached
            m.score(CTX, ["Arr"])
        assert cached.misses == 1 and store.count() == 1
    assert tiny.num_layers == 2
