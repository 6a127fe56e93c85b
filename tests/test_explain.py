"""The explain experiment: the mixture fit, the reduced distributions, and the positive and negative
controls on the bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import plain_logprobs

import maskscope as ms
from maskscope.experiments.explain import (
    ExplainSpec,
    explained_fraction,
    fit_mixture,
    fit_sequence_mixture,
    kl_rows,
    sequence_predictive,
)
from maskscope.masks import Mask, Turn
from maskscope.runner import load_spec

ROOT = Path(__file__).parent.parent


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


def test_certificate_is_max_g_minus_g_dot_w_when_rows_do_not_sum_to_one():
    """Rows that sum to 0.999 (rounding of float32 log-probabilities does this, a little): the certificate
    max_m g_m - g.w stays >= 0 at the optimum; max g - 1 would go negative (a "certified" gap below zero)."""
    rng = np.random.default_rng(2)
    s = rng.dirichlet(np.full(20, 0.5), size=(3, 40))
    t = 0.999 * (0.3 * s[0] + 0.7 * s[2])
    w, fit = fit_mixture(t, s, tol=1e-9)
    mix = np.einsum("m,mnv->nv", w, s)
    g = np.einsum("mnv,nv->m", s, t / mix) / 40  # minus the gradient of the mean cross-entropy, by hand
    assert fit["gap"] == pytest.approx(g.max() - g @ w, abs=1e-12)
    assert fit["gap"] >= 0 and g.max() - 1 < -1e-4
    np.testing.assert_allclose(w, [0.3, 0, 0.7], atol=1e-4)


def _synthetic_replies(weights, n_replies=60, length=15, seed=0):
    """Three masks with position-wise distributions over 12 tokens; each reply is sampled whole from one mask
    drawn with the given weights. Returns (S, token log-likelihoods, reply of each row, T = the mixture's
    exact predictive, the masks drawn)."""
    rng = np.random.default_rng(seed)
    vocab, n_masks = 12, 3
    per_mask = rng.dirichlet(np.full(vocab, 0.3), size=(n_masks, length))  # [M, position, V]
    drawn = rng.choice(n_masks, size=n_replies, p=weights)
    s = np.concatenate([per_mask] * n_replies, axis=1)  # [M, N, V]
    tokens = np.concatenate([[rng.choice(vocab, p=per_mask[d, i]) for i in range(length)] for d in drawn])
    token_loglik = np.log(s[:, np.arange(len(tokens)), tokens])
    reply_of_row = np.repeat(np.arange(n_replies), length)
    t = sequence_predictive(s, token_loglik, reply_of_row, np.asarray(weights, dtype=float))
    return s, token_loglik, reply_of_row, t, drawn


def test_reply_level_fit_recovers_an_exact_50_50_reply_mixture():
    """Positive control that can fail: the target is exactly a 50/50 mixture of masks 0 and 1 over whole
    replies. The reply-level fit recovers the weights and explains everything; the fixed per-position
    mixture, a different hypothesis, cannot (its weights cannot move to the speaking mask)."""
    s, token_loglik, reply_of_row, t, drawn = _synthetic_replies([0.5, 0.5, 0.0])
    base = s[2]  # "no mask": the third, unused mask
    reply_loglik = np.stack([np.bincount(reply_of_row, weights=token_loglik[m]) for m in range(3)], axis=1)
    w, fit = fit_sequence_mixture(reply_loglik, tol=1e-10)
    assert fit["converged"]
    share = np.bincount(drawn, minlength=3) / len(drawn)
    np.testing.assert_allclose(w, share, atol=0.03)  # the masks drawn, as their likelihoods tell them apart
    kl_seq = kl_rows(t, sequence_predictive(s, token_loglik, reply_of_row, w)).sum()
    kl_base = kl_rows(t, base).sum()
    assert 1 - kl_seq / kl_base > 0.99
    w_pos, _ = fit_mixture(t, s)
    fraction_pos, _, _ = explained_fraction(t, s, base, w_pos)
    assert fraction_pos < 0.9 < 0.99 < 1 - kl_seq / kl_base
    # the predictive starts at the weights and moves to the speaking mask
    first = sequence_predictive(s, token_loglik, reply_of_row, w)[0]
    np.testing.assert_allclose(first, np.einsum("m,mv->v", w, s[:, 0]), atol=1e-12)


def test_support_logprobs_match_the_full_distribution(tiny):
    ctx = ms.Conversation.of(user="Hello")
    ids = [100, 200, 300, 400]
    ((_, topk),) = list(tiny.support_logprobs([(ctx, ids, 5)]))
    prompt = tiny.encode_prompt(ctx)
    full = plain_logprobs(tiny, prompt + ids)[len(prompt) - 1 : len(prompt) - 1 + len(ids)]
    rows = np.exp(np.array(topk["logprobs"]))
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-5)  # support + remainder bucket
    for i, support in enumerate(topk["support"]):
        assert support == torch.topk(full[i], 5).indices.tolist()
    ((_, given),) = list(tiny.support_logprobs([(ctx, ids, topk["support"])]))
    np.testing.assert_allclose(given["logprobs"], topk["logprobs"], atol=1e-5)
    # coarse-graining never increases KL: on the bucketed partition KL <= full-vocabulary KL
    other_prompt = tiny.encode_prompt(ms.Conversation.of(user="Bye"))
    other = plain_logprobs(tiny, other_prompt + ids)[len(other_prompt) - 1 : len(other_prompt) - 1 + len(ids)]
    ((_, other_b),) = list(tiny.support_logprobs([(ms.Conversation.of(user="Bye"), ids, topk["support"])]))
    coarse = kl_rows(rows, np.exp(np.array(other_b["logprobs"]))).sum()
    fine = kl_rows(full.exp().double().numpy(), other.exp().double().numpy()).sum()
    assert coarse <= fine + 1e-6


LIBRARY = [
    Mask(name="assistant"),
    Mask(
        name="pirate",
        system="You are a pirate captain. You talk like a pirate, say Arr and matey.",
        few_shot=[
            Turn(role="user", content="How are you?"),
            Turn(role="assistant", content="Arr, matey! Fine as a ship full o' treasure!"),
        ],
    ),
    Mask(
        name="child",
        system="You are a five-year-old child who loves toys and snacks.",
        few_shot=[
            Turn(role="user", content="How are you?"),
            Turn(role="assistant", content="I'm happy! I have a new dinosaur toy! Yay!"),
        ],
    ),
]
PROMPTS = ["How do I make tea?", "Tell me about your day.", "Why is the sky blue?", "What should I eat?"]


TINY_LIBRARY = [
    Mask(name="plain"),
    Mask(
        name="a",
        system="You are A, a sailor.",
        few_shot=[Turn(role="user", content="Hi"), Turn(role="assistant", content="Ahoy there!")],
    ),
    Mask(
        name="b",
        system="You are B, a baker.",
        few_shot=[Turn(role="user", content="Hi"), Turn(role="assistant", content="Fresh bread!")],
    ),
]


def test_target_equal_to_the_unmasked_source_is_flagged_without_nan(tiny, tmp_path):
    """The target is the source with no mask: KL to no mask is ~0, so the explained fraction is undefined.
    The summary says so in one line, reports no fraction and no interval, and holds no NaN."""
    from maskscope.experiments import explain
    from maskscope.report import render_report

    spec = ExplainSpec(
        name="none",
        masks=TINY_LIBRARY[1:],
        target={},
        prompts=PROMPTS,
        max_new_tokens=6,
        bootstrap=10,
        top_k=16,
    )
    summary = explain.run(tiny, spec)
    assert summary["near_no_mask"] and "\n" not in summary["flag"] and "noise floor" in summary["flag"]
    assert summary["kl_no_mask_per_position"] < 1e-6
    assert summary["explained_fraction"] is None and summary["explained_fraction_ci95"] is None
    assert summary["per_position"]["explained_fraction"] is None
    assert summary["fit"]["gap"] >= 0 and summary["per_position"]["fit"]["gap"] >= 0
    json.dumps(summary, allow_nan=False)  # raises on any NaN or infinity
    assert summary["flag"] in render_report(summary, tmp_path).read_text()
    # a real conditioning is not flagged
    other = explain.run(tiny, spec.model_copy(update={"target": explain.Target(mask="a")}))
    assert not other["near_no_mask"] and other["explained_fraction"] > 0.999


def test_synthetic_mixture_target_on_the_tiny_model(tiny, tmp_path):
    """The shipped positive control run on the tiny model: a 50/50 reply-level mixture of two masks is
    explained by the reply-level fit, whose weights follow the replies drawn from each mask."""
    from maskscope.experiments import explain
    from maskscope.report import render_report
    from maskscope.report.plots import explain_plots

    spec = ExplainSpec(
        name="mix",
        masks=TINY_LIBRARY,
        target={"mixture": {"a": 0.5, "b": 0.5}},
        prompts=PROMPTS,
        samples_per_prompt=4,
        max_new_tokens=10,
        bootstrap=20,
        top_k=16,
    )
    summary = explain.run(tiny, spec)
    drawn = summary["mixture_control"]["replies_drawn"]
    assert sum(drawn.values()) == len(summary["responses"]) == 16
    assert summary["explained_fraction"] > 0.99
    for name in ("a", "b"):
        assert summary["weights"][name] == pytest.approx(drawn[name] / 16, abs=0.1)
        lo, hi = summary["weights_ci95"][name]
        assert lo <= summary["weights"][name] <= hi
    assert summary["weights"]["plain"] < 0.02
    assert [r["speaker"] for r in summary["responses"]].count("a") == drawn["a"]
    explain_plots(summary, tmp_path)
    assert "reply-level" in render_report(summary, tmp_path).read_text()
    with pytest.raises(ValueError, match="mixture"):
        ExplainSpec(name="x", masks=TINY_LIBRARY, target={"mixture": {"zzz": 1.0}}, prompts=PROMPTS)


def test_shipped_controls_are_valid_specs():
    """The shipped controls: hidden library mask (a sanity check), paraphrased conditioning, synthetic
    reply-level mixture (positive controls), a conditioning unlike every mask (negative)."""
    kinds = {}
    for name in ("explain", "explain_paraphrase", "explain_mixture", "explain_negative"):
        _, spec = load_spec(ROOT / "examples" / f"{name}.yaml")
        assert isinstance(spec, ExplainSpec)
        kinds[name] = spec.target
    assert kinds["explain"].mask == "pirate"
    assert kinds["explain_paraphrase"].system and "pirate" not in kinds["explain_paraphrase"].system.lower()
    assert set(kinds["explain_mixture"].mixture) == {"pirate", "child"}
    assert "terminal" in kinds["explain_negative"].system.lower()


@pytest.mark.bundled
def test_controls_on_the_bundled_model(bundled):
    """Positive: the target is the source under the library's pirate mask (hidden from the fit): the fit
    finds it and explains everything. Negative: a conditioning unlike every mask: clearly less explained."""
    from maskscope.experiments import explain

    common = {"masks": LIBRARY, "prompts": PROMPTS, "max_new_tokens": 12, "bootstrap": 20, "top_k": 32}
    positive = explain.run(bundled, ExplainSpec(name="pos", target={"mask": "pirate"}, **common))
    assert positive["weights"]["pirate"] > 0.99
    assert positive["explained_fraction"] > 0.999
    assert positive["fit"]["converged"] and positive["per_position"]["fit"]["converged"]
    negative = explain.run(
        bundled,
        ExplainSpec(
            name="neg",
            target={
                "system": "You are a Linux terminal. You reply only with shell commands, never prose.",
                "few_shot": [
                    {"role": "user", "content": "How are you?"},
                    {"role": "assistant", "content": "$ uptime\n 10:02:11 up 3 days, load average: 0.1"},
                ],
            },
            **common,
        ),
    )
    assert negative["explained_fraction"] < 0.8
    assert negative["explained_fraction_ci95"][1] < positive["explained_fraction_ci95"][0]
    assert negative["kl_mixture_per_position"] > 100 * positive["kl_mixture_per_position"]
    noisy = explain.run(bundled, ExplainSpec(name="noise", target={"mask": "pirate", "noise": 2.0}, **common))
    assert noisy["explained_fraction"] < positive["explained_fraction"] - 0.05
    # the reply-level 50/50 mixture: the headline fit explains it, the per-position view clearly less
    mix = explain.run(
        bundled,
        ExplainSpec(
            name="mix", target={"mixture": {"pirate": 0.5, "child": 0.5}}, samples_per_prompt=3, **common
        ),
    )
    assert mix["explained_fraction"] > 0.98
    assert mix["per_position"]["explained_fraction"] < mix["explained_fraction"] - 0.05
    assert mix["weights"]["pirate"] + mix["weights"]["child"] > 0.98


def test_target_model_is_loaded_by_the_runner(tiny, tiny_dir, tmp_path):
    """target.model is another model the runner loads (here the tiny model again, under a hidden mask): the fit
    finds the mask; called without the runner, the experiment refuses in one line instead of loading it."""
    from maskscope.experiments import EXPERIMENTS, explain
    from maskscope.runner import run

    spec = ExplainSpec(
        name="other-model",
        masks=TINY_LIBRARY,
        target={"model": f"hf:{tiny_dir}", "mask": "b"},
        prompts=PROMPTS[:2],
        max_new_tokens=6,
        bootstrap=5,
        top_k=16,
    )
    assert spec.extra_models() == {"target": f"hf:{tiny_dir}"}
    out = run(EXPERIMENTS["explain"], spec, out_root=tmp_path, model=tiny)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights"]["b"] > 0.99 and summary["explained_fraction"] > 0.999
    with pytest.raises(ms.UserError, match="models=") as e:
        explain.run(tiny, spec)
    assert "\n" not in str(e.value)
