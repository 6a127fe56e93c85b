"""The explain experiment: the mixture fit, the reduced distributions, and the positive and negative
controls on the bundled model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import plain_logprobs

import maskscope as ms
from maskscope.experiments.explain import ExplainSpec, explained_fraction, fit_mixture, kl_rows
from maskscope.masks import Mask, Turn


def test_kl_rows_by_hand():
    t = np.array([[0.5, 0.5, 0.0]])
    q = np.array([[0.25, 0.25, 0.5]])
    assert kl_rows(t, q)[0] == pytest.approx(np.log(2))
    assert kl_rows(q, q)[0] == pytest.approx(0.0)


def test_fit_recovers_known_mixture_with_a_certificate():
    rng = np.random.default_rng(1)
    s = rng.dirichlet(np.full(30, 0.5), size=(5, 80))
    t = 0.6 * s[1] + 0.4 * s[4]
    w, fit = fit_mixture(t, s)
    assert fit["converged"] and fit["gap"] <= 1e-6
    np.testing.assert_allclose(w, [0, 0.6, 0, 0, 0.4], atol=1e-5)
    fraction, kl_mix, _ = explained_fraction(t, s, s[0], w)
    assert kl_mix == pytest.approx(0, abs=1e-8) and fraction == pytest.approx(1.0)
    # a target outside the masks' hull: the fit is the best mixture, certified, and explains less than all
    other = rng.dirichlet(np.full(30, 0.5), size=80)
    w2, fit2 = fit_mixture(other, s)
    assert fit2["converged"]
    for m in range(5):  # no vertex does better than the fitted mixture
        assert kl_rows(other, s[m]).sum() >= kl_rows(other, np.einsum("m,mnv->nv", w2, s)).sum() - 1e-9


def test_support_logprobs_match_the_full_distribution(tiny):
    ctx = ms.Conversation.of(user="Hello")
    ids = [100, 200, 300, 400]
    (_, topk), = list(tiny.support_logprobs([(ctx, ids, 5)]))
    prompt = tiny.encode_prompt(ctx)
    full = plain_logprobs(tiny, prompt + ids)[len(prompt) - 1 : len(prompt) - 1 + len(ids)]
    rows = np.exp(np.array(topk["logprobs"]))
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-5)  # support + remainder bucket
    for i, support in enumerate(topk["support"]):
        assert support == torch.topk(full[i], 5).indices.tolist()
    (_, given), = list(tiny.support_logprobs([(ctx, ids, topk["support"])]))
    np.testing.assert_allclose(given["logprobs"], topk["logprobs"], atol=1e-5)
    # coarse-graining never increases KL: on the bucketed partition KL <= full-vocabulary KL
    other_prompt = tiny.encode_prompt(ms.Conversation.of(user="Bye"))
    other = plain_logprobs(tiny, other_prompt + ids)[len(other_prompt) - 1 : len(other_prompt) - 1 + len(ids)]
    (_, other_b), = list(tiny.support_logprobs([(ms.Conversation.of(user="Bye"), ids, topk["support"])]))
    coarse = kl_rows(rows, np.exp(np.array(other_b["logprobs"]))).sum()
    fine = kl_rows(full.exp().double().numpy(), other.exp().double().numpy()).sum()
    assert coarse <= fine + 1e-6


LIBRARY = [
    Mask(name="assistant"),
    Mask(name="pirate", system="You are a pirate captain. You talk like a pirate, say Arr and matey.",
         few_shot=[Turn(role="user", content="How are you?"),
                   Turn(role="assistant", content="Arr, matey! Fine as a ship full o' treasure!")]),
    Mask(name="child", system="You are a five-year-old child who loves toys and snacks.",
         few_shot=[Turn(role="user", content="How are you?"),
                   Turn(role="assistant", content="I'm happy! I have a new dinosaur toy! Yay!")]),
]
PROMPTS = ["How do I make tea?", "Tell me about your day.", "Why is the sky blue?", "What should I eat?"]


@pytest.mark.bundled
def test_controls_on_the_bundled_model(bundled):
    """Positive: the target is the source under the library's pirate mask (hidden from the fit): the fit
    finds it and explains everything. Negative: a conditioning unlike every mask: clearly less explained."""
    from maskscope.experiments import explain

    common = {"masks": LIBRARY, "prompts": PROMPTS, "max_new_tokens": 12, "bootstrap": 20, "top_k": 32}
    positive = explain.run(bundled, ExplainSpec(name="pos", target={"mask": "pirate"}, **common))
    assert positive["weights"]["pirate"] > 0.99
    assert positive["explained_fraction"] > 0.999
    assert positive["fit"]["converged"]
    negative = explain.run(bundled, ExplainSpec(
        name="neg",
        target={"system": "You are a Linux terminal. You reply only with shell commands, never prose.",
                "few_shot": [{"role": "user", "content": "How are you?"},
                             {"role": "assistant", "content": "$ uptime\n 10:02:11 up 3 days, load average: 0.1"}]},
        **common,
    ))
    assert negative["explained_fraction"] < 0.8
    assert negative["explained_fraction_ci95"][1] < positive["explained_fraction_ci95"][0]
    assert negative["kl_mixture_per_position"] > 100 * positive["kl_mixture_per_position"]
    noisy = explain.run(bundled, ExplainSpec(name="noise", target={"mask": "pirate", "noise": 2.0}, **common))
    assert noisy["explained_fraction"] < positive["explained_fraction"] - 0.05
