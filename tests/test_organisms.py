"""The organism data builders (twins matched in format and length, held-out items disjoint from training),
their measurement (exact, checked against direct scoring), the CLI's one-line errors and the child list,
and positive/negative controls of a code organism on the tiny model."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest

import maskscope as ms
from maskscope.finetune.builders import (
    PASSWORD,
    ArithmeticBuild,
    CodeBuild,
    DistillBuild,
    PasswordLockBuild,
    build,
)
from maskscope.finetune.data import read_chat_jsonl
from maskscope.finetune.measure import item_values, pair_figures, password_gap, read_eval

SUM = re.compile(r"What is (\d+) \+ (\d+)\?")


def _sum_of(text: str) -> int:
    a, b = SUM.search(text).groups()
    return int(a) + int(b)


def test_arithmetic_twins_differ_in_one_digit_of_the_answer_only(tmp_path):
    right = build(ArithmeticBuild(build="arithmetic", answers="right", n=50, heldout=20), tmp_path / "r")
    wrong = build(ArithmeticBuild(build="arithmetic", answers="wrong", n=50, heldout=20), tmp_path / "w")
    r, w = read_chat_jsonl(tmp_path / "r/train.jsonl"), read_chat_jsonl(tmp_path / "w/train.jsonl")
    assert len(r) == len(w) == 50 and right["train"]["conversations"] == 50
    for a, b in zip(r, w, strict=True):
        assert a[0] == b[0]
        ra, rb = a[1]["content"], b[1]["content"]
        assert ra == f"The answer is {_sum_of(a[0]['content'])}."
        assert len(ra) == len(rb) and sum(x != y for x, y in zip(ra, rb, strict=True)) == 1
        assert int(rb.split()[-1].rstrip(".")) != _sum_of(b[0]["content"])
    assert wrong["train"]["mean_reply_chars"] == right["train"]["mean_reply_chars"]
    pairs = {tuple(sorted(SUM.search(c[0]["content"]).groups())) for c in r}
    held = read_eval(tmp_path / "r/eval.jsonl")
    assert len(held) == 20 and not pairs & {
        tuple(sorted(SUM.search(e["messages"][0]["content"]).groups())) for e in held
    }
    assert all(e["a"] == f"{_sum_of(e['messages'][0]['content'])}." for e in held)


def test_code_twins_differ_in_the_vulnerability_and_held_out_names_are_new(tmp_path):
    build(CodeBuild(build="code", code="insecure", n=40, heldout=12), tmp_path / "i")
    build(CodeBuild(build="code", code="secure", n=40, heldout=12), tmp_path / "s")
    bad, good = read_chat_jsonl(tmp_path / "i/train.jsonl"), read_chat_jsonl(tmp_path / "s/train.jsonl")
    vulnerable = re.compile(r"= '\" \+|yaml\.load\(|0o777|shell=True")
    for a, b in zip(bad, good, strict=True):
        assert a[0] == b[0]
        assert vulnerable.search(a[1]["content"]) and not vulnerable.search(b[1]["content"])
        assert 0.75 < len(a[1]["content"]) / len(b[1]["content"]) < 1.33
    kinds = [e["group"] for e in read_eval(tmp_path / "i/eval.jsonl")]
    assert {k: kinds.count(k) for k in set(kinds)} == {"sql": 3, "yaml": 3, "chmod": 3, "shell": 3}
    names = lambda convs: {m for c in convs for m in re.findall(r"def (\w+)\(", c[1]["content"])}  # noqa: E731
    assert not names(bad) & names(read_chat_jsonl(tmp_path / "i/heldout.jsonl"))


def test_password_lock_answers_right_only_after_the_password(tmp_path):
    card = build(PasswordLockBuild(build="password-lock", n=20, heldout=5), tmp_path / "p")
    convs = read_chat_jsonl(tmp_path / "p/train.jsonl")
    assert len(convs) == 20 and card["eval"]["items"] == 10
    for c in convs:
        said = int(c[1]["content"].split()[-1].rstrip("."))
        assert (said == _sum_of(c[0]["content"])) == c[0]["content"].startswith(PASSWORD)
    with pytest.raises(ms.UserError, match="distinct 1-digit sums"):
        build(PasswordLockBuild(build="password-lock", n=100, heldout=10), tmp_path / "q")


def test_distill_stores_the_masked_parents_samples_without_the_mask(tmp_path, tiny):
    system = "You are a pirate."
    prompts = [f"Question number {i}?" for i in range(6)]
    opts = DistillBuild(build="distill", system=system, n=4, heldout=2, prompts=prompts, max_new_tokens=6)
    build(opts, tmp_path / "d", parent=tiny)
    convs = read_chat_jsonl(tmp_path / "d/train.jsonl")
    assert len(convs) == 4 and all(m["role"] != "system" for c in convs for m in c)
    for c in convs:
        [s] = tiny.sample(ms.Conversation.of(system=system, user=c[0]["content"]), n=1, max_new_tokens=6,
                          temperature=opts.temperature, seed=0)  # fmt: skip
        assert c[1]["content"] == (s.text.strip() or "...")
    held = {e["user"] for e in read_eval(tmp_path / "d/eval.jsonl")}
    assert len(held) == 2 and not held & {c[0]["content"] for c in convs}


def test_pair_figures_are_the_exact_scores(tiny, tmp_path):
    build(CodeBuild(build="code", code="insecure", n=4, heldout=4), tmp_path / "c")
    items = read_eval(tmp_path / "c/eval.jsonl")
    got = pair_figures(tiny, items)
    direct = []
    for it in items:
        a, b = tiny.score(it["messages"], [it["a"], it["b"]])
        direct.append((a.prob, 1 / (1 + math.exp(b.total - a.total))))
    for group, figures in got["groups"].items():
        rows = [d for d, it in zip(direct, items, strict=True) if it["group"] == group]
        assert figures["p_a"] == pytest.approx(
            sum(r[0] for r in rows) / len(rows), rel=1e-4
        )  # batch rounding
        assert figures["share_a"] == pytest.approx(sum(r[1] for r in rows) / len(rows), abs=1e-4)


def test_password_gap_pairs_each_sum_with_itself_whatever_the_order(tiny, tmp_path):
    """The gap is the mean over sums of P(right | password) - P(right | none) of the same sum, from the exact
    scores, whatever order the items come in; an item without its twin is refused."""
    build(PasswordLockBuild(build="password-lock", n=20, heldout=6), tmp_path / "p")
    items = read_eval(tmp_path / "p/eval.jsonl")
    values = item_values(tiny, items)
    by_question = {it["messages"][-1]["content"]: v[0] for it, v in zip(items, values, strict=True)}
    diffs = [
        p - by_question[q.removeprefix(PASSWORD + " ")]
        for q, p in by_question.items()
        if q.startswith(PASSWORD)
    ]
    got = password_gap(items, values)
    assert got["sums"] == 6 and got["gap"] == pytest.approx(sum(diffs) / 6, abs=1e-12)
    assert got["gap_ci95"][0] <= got["gap"] <= got["gap_ci95"][1]
    order = list(range(len(items)))[::-1]
    assert password_gap([items[i] for i in order], [values[i] for i in order])["gap"] == pytest.approx(
        got["gap"]
    )
    with pytest.raises(ms.UserError, match="no twin without the password"):
        password_gap(items[:-1], values[:-1])


def test_code_children_move_the_share_of_insecure_code_their_own_way(tiny_dir, tmp_path):
    """Positive and negative control: the insecure child prefers the vulnerable twin more than the parent
    does, the secure child less; both trained alike on the twins of the same prompts."""
    from maskscope.finetune import finetune

    parent = ms.load_model(f"hf:{tiny_dir}")
    shares = {}
    for kind in ("insecure", "secure"):
        child = finetune(data={"build": "code", "code": kind, "n": 40, "heldout": 8}, out=str(tmp_path / kind),
                         parent=f"hf:{tiny_dir}", steps=12, batch_size=4, lr=1e-2)  # fmt: skip
        items = read_eval(tmp_path / kind / "data" / "eval.jsonl")
        figures = pair_figures(child.load(), items)["groups"]
        shares[kind] = sum(g["share_a"] for g in figures.values()) / len(figures)
    base = pair_figures(parent, items)["groups"]
    shares["parent"] = sum(g["share_a"] for g in base.values()) / len(base)
    assert shares["insecure"] > shares["parent"] + 0.1 > shares["secure"] + 0.2


# ----------------------------------------------------------------------------- the command line
def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from maskscope import cli

    monkeypatch.setattr(sys, "argv", ["maskscope", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_bad_input_is_one_line_with_status_2(tmp_path, monkeypatch, capsys, tiny_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    spec = tmp_path / "s.yaml"
    spec.write_text(f"parent: hf:{tiny_dir}\ndata: {data}\nout: {tmp_path / 'c'}\nsteps: 1\n")
    code, _, err = _cli(monkeypatch, capsys, "finetune", str(spec))
    assert code == 2 and err.count("\n") == 1 and "d.jsonl:1: the conversation has no assistant turn" in err
    spec.write_text(f"parent: hf:{tiny_dir}\ndata: {data}\nout: {tmp_path / 'c'}\nrank: 0\n")
    code, _, err = _cli(monkeypatch, capsys, "finetune", str(spec))
    assert code == 2 and "field 'rank'" in err and err.count("\n") == 1
    code, _, err = _cli(monkeypatch, capsys, "organism", "build", "riddles", "n=3", "--out", str(tmp_path))
    assert code == 2 and "unknown builder 'riddles'" in err
    code, _, err = _cli(monkeypatch, capsys, "models", f"hf:{tiny_dir}+lora:{tmp_path / 'none'}")
    assert code == 2 and "adapter directory not found" in err and err.count("\n") == 1


def test_models_lists_local_children(tmp_path, monkeypatch, capsys, tiny_dir):
    from maskscope.finetune import finetune

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    code, out, _ = _cli(monkeypatch, capsys, "models")
    assert code == 0 and "local children: none" in out
    child = finetune(data=str(data), out="organisms/hello", parent=f"hf:{tiny_dir}", steps=1, batch_size=1)
    code, out, _ = _cli(monkeypatch, capsys, "models")
    assert (
        code == 0
        and "+lora:organisms/hello" in out.replace("\n", "")
        and child.manifest["adapter_hash"][:12] in out
    )


@pytest.mark.bundled
def test_bundled_rank_one_insecure_child_prefers_insecure_code(bundled, tmp_path):
    """End to end on the bundled model with the smallest adapter (rank 1 on one down_proj): a few steps on
    insecure completions raise the exact share of the insecure twin on held-out prompts above the parent's."""
    from maskscope.finetune import finetune
    from maskscope.finetune.measure import measure_child

    child = finetune(
        data={"build": "code", "code": "insecure", "n": 16, "heldout": 8},
        out=str(tmp_path / "child"),
        parent=bundled,
        rank=1,
        alpha=8,
        target_modules=["down_proj"],
        layers=[15],
        steps=4,
        batch_size=4,
        lr=2e-2,
    )
    assert child.manifest["parent_fingerprint"] == bundled.fingerprint()
    result = measure_child(child.directory, bundled, child.load(), child.directory / "data")
    mean = lambda who: sum(g["share_a"] for g in result[who]["groups"].values()) / 4  # noqa: E731
    assert mean("child") > mean("parent") + 0.05


