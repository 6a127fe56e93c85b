"""Masks and the posterior over which mask is speaking."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import logsumexp

import maskscope as ms
from maskscope.experiments.posterior import PosteriorSpec, mask_posterior, switching_posteriors
from maskscope.masks import Mask, MaskLibrary, Turn

ROOT = Path(__file__).parent.parent


def brute_force(loglik: np.ndarray, log_prior: np.ndarray, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed posteriors and the best path by enumerating every sequence of speakers."""
    n_tokens, n_masks = loglik.shape
    paths = list(itertools.product(range(n_masks), repeat=n_tokens))
    scores = []
    for path in paths:
        s = log_prior[path[0]] + loglik[0, path[0]]
        for t in range(1, n_tokens):
            s += np.log(1 - rate) if path[t] == path[t - 1] else np.log(rate / (n_masks - 1))
            s += loglik[t, path[t]]
        scores.append(s)
    scores = np.array(scores)
    post = np.full((n_tokens, n_masks), -np.inf)
    for t in range(n_tokens):
        for m in range(n_masks):
            post[t, m] = logsumexp([sc for sc, p in zip(scores, paths, strict=True) if p[t] == m])
    return post - logsumexp(scores), np.array(paths[int(np.argmax(scores))])


def test_switching_model_equals_enumeration_of_all_paths():
    rng = np.random.default_rng(0)
    loglik = rng.normal(-3, 2, size=(6, 3))
    log_prior = np.log(np.array([0.5, 0.3, 0.2]))
    filtered, smoothed, path = switching_posteriors(loglik, log_prior, 0.1)
    ref_smoothed, ref_path = brute_force(loglik, log_prior, 0.1)
    np.testing.assert_allclose(smoothed, ref_smoothed, atol=1e-9)
    np.testing.assert_array_equal(path, ref_path)
    # filtering at the last token is smoothing at the last token
    np.testing.assert_allclose(filtered[-1], smoothed[-1], atol=1e-9)


def test_mask_conversation_places_conditioning():
    mask = Mask(
        name="m",
        preamble="Pretend.",
        few_shot=[Turn(role="user", content="a"), Turn(role="assistant", content="b")],
    )
    conv = mask.conversation([Turn(role="user", content="q")])
    assert [(m.role, m.content) for m in conv.messages] == [
        ("user", "Pretend.\n\na"),
        ("assistant", "b"),
        ("user", "q"),
    ]
    with pytest.raises(ValueError, match="alternate"):
        Mask(name="x", few_shot=[Turn(role="user", content="a"), Turn(role="user", content="b")])


def test_library_loads_and_bad_libraries_are_one_line(tmp_path):
    lib = MaskLibrary.load(ROOT / "examples" / "masks.yaml")
    assert len(lib.masks) >= 8 and {"assistant", "villain", "pirate", "liar", "child"} <= set(lib.names)
    assert np.exp(lib.log_priors()).sum() == pytest.approx(1.0)
    bad = tmp_path / "lib.yaml"
    bad.write_text("masks:\n  - name: a\n    prior: -1\n")
    with pytest.raises(ms.UserError, match="masks.0.prior"):
        MaskLibrary.load(bad)
    with pytest.raises(ms.UserError, match="not found"):
        MaskLibrary.load(tmp_path / "none.yaml")


def test_static_posterior_is_bayes_on_the_text_level_scores(tiny):
    lib = MaskLibrary(
        masks=[Mask(name="a", system="You are A."), Mask(name="b", system="You are B.", prior=3)]
    )
    reply = "Hello there, friend."
    result = mask_posterior(tiny, lib, reply, user="Hi")
    totals = np.array(
        [tiny.score(m.conversation([Turn(role="user", content="Hi")]), [reply])[0].total for m in lib.masks]
    )
    expected = np.log([0.25, 0.75]) + totals
    np.testing.assert_allclose(result.static[-1], expected - logsumexp(expected), atol=1e-4)
    assert result.loglik.shape == (len(result.tokens), 2)
    assert "".join(result.tokens) == reply


@pytest.mark.bundled
def test_villain_switch_is_found_where_it_happens(bundled, tmp_path):
    """The shipped example: a helpful reply that turns villainous at "Mwahaha"; the most probable speaker
    becomes the villain within a few tokens of that point and stays so."""
    from maskscope.experiments import EXPERIMENTS
    from maskscope.runner import load_spec, run

    _, spec = load_spec(ROOT / "examples" / "posterior.yaml")
    assert isinstance(spec, PosteriorSpec)
    out = run(EXPERIMENTS["posterior"], spec, out_root=tmp_path, model=bundled)
    summary = json.loads((out / "summary.json").read_text())
    tokens = [r["token"] for r in summary["tokens"]]
    truth = next(i for i in range(len(tokens)) if "".join(tokens[: i + 1]).endswith(" M"))
    speaker = summary["speaker_smoothed"]
    onset = next(i for i in range(len(speaker)) if all(s == "villain" for s in speaker[i:]))
    assert abs(onset - truth) <= 4, (onset, truth)
    assert "villain" not in speaker[: truth - 8]
    # negative control: replies sampled from the pirate and read back; one speaker, so no switch
    control = summary["negative_control"]
    assert control["mask"] == "pirate" and control["with_switch"]["n"] == 6
    assert control["with_switch"]["k"] == 0, [r["text"] for r in control["replies"] if r["switches_viterbi"]]
    assert control["read_as_the_sampling_mask"]["k"] >= 5
    for name in ("posterior.csv", "posterior_smoothed.png", "posterior_static.png", "report.html"):
        assert (out / name).stat().st_size > 500


def test_negative_control_reads_each_sampled_reply_back(tiny):
    """The control's replies are the mask's samples, and each reply's switches are those mask_posterior finds
    reading it back (the numbers the bundled test then requires to be zero)."""
    from maskscope.experiments.posterior import run as run_posterior

    masks = [{"name": "a", "system": "You are A."}, {"name": "b", "system": "You are B, a pirate."}]
    spec = PosteriorSpec(
        name="nc",
        masks=masks,
        transcript=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
        switch_rate=0.2,
        negative_control={"mask": "b", "user": "Hi", "samples": 4, "max_new_tokens": 12},
    )
    summary = run_posterior(tiny, spec)
    control = summary["negative_control"]
    lib = spec.mask_library()
    ctx = lib.get("b").conversation([Turn(role="user", content="Hi")])
    samples = tiny.sample(ctx, n=4, max_new_tokens=12, temperature=1.0, seed=0)
    assert [r["text"] for r in control["replies"]] == [s.text for s in samples if s.text.strip()]
    for r in control["replies"]:
        read = mask_posterior(tiny, lib, r["text"], user="Hi", switch_rate=0.2)
        assert r["switches_viterbi"] == len(read.switches("viterbi"))
    assert control["with_switch"]["k"] == sum(r["switches_viterbi"] > 0 for r in control["replies"])
    lo, hi = control["with_switch"]["ci95"]
    assert 0 <= lo < hi <= 1 and "Wilson" in control["with_switch"]["method"]
    with pytest.raises(ms.UserError, match="no mask named"):
        run_posterior(
            tiny,
            spec.model_copy(
                update={"negative_control": spec.negative_control.model_copy(update={"mask": "zzz"})}
            ),
        )
