"""The reasoning experiments: KV reuse across truncation points equals re-encoding, batched decoding equals a
plain greedy loop and is seeded, the store-backed jobs, CoT text surgery, the metrics, and end-to-end runs of
cot, capabilities and prefill with their controls."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import plain_logprobs

import maskscope as ms
from maskscope.errors import UserError
from maskscope.models.base import ContinueJob, ForcedJob
from maskscope.models.hf import Row
from maskscope.reasoning.metrics import area_over_curve, mean_ci, step_interpolate
from maskscope.reasoning.text import answer_start, filler_tokens, percent_cuts, perturb, sentence_cuts, steps
from maskscope.runner import parse_spec
from maskscope.store import CachedModel, Store

CTX = ms.Conversation.of(user="What is 3 + 6 + 5? Think step by step.")
REPLY = "First, 3 + 6 = 9. Then, 9 + 5 = 14. The answer is 14."


def _seq(model, context=CTX, reply: str = REPLY) -> list[int]:
    prompt = model.encode_prompt(context)
    return prompt + model.tokenizer(reply, add_special_tokens=False)["input_ids"]


def _greedy(model, ids: list[int], n: int) -> list[int]:
    """Reference: greedy decoding by plain forward passes over the growing sequence, no cache."""
    out: list[int] = []
    for _ in range(n):
        nxt = int(torch.argmax(plain_logprobs(model, ids + out)[-1]))
        if nxt in model.eos_ids:
            break
        out.append(nxt)
    return out


def _run(model, seqs, rows, **kw) -> list:
    """Rows over cuts, in row order."""
    out = dict(model.run_cuts(seqs, rows, **kw))
    return [out[i] for i in range(len(rows))]


# ------------------------------------------------------------------------------------------------ engine
def test_kv_reuse_across_cuts_equals_re_encoding(tiny):
    """Suffix and branch log-probabilities after every cut, from one encoding of the full sequence, equal a
    plain forward pass over seq[:cut] + suffix + branch, to 1e-4."""
    seq = _seq(tiny)
    prompt_len = len(tiny.encode_prompt(CTX))
    suffix = tuple(tiny.tokenizer(" The answer is", add_special_tokens=False)["input_ids"])
    branches = ((220, 16, 19), (220, 16, 20), (3007,))
    cuts = [prompt_len, prompt_len + 3, prompt_len + 11, len(seq) - 4, len(seq)]
    enc = tiny.encode([seq])
    results = tiny.run_rows(enc, [Row(0, c, suffix, branches) for c in cuts])
    worst = 0.0
    for cut, res in zip(cuts, results, strict=True):
        ref = plain_logprobs(tiny, seq[:cut] + list(suffix))[cut - 1 :]
        worst = max(worst, float((ref - res.logprobs).abs().max()))
        for b, lps in zip(branches, res.branch_logprobs, strict=True):
            ref_b = plain_logprobs(tiny, seq[:cut] + list(suffix) + list(b))[cut + len(suffix) - 1 :]
            worst = max(worst, float((ref_b - lps).abs().max()))
    assert worst < 1e-4
    # without per-position log-probabilities (the LM head on the last suffix position only): the same numbers,
    # to float rounding (a one-row matrix product may take another kernel than a many-row one)
    lean = tiny.run_rows(enc, [Row(0, c, suffix, branches) for c in cuts], keep_logprobs=False)
    for full, res in zip(results, lean, strict=True):
        assert res.logprobs is None
        assert float((res.next_logprobs - full.logprobs[-1]).abs().max()) < 1e-5
        for a, b in zip(full.branch_logprobs, res.branch_logprobs, strict=True):
            assert float((a - b).abs().max()) < 1e-5


def test_shared_prefix_batches_and_masks_change_no_number(tiny):
    """Several sequences with a shared prefix, encoded in one batch (the prefix once), cut anywhere."""
    seqs = [_seq(tiny, CTX, r) for r in (REPLY, "Lorem ipsum dolor.", " ... ... ... ...", "14")]
    rows = [Row(s, c) for s, seq in enumerate(seqs) for c in range(len(seq) - 3, len(seq) + 1)]
    suffix = (504, 2988)
    rows = [Row(r.seq, r.cut, suffix) for r in rows]
    enc = tiny.encode(seqs)
    assert enc.prefix_len >= len(tiny.encode_prompt(CTX)) - 1
    for row, res in zip(rows, tiny.run_rows(enc, rows), strict=True):
        ref = plain_logprobs(tiny, seqs[row.seq][: row.cut] + list(suffix))[row.cut - 1 :]
        assert float((ref - res.logprobs).abs().max()) < 1e-4


def test_decoding_from_cuts_equals_a_plain_greedy_loop(tiny):
    seq = _seq(tiny)
    prompt_len = len(tiny.encode_prompt(CTX))
    cuts = [prompt_len, prompt_len + 5, len(seq)]
    rows = [Row(0, c, decode=12) for c in cuts] + [Row(0, prompt_len + 2, (504,), decode=7)]
    results = _run(tiny, [seq], rows, max_rows=2)
    for row, res in zip(rows, results, strict=True):
        assert res.token_ids == _greedy(tiny, seq[: row.cut] + list(row.suffix), row.decode)
        assert res.finish_reason in ("eos", "length")


def test_sampling_is_seeded_per_row_and_independent_of_the_batch(tiny):
    seq = _seq(tiny)
    rows = [
        Row(0, len(seq) - k, decode=10, temperature=1.0, seed=3, index=i) for i, k in enumerate((0, 4, 9))
    ]
    together = _run(tiny, [seq], rows)
    alone = [_run(tiny, [seq], [r])[0] for r in rows]
    again = _run(tiny, [seq], rows, max_rows=1)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone] == [r.token_ids for r in again]
    other_seed = _run(tiny, [seq], [Row(0, len(seq), decode=10, temperature=1.0, seed=4, index=0)])
    assert other_seed[0].token_ids != together[0].token_ids


def test_bad_cuts_are_refused(tiny):
    seq = _seq(tiny)
    with pytest.raises(UserError, match="outside"):
        tiny.run_rows(tiny.encode([seq]), [Row(0, len(seq) + 1)])


# ------------------------------------------------------------------------------------------------ jobs
def test_forced_candidate_probability_is_exact_whole_word(tiny):
    """P(" 14" as a whole number) = P(tokens) x P(next token does not start with a letter or digit)."""
    jobs = tiny
    seq = jobs.sequence(CTX, tiny.tokenizer("First, 3 + 6 = 9.", add_special_tokens=False)["input_ids"])
    prefix = jobs.tokens(" The answer is")
    cand = jobs.candidate("14", [" 14"])
    result = jobs.forced([ForcedJob(seq, len(seq.ids), prefix, (cand,), open_tokens=4)])[0]
    ids = list(seq.ids) + list(prefix) + list(cand.spellings[0])
    lp = plain_logprobs(tiny, ids)
    start = len(seq.ids) + len(prefix)
    logp = sum(float(lp[start - 1 + t, tok]) for t, tok in enumerate(cand.spellings[0]))
    cont = tiny._continues_word()
    p_end = 1 - float(torch.exp(lp[-1][: cont.shape[0]][cont]).sum())
    assert result["p"]["14"] == pytest.approx(math.exp(logp) * p_end, rel=1e-4, abs=1e-12)
    greedy = _greedy(tiny, list(seq.ids) + list(prefix), 4)
    assert result["open_text"].startswith(tiny.tokenizer.decode(greedy[:1], skip_special_tokens=True))


def test_jobs_go_through_the_store_and_resume(tiny, tmp_path: Path):
    with Store(tmp_path / "s.sqlite") as store:
        model = CachedModel(tiny, store)
        jobs = model
        seq = jobs.sequence(CTX, tiny.tokenizer(REPLY, add_special_tokens=False)["input_ids"])
        cands = (jobs.candidate("14", [" 14"]), jobs.candidate("15", [" 15"]))
        forced = [ForcedJob(seq, seq.prompt_len + k, jobs.tokens(" The answer is"), cands) for k in (0, 4, 8)]
        conts = [ContinueJob(seq, seq.prompt_len + k, 6) for k in (0, 4, 8, 4)]  # the last is a twin
        first_f, first_c = jobs.forced(forced, max_rows=3), jobs.continued(conts, max_rows=3)
        assert (model.hits, model.misses) == (0, 6)
        assert first_c[1] == first_c[3]
        again = CachedModel(tiny, store)
        assert again.forced(forced, max_rows=1) == first_f and again.continued(conts, max_rows=1) == first_c
        assert (again.hits, again.misses) == (6, 0)
        assert all(w == 1 for w in store.writes().values())


# ------------------------------------------------------------------------------------------------ text
def test_sentence_cuts_answer_start_and_steps(bundled):
    tok = bundled.tokenizer
    ids = tok(REPLY, add_special_tokens=False)["input_ids"]

    def decode(x: list[int]) -> str:
        return tok.decode(x, skip_special_tokens=True)

    cuts = sentence_cuts(ids, decode)
    assert [decode(ids[:k]) for k in cuts] == ["First, 3 + 6 = 9.", "First, 3 + 6 = 9. Then, 9 + 5 = 14."]
    start = answer_start(ids, decode)
    assert decode(ids[:start]) == "First, 3 + 6 = 9. Then, 9 + 5 = 14."
    assert answer_start(tok("No marker here. 3.5 + 1", add_special_tokens=False)["input_ids"], decode) is None
    two = tok("A is 3.5 now.\n\nB is 2. C", add_special_tokens=False)["input_ids"]
    assert [decode(two[:k]) for k in sentence_cuts(two, decode)] == [
        "A is 3.5 now.\n\n",
        "A is 3.5 now.\n\nB is 2.",
    ]
    assert steps([3, 5, 9, 12], 20, 6) == [3, 5, 9, 12, 20]
    merged = steps(list(range(1, 20)), 20, 4)
    assert merged == [5, 10, 15, 20]
    assert steps([], 0, 4) == []


def test_cuts_fillers_and_mistakes():
    assert percent_cuts(23, 10) == [(p / 100, round(p * 23 / 100)) for p in range(0, 101, 10)]
    assert percent_cuts(10, 30)[-1] == (1.0, 10)
    assert filler_tokens([7, 8, 9], 7) == [7, 8, 9, 7, 8, 9, 7]
    assert filler_tokens([7], 0) == []
    rng = random.Random(0)
    changed = perturb(" Then, 9 + 5 = 14.", rng)
    assert changed is not None and changed.startswith(" Then, 9 + 5 = ") and changed != " Then, 9 + 5 = 14."
    assert 1 <= abs(int(changed.split("= ")[1].rstrip(".")) - 14) <= 9
    assert perturb("Max is not loud.", rng) == "Max is loud."
    assert perturb("Max is a wumpus.", rng) == "Max is not a wumpus."
    assert perturb("Hello there.", rng) is None


# ------------------------------------------------------------------------------------------------ metrics
def test_area_over_curve():
    grid = [i / 10 for i in range(11)]
    assert area_over_curve(grid, [1.0] * 11) == pytest.approx(0.0)
    assert area_over_curve(grid, [0.0] * 10 + [1.0]) == pytest.approx(0.95)
    assert area_over_curve([0, 0.5, 1], [0, 1, 1]) == pytest.approx(0.25)
    assert area_over_curve([0, 1, 0.5, 0.5], [0, 1, 1, 0]) == pytest.approx(0.5)  # repeated x averaged
    with pytest.raises(ValueError):
        area_over_curve([0.2, 1.0], [0, 1])


def test_bootstrap_intervals_and_step_functions():
    out = mean_ci([0, 1] * 50, seed=1)
    assert out["mean"] == 0.5 and out["n"] == 100
    lo, hi = out["ci95"]
    assert 0.38 < lo < 0.45 and 0.55 < hi < 0.62
    assert mean_ci([1.0, 1.0, None])["ci95"] == [1.0, 1.0]
    assert mean_ci([]) == {"mean": None, "ci95": None, "n": 0}
    assert mean_ci([2.0], seed=0)["ci95"] is None
    assert mean_ci([0, 1, 1, 0, 1], seed=3) == mean_ci([0, 1, 1, 0, 1], seed=3)
    assert step_interpolate([0, 0.4, 1], [5, 7, 9], [0, 0.2, 0.4, 0.9, 1]) == [5, 5, 7, 7, 9]
    assert np.isclose(step_interpolate([1, 0], [3, 1], [0.5])[0], 1)


# ------------------------------------------------------------------------------------------------ cot
def test_cot_spec_validation_is_one_line():
    base = {"experiment": "cot", "name": "x", "tasks": [{"kind": "addition"}]}
    for bad, field in [
        ({"summary_prompt": "no placeholder"}, "summary_prompt"),
        ({"conditions": ["truncated", "nonsense"]}, "conditions"),
        ({"fillers": {"blank": "  "}}, "fillers"),
        ({"percent_step": 0}, "percent_step"),
        ({"tasks": []}, "tasks"),
    ]:
        with pytest.raises(UserError) as e:
            parse_spec({**base, **bad})
        assert field in str(e.value) and "\n" not in str(e.value)
    _, spec = parse_spec({**base, "conditions": ["filler"]})
    assert spec.conditions == ["truncated", "filler"]


@pytest.mark.bundled
def test_cot_end_to_end_with_controls(bundled, tmp_path: Path):
    """On the bundled model: the full CoT reproduces the stored reply token for token under greedy decoding
    (positive control), the forced answer after it equals the stored answer, and the same step without a
    mistake keeps the answer; a rerun is served from the store; the report escapes model output."""
    spec_path = tmp_path / "cot.yaml"
    spec = {
        "experiment": "cot",
        "name": "cot-test",
        "tasks": [{"kind": "addition", "operands": 3, "digits": 1, "n": 3}],
        "conditions": ["truncated", "filler", "mistake"],
        "fillers": {"dots": " ..."},
        "percent_step": 25,
        "continue_max_tokens": 24,
        "cot_max_tokens": 48,
        "examples": 1,
    }
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    out = ms.run_spec(spec_path, out_root=tmp_path / "runs", model=bundled)
    summary = json.loads((out / "summary.json").read_text())
    task = summary["tasks"][0]
    controls = task["controls"]
    assert controls["greedy"]
    assert controls["full_cot_reproduces_stored_reply"]["mean"] == 1.0
    assert controls["forced_answer_after_full_cot_equals_stored"]["mean"] == 1.0
    assert task["mistake"]["control_same_step_no_mistake_free_agree"]["mean"] == 1.0
    assert task["stored"]["marker_found"]["mean"] == 1.0
    q = task["questions"][0]
    truncated = q["points"]["truncated"]
    assert [p["x"] for p in truncated if p["kind"] == "percent"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(chunk.rstrip().endswith(".") for chunk in q["cot"])
    assert q["step_ends"][-1] == q["cot_tokens"] and len(q["cot"]) == len(q["step_ends"])
    full = [p for p in truncated if p["x"] == 1.0][0]
    assert full["forced"]["answer"] == q["stored_answer"]
    assert full["free"]["answer"] == q["stored_answer"]
    # further tokens at the full CoT are the answer sentence's tokens; at 0% the whole reply is regenerated
    assert full["free"]["further_tokens"] == q["reply_tokens"] - q["cot_tokens"]
    assert truncated[0]["free"]["further_tokens"] == min(q["reply_tokens"], 24)
    filler = task["conditions"]["filler:dots"]
    assert filler["n"] == 3 and filler["full"]["further_tokens"]["n"] == 3
    assert (out / task["plot"]).is_file()
    # resume: nothing is computed again
    with Store(tmp_path / "runs" / "maskscope.sqlite") as store:
        before = store.count()
    ms.run_spec(spec_path, out_root=tmp_path / "runs", model=bundled)
    again = json.loads((out / "summary.json").read_text())
    assert again["run"]["misses"] == 0
    with Store(tmp_path / "runs" / "maskscope.sqlite") as store:
        assert store.count() == before
    assert again["tasks"][0]["conditions"] == task["conditions"]
    # model output is data: a reply with markup is escaped in the report
    from maskscope.report import render_report

    summary["tasks"][0]["questions"][0]["reply"] = "<script>alert(1)</script>"
    html = render_report(summary, tmp_path).read_text()
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html