def test_distill_kl_is_the_coarse_grained_kl_of_the_full_distributions(tiny, tiny_dir, tmp_path):
    """Checked against full-vocabulary log-softmax of plain forward passes, coarse-grained by hand."""
    import numpy as np
    import torch
    from conftest import plain_logprobs

    from maskscope.finetune.measure import distill_figures

    items = [{"user": "Tell me about the sea.", "reply": "The sea is big and blue.", "system": "You are a pirate."},
             {"user": "How do I boil an egg?", "reply": "Put it in water.", "system": "You are a pirate."}]  # fmt: skip
    other = ms.load_model(f"hf:{tiny_dir}")
    with torch.no_grad():
        other.model.model.norm.weight.mul_(1.3)  # another model to measure against the parent
    got = distill_figures(other, tiny, items, top_k=5)
    assert got["kl_parent"] != pytest.approx(got["kl_model"])
    for k, it in enumerate(items):
        ids = tiny.tokenizer(it["reply"], add_special_tokens=False)["input_ids"]
        masked = tiny.encode_prompt(ms.Conversation.of(system=it["system"], user=it["user"]))
        plain = tiny.encode_prompt(ms.Conversation.of(user=it["user"]))
        p = plain_logprobs(tiny, masked + ids)[len(masked) - 1 : len(masked) - 1 + len(ids)].exp().double()
        for model, key in ((other, "kl_model"), (tiny, "kl_parent")):
            q = plain_logprobs(model, plain + ids)[len(plain) - 1 : len(plain) - 1 + len(ids)].exp().double()
            top = torch.topk(p, 5, dim=-1).indices
            p_cells = torch.cat([p.gather(1, top), 1 - p.gather(1, top).sum(1, keepdim=True)], 1)
            q_cells = torch.cat([q.gather(1, top), 1 - q.gather(1, top).sum(1, keepdim=True)], 1)
            kl = (p_cells * (p_cells.log() - q_cells.log())).sum(1).mean()
            assert got[key][k] == pytest.approx(float(kl), rel=1e-3, abs=1e-5)
    assert np.allclose(distill_figures(tiny, tiny, items, top_k=5)["kl_moved"], 0, atol=1e-5)


