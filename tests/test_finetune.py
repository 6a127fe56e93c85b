"""LoRA fine-tuning on the tiny random model: the assistant-only mask, determinism, resume after SIGKILL,
checkpoints on a full disk, loading a child (merged) and refusing one on the wrong parent, bad input."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import maskscope as ms
from maskscope.finetune import finetune
from maskscope.finetune.adapter import MANIFEST, adapter_hash
from maskscope.finetune.data import encode_conversation, read_chat_jsonl
from maskscope.finetune.train import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _sums(n: int, offset: int = 0) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + {i + 3}?"},
                {"role": "assistant", "content": f"The answer is {2 * i + 3}."},
            ]
        }
        for i in range(offset, offset + n)
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _sums(24)))
    return path


def _run(tiny_dir: Path, data: Path | dict, out: Path, **fields):
    base = dict(
        data=data if isinstance(data, dict) else str(data),
        out=str(out),
        parent=f"hf:{tiny_dir}",
        steps=6,
        batch_size=4,
        lr=1e-2,
    )
    return finetune(**{**base, **fields})


# ----------------------------------------------------------------------------- the assistant mask
def test_trained_tokens_are_the_assistant_replies_and_their_end_of_turn(tiny):
    """Counted independently: each assistant reply tokenized on its own plus its end-of-turn token."""
    tok = tiny.tokenizer
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue, the colour of the sea."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green."},
    ]
    ex = encode_conversation(tok, messages)
    replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    expected = sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in replies)
    assert ex.n_trained == expected
    trained_text = tok.decode([i for i, t in zip(ex.ids, ex.trained, strict=True) if t])
    assert trained_text == "".join(replies)
    # the user's and system's words are not trained, and the whole conversation is there
    assert tok.decode(ex.ids).count("Name a colour.") == 1
    assert len(ex.ids) > 3 * expected


def test_training_counts_exactly_the_assistant_tokens(tiny_dir, data, tmp_path, tiny):
    """tokens seen = the batches' conversation tokens; trained tokens = their assistant tokens only."""
    from maskscope.finetune.train import batch_indices

    child = _run(tiny_dir, data, tmp_path / "c", heldout_fraction=0.0, steps=5)
    convs = read_chat_jsonl(data)
    examples = [encode_conversation(tiny.tokenizer, c) for c in convs]
    drawn = [i for s in range(5) for i in batch_indices(len(convs), 4, 0, s)]
    reply = [
        len(tiny.tokenizer(c[1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"])
        for c in convs
    ]
    assert child.manifest["trained_tokens_seen"] == sum(reply[i] for i in drawn)
    assert child.manifest["tokens_seen"] == sum(len(examples[i].ids) for i in drawn)
    assert child.manifest["trained_tokens_seen"] < child.manifest["tokens_seen"] / 3


# ----------------------------------------------------------------------------- determinism and resume
def test_same_data_and_seed_give_the_same_adapter_and_another_seed_does_not(tiny_dir, data, tmp_path):
    a = _run(tiny_dir, data, tmp_path / "a")
    b = _run(tiny_dir, data, tmp_path / "b")
    c = _run(tiny_dir, data, tmp_path / "c", seed=1)
    assert a.manifest["adapter_hash"] == b.manifest["adapter_hash"] == adapter_hash(tmp_path / "b")
    assert c.manifest["adapter_hash"] != a.manifest["adapter_hash"]
    assert (tmp_path / "a" / "loss.png").stat().st_size > 1000
    held = a.manifest["heldout_loss"]
    assert a.manifest["data"]["heldout_conversations"] == 2 and held["after"] < held["before"]


_KILLED_RUN = """
import os, signal, sys
from maskscope.finetune import finetune
kill_at = int(sys.argv[4])
finetune(data=sys.argv[1], out=sys.argv[2], parent="hf:" + sys.argv[3], steps=8, batch_size=4, lr=1e-2,
         checkpoint_every=2, on_step=lambda s, loss: os.kill(os.getpid(), signal.SIGKILL) if s == kill_at else None)
"""


def test_resume_after_sigkill_ends_with_the_uninterrupted_adapter(tiny_dir, data, tmp_path):
    reference = _run(tiny_dir, data, tmp_path / "ref", steps=8, checkpoint_every=2)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    args = [sys.executable, "-c", _KILLED_RUN, str(data), str(out), str(tiny_dir)]
    killed = subprocess.run([*args, "5"], env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert latest_checkpoint(out)[0] == 4 and not (out / MANIFEST).exists()
    resumed = subprocess.run([*args, "0"], env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["adapter_hash"] == reference.manifest["adapter_hash"]
    assert manifest["tokens_seen"] == reference.manifest["tokens_seen"]
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == list(range(1, 9))


def test_resume_with_a_changed_config_is_refused(tiny_dir, data, tmp_path):
    _run(tiny_dir, data, tmp_path / "c", steps=2)
    with pytest.raises(ms.UserError, match=r"another configuration \(training.lr"):
        _run(tiny_dir, data, tmp_path / "c", steps=2, lr=5e-3)
    built = {"build": "code", "code": "insecure", "n": 8, "heldout": 2}
    _run(tiny_dir, built, tmp_path / "b", steps=1)
    card = (tmp_path / "b" / "data" / "card.json").read_text()
    with pytest.raises(ms.UserError, match=r"another configuration \(builder.code"):
        _run(tiny_dir, {**built, "code": "secure"}, tmp_path / "b", steps=1)
    assert (tmp_path / "b" / "data" / "card.json").read_text() == card  # the built data was left alone


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny_dir, data, tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def full_disk(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    out = tmp_path / "full"
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ms.UserError, match="No space left on device.*step 2 is intact"):
        _run(tiny_dir, data, out, steps=8, checkpoint_every=2)
    monkeypatch.setattr(torch, "save", real_save)
    step, path = latest_checkpoint(out)
    assert step == 2 and not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    done = _run(tiny_dir, data, out, steps=8, checkpoint_every=2)
    reference = _run(tiny_dir, data, tmp_path / "ref", steps=8, checkpoint_every=2)
    assert done.manifest["adapter_hash"] == reference.manifest["adapter_hash"]


# ----------------------------------------------------------------------------- loading a child
def test_a_loaded_child_equals_the_unmerged_peft_model_and_differs_from_its_parent(
    tiny_dir, data, tmp_path, tiny
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _run(tiny_dir, data, tmp_path / "c", steps=6, lr=3e-2)
    child = ms.load_model(f"hf:{tiny_dir}+lora:{tmp_path / 'c'}")
    assert child.fingerprint()["adapter"] == adapter_hash(tmp_path / "c")
    assert {k: v for k, v in child.fingerprint().items() if k != "adapter"} == {
        k: v for k, v in tiny.fingerprint().items() if k != "adapter"
    }
    ids = child.encode_prompt([{"role": "user", "content": "What is 30 + 33?"}])
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(tmp_path / "c"))
    with torch.no_grad():
        ref = torch.log_softmax(unmerged(torch.tensor([ids])).logits[0].float(), -1)
        got = torch.log_softmax(child.model(torch.tensor([ids])).logits[0].float(), -1)
        parent = torch.log_softmax(tiny.model(torch.tensor([ids])).logits[0].float(), -1)
    assert (got - ref).abs().max() < 1e-4  # merged (W + BA)x against unmerged Wx + BAx: fp32 rounding
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(tmp_path / "c"))
    with torch.no_grad():
        merged = torch.log_softmax(fresh.merge_and_unload()(torch.tensor([ids])).logits[0].float(), -1)
    assert (got - merged).abs().max() < 1e-5
    assert (parent - ref).abs().max() > 1e-2  # the adapter changed something (else the check is empty)
    [scored] = child.score([{"role": "user", "content": "What is 30 + 33?"}], "The answer is 63.")
    assert abs(scored.logprobs[0] - float(ref[len(ids) - 1, scored.token_ids[0]])) < 1e-5


def test_an_adapter_is_refused_on_another_parent(tiny_dir, data, tmp_path):
    from transformers import AutoModelForCausalLM

    _run(tiny_dir, data, tmp_path / "c", steps=2)
    other = tmp_path / "other"
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    model.save_pretrained(other)
    for f in tiny_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith("template.jinja"):
            (other / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ms.UserError, match="trained on another parent.*weights"):
        ms.load_model(f"hf:{other}+lora:{tmp_path / 'c'}")


# ----------------------------------------------------------------------------- bad input
def test_malformed_jsonl_names_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_sums(1)[0]) + "\n\n" + '{"messages": [}\n')
    with pytest.raises(ms.UserError, match=r"bad.jsonl:3: not valid JSON"):
        read_chat_jsonl(path)


def test_a_conversation_without_an_assistant_turn_is_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [_sums(1)[0], {"messages": [{"role": "user", "content": "hello"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ms.UserError, match=r"bad.jsonl:2: the conversation has no assistant turn"):
        read_chat_jsonl(path)


def test_the_store_never_serves_a_parents_answer_to_its_child(tiny_dir, data, tmp_path, tiny):
    _run(tiny_dir, data, tmp_path / "c", steps=4, lr=3e-2)
    child = ms.load_model(f"hf:{tiny_dir}+lora:{tmp_path / 'c'}")
    ctx = [{"role": "user", "content": "What is 4 + 7?"}]
    with ms.Store(tmp_path / "store.sqlite") as store:
        [from_parent] = ms.CachedModel(tiny, store).score(ctx, ["The answer is 11."])
        [from_child] = ms.CachedModel(child, store).score(ctx, ["The answer is 11."])
    [direct] = child.score(ctx, ["The answer is 11."])
    assert from_child.total == pytest.approx(direct.total, abs=1e-5)
    assert abs(from_child.total - from_parent.total) > 1e-3


# ----------------------------------------------------------------------------- context distillation
PIRATE = "You are a pirate captain. Say arr."


def _kl_by_hand(tiny, conversations: list[dict], teacher_system: str) -> float:
    """Mean KL(parent seeing the teacher's system prompt || parent seeing the conversation) per reply token,
    from one plain forward pass per rendering, the reply located as the last tokens of each rendering."""
    from conftest import plain_logprobs

    total, count = 0.0, 0
    for row in conversations:
        messages = row["messages"]
        reply = tiny.tokenizer(messages[-1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        views = []
        for msgs in (messages, [{"role": "system", "content": teacher_system}, *messages]):
            ids = tiny.tokenizer.apply_chat_template(msgs, tokenize=False)
            ids = tiny.tokenizer(ids.rstrip(), add_special_tokens=False)["input_ids"]
            assert ids[-len(reply) :] == reply
            views.append(plain_logprobs(tiny, ids)[len(ids) - len(reply) - 1 : len(ids) - 1])
        student, teacher = views
        total += float((teacher.exp() * (teacher - student)).sum())
        count += len(reply)
    return total / count


def test_kl_to_teacher_starts_at_the_parents_kl_between_the_two_contexts_and_falls(tiny_dir, tmp_path, tiny):
    """Positive control: before training the child is the parent, so the held-out loss is the parent's own
    KL between the teacher's context and the conversation's (recomputed by hand); training on it brings the
    child's distributions toward the teacher's."""
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in _sums(3, offset=50)))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _sums(24)))
    child = _run(tiny_dir, train, tmp_path / "c", heldout=str(held), loss="kl-to-teacher",
                 teacher_system=PIRATE, steps=12)  # fmt: skip
    curve = child.manifest["heldout_loss"]
    expected = _kl_by_hand(tiny, _sums(3, offset=50), PIRATE)
    assert expected > 0.05  # the system prompt changes the tiny model's predictions, else nothing is tested
    assert curve["before"] == pytest.approx(expected, rel=1e-4)
    assert curve["after"] < 0.75 * curve["before"]  # measured: 1.79 -> 0.95


def test_kl_to_teacher_with_the_conversations_own_context_has_nothing_to_learn(tiny_dir, tmp_path):
    """Negative control: a teacher that sees what the child sees gives a loss of 0 (to rounding)."""
    rows = [{"messages": [{"role": "system", "content": PIRATE}, *r["messages"]]} for r in _sums(12)]
    data = tmp_path / "own.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    child = _run(tiny_dir, data, tmp_path / "c", loss="kl-to-teacher", teacher_system=PIRATE, steps=1)
    first = json.loads((tmp_path / "c" / "log.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"]) < 1e-6 and abs(child.manifest["heldout_loss"]["before"]) < 1e-6
    # the loss is part of the run's identity; its default is left out of it, so that children built before
    # the field existed are still recognised as finished
    assert json.loads((tmp_path / "c" / "run.json").read_text())["training"]["loss"] == "kl-to-teacher"
    plain = _run(tiny_dir, data, tmp_path / "plain", steps=1)
    assert "loss" not in json.loads((plain.directory / "run.json").read_text())["training"]


def test_kl_to_teacher_needs_a_teacher_and_teacher_system_needs_the_kl(tiny_dir, data, tmp_path):
    with pytest.raises(ms.UserError, match="kl-to-teacher needs teacher_system"):
        _run(tiny_dir, data, tmp_path / "a", loss="kl-to-teacher")
    with pytest.raises(ms.UserError, match="teacher_system is used by loss: kl-to-teacher only"):
        _run(tiny_dir, data, tmp_path / "b", teacher_system=PIRATE)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_distill_block_teaches_its_own_mask_and_the_measured_kl_falls(tiny_dir, tmp_path, tiny):
    """End to end on the tiny model: the distill builder's `system` is the teacher's by default, and the
    child's measured KL to the masked parent falls below the parent's own, with a paired interval."""
    from maskscope.finetune.measure import measure_child

    prompts = [f"Tell me about island number {i}." for i in range(16)]
    block = {"build": "distill", "system": PIRATE, "n": 12, "heldout": 4, "prompts": prompts,
             "max_new_tokens": 8}  # fmt: skip
    child = _run(tiny_dir, block, tmp_path / "c", loss="kl-to-teacher", steps=12)
    assert child.manifest["config"]["teacher_system"] is None  # taken from the block, not written twice
    result = measure_child(child.directory, tiny, child.load(), child.directory / "data")
    assert result["kl_child"] < result["kl_parent"]
    low, high = result["reduction_ci95"]
    assert 0 < low <= result["reduction"] <= high < 1