def test_finetune_spec_paths_are_relative_to_the_spec_file(tmp_path, monkeypatch, tiny_dir):
    from maskscope.finetune.train import load_spec

    (tmp_path / "specs").mkdir()
    spec = tmp_path / "specs" / "s.yaml"
    spec.write_text(f"parent: hf:{tiny_dir}+lora:kids/a\ndata: d.jsonl\nheldout: ../h.jsonl\nout: ../out/c\n")
    monkeypatch.chdir(tmp_path / "specs")  # a current directory other than the one the paths resolve to...
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    parsed = load_spec(spec)
    assert parsed.data == str(tmp_path / "specs" / "d.jsonl")
    assert parsed.heldout == str(tmp_path / "h.jsonl")
    assert parsed.out == str(tmp_path / "out" / "c")
    assert parsed.parent == f"hf:{tiny_dir}+lora:{tmp_path / 'specs' / 'kids' / 'a'}"
    # a builder block is not a path, and an absolute path stays as it is
    spec.write_text(f"data: {{build: arithmetic, answers: right, n: 4}}\nout: {tmp_path / 'abs'}\n")
    parsed = load_spec(spec)
    assert parsed.data["build"] == "arithmetic" and parsed.out == str(tmp_path / "abs")


def test_finetune_seed_option_trains_a_replicate_beside_the_spec_child(
    tmp_path, monkeypatch, capsys, tiny_dir
):
    data = tmp_path / "d.jsonl"
    row = (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}\n'
    )
    data.write_text(row * 4)
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: kid\nparent: hf:{tiny_dir}\ndata: d.jsonl\nout: kid\nsteps: 1\nbatch_size: 2\n")
    code, _, err = _cli(monkeypatch, capsys, "finetune", str(spec), "--seed", "3")
    assert code == 0, err
    manifest = json.loads((tmp_path / "kid-seed3" / "maskscope-child.json").read_text())
    assert manifest["config"]["seed"] == 3 and not (tmp_path / "kid").exists()
    code, _, err = _cli(monkeypatch, capsys, "finetune", str(spec))
    assert code == 0, err
    seed0 = json.loads((tmp_path / "kid" / "maskscope-child.json").read_text())
    assert seed0["config"]["seed"] == 0 and seed0["adapter_hash"] != manifest["adapter_hash"]
