"""Activations in the store (float16 blobs keyed like every call; served = recomputed, bit for bit; damaged
blobs recomputed; `cache check/why/runs` on them) and prefix sharing in `activations` (equal to encoding each
item alone, under steering too)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import maskscope as ms
from maskscope.store import CachedModel, Store, blob_tensor, tensor_blob

SYSTEM = "You are a pirate captain who sails the seven seas and answers every question in a pirate's voice."
USERS = [
    "Tell me about the sea.",
    "What should I cook tonight?",
    "How do plants grow?",
    "Why is the sky blue?",
]


def _items(tiny) -> list:
    """Prompts under two system prompts (a long shared prefix each), and two (context, reply) items."""
    ctxs = [ms.Conversation.of(system=SYSTEM, user=u) for u in USERS]
    ctxs += [ms.Conversation.of(user=u) for u in USERS]
    return ctxs


def _alone(tiny, items, layers, positions) -> list[torch.Tensor]:
    return [tiny.activations([it], layers, positions)[0] for it in items]


@pytest.mark.parametrize("positions", ["last", "reply_mean", "all"])
def test_a_shared_prefix_gives_the_activations_of_each_item_alone(tiny, positions, monkeypatch):
    contexts = _items(tiny)
    reply = list(tiny.tokens(" Arr, the sea be wide!"))
    items = [(c, reply) for c in contexts] if positions == "reply_mean" else contexts
    layers = [0, 1, 2]
    encoded: list[int] = []
    real = tiny.encode_prefix
    monkeypatch.setattr(tiny, "encode_prefix", lambda ids: encoded.append(len(ids)) or real(ids))
    together = tiny.activations(items, layers, positions)
    monkeypatch.setattr(tiny, "encode_prefix", real)
    # both system prompts' prefixes were encoded once each (the default system prompt is long too)
    assert len(encoded) == 2 and min(encoded) >= 20
    alone = _alone(tiny, items, layers, positions)
    for a, b in zip(together, alone, strict=True):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) < 1e-4 * float(b.abs().max())


def test_a_shared_prefix_under_reply_steering_gives_each_item_alone(tiny):
    contexts = _items(tiny)
    vector = torch.randn(
        tiny.model.get_input_embeddings().weight.shape[1], generator=torch.Generator().manual_seed(1)
    )
    with tiny.steer(vector * 4, [1], 1.0, "reply"):
        together = tiny.activations(contexts, [1, 2], "all")
        alone = _alone(tiny, contexts, [1, 2], "all")
    plain = tiny.activations(contexts, [1, 2], "all")
    for a, b, c in zip(together, alone, plain, strict=True):
        assert float((a - b).abs().max()) < 1e-4 * float(b.abs().max())
        # the steering reached the last prompt token (and so the rows), not the prefix
        assert float((a[:, -1] - c[:, -1]).abs().max()) > 1e-2
        assert float((a[:, 0] - c[:, 0]).abs().max()) == 0.0


def test_cached_activations_are_float16_rounded_and_bit_identical_to_recomputed(tiny, tmp_path: Path):
    items = _items(tiny)
    layers = [0, 1, 2]
    raw = tiny.activations(items, layers, "last")
    with Store(tmp_path / "a.sqlite") as store:
        model = CachedModel(tiny, store)
        computed = model.activations(items, layers, "last")
        assert model.misses == len(items) and model.hits == 0
        served = model.activations(items, layers, "last")
        assert model.hits == len(items)
        assert store.count("activations") == len(items)
    with Store(tmp_path / "b.sqlite") as store:
        recomputed = CachedModel(tiny, store).activations(items, layers, "last")
    for c, s, r, x in zip(computed, served, recomputed, raw, strict=True):
        assert c.dtype == torch.float32 and c.shape == x.shape
        assert torch.equal(c, s) and torch.equal(c, r)  # bit-identical, served or computed
        assert torch.equal(c, x.half().float())  # float16-rounded ...
        assert not torch.equal(c, x)  # ... which the raw float32 values are not
        assert float((c - x).abs().max()) <= 2**-10 * float(x.abs().max())


def test_every_part_of_an_activation_call_enters_its_key(tiny, tmp_path: Path):
    ctx = _items(tiny)[0]
    reply = list(tiny.tokens(" Arr!"))
    vector = torch.ones(tiny.model.get_input_embeddings().weight.shape[1])
    with Store(tmp_path / "s.sqlite") as store:
        model = CachedModel(tiny, store)
        base = model.activations([ctx], [1])[0]
        calls = [
            lambda: model.activations([ctx], [2]),
            lambda: model.activations([ctx], [1, 2]),
            lambda: model.activations([(ctx, reply)], [1], "reply_mean"),
            lambda: model.activations([(ctx, reply)], [1], "all"),
            lambda: model.activations([(ctx, reply[:1])], [1], "all"),
            lambda: model.activations([_items(tiny)[1]], [1]),
        ]
        for k, call in enumerate(calls):
            call()
            assert model.misses == k + 2, k
        with model.steer(vector, [1], 0.0):  # alpha 0: a key of its own, exactly the unsteered values
            zero = model.activations([ctx], [1])[0]
        with model.steer(vector, [1], 1.0, "all"):
            steered = model.activations([ctx], [1])[0]
        assert model.misses == len(calls) + 3
        assert torch.equal(zero, base)
        assert torch.allclose(steered, base + 1.0, atol=1e-2)  # layer 1's output plus the vector
        model.activations([ctx], [1])
        assert model.hits == 1


def test_cache_tooling_reads_activation_rows_and_a_damaged_blob_is_recomputed(tiny, tmp_path: Path):
    db = tmp_path / "s.sqlite"
    ctx = _items(tiny)[0]
    with Store(db) as store:
        model = CachedModel(tiny, store)
        store.start_run("first", {})
        first = model.activations([ctx], [1])[0]
        store.finish_run("first")
        time.sleep(0.01)
        store.start_run("second", {})
        model.activations([ctx], [1, 2])
        store.finish_run("second")
        ((key, method, served),) = store.lookups("second")
    assert method == "activations" and not served

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "maskscope.cli", *args, "--store", str(db)], capture_output=True, text=True
        )

    runs = cli("cache", "runs", "second")
    assert runs.returncode == 0 and "activations" in runs.stdout
    why = cli("cache", "why", key[:12])
    assert why.returncode == 0, why.stderr
    assert "args.layers" in why.stdout.split("It was computed")[1]
    assert cli("cache", "check").returncode == 0
    # flip one character of the first call's blob: check finds it, a run recomputes it (never serves it)
    con = sqlite3.connect(db)
    ((k1, result),) = [r for r in con.execute("SELECT key, result FROM calls") if r[0] != key]
    con.close()
    i = result.index('"safetensors":"') + 40
    edited = result[:i] + ("A" if result[i] != "A" else "B") + result[i + 1 :]
    con = sqlite3.connect(db)
    con.execute("UPDATE calls SET result = ? WHERE key = ?", (edited, k1))
    con.commit()
    con.close()
    check = cli("cache", "check")
    assert check.returncode == 1 and "1 fail their checksum" in check.stdout
    with Store(db) as store:
        model = CachedModel(tiny, store)
        again = model.activations([ctx], [1])[0]
        assert store.damaged == 1 and model.misses == 1
    assert torch.equal(again, first)
    assert cli("cache", "check").returncode == 0


def test_a_blob_keeps_values_beyond_float16_range_exactly():
    x = torch.tensor([[1.0e6, -3.0, 0.1]])
    assert torch.equal(blob_tensor(tensor_blob(x)), x)  # float32 kept: float16 would make 1e6 infinite
    y = torch.tensor([[0.1, -3.0]])
    assert torch.equal(blob_tensor(tensor_blob(y)), y.half().float())


def test_contrast_activations_go_through_the_store(tiny, tmp_path: Path):
    from maskscope import directions as dirs
    from maskscope.masks import Mask

    pirate = Mask(name="pirate", system=SYSTEM)
    plain = Mask(name="plain")
    with Store(tmp_path / "s.sqlite") as store:
        model = CachedModel(tiny, store)
        c1 = dirs.contrast_activations(model, pirate, plain, USERS, [1, 2])
        c2 = dirs.contrast_activations(model, pirate, plain, USERS, [1, 2])
        assert model.hits == 2 * len(USERS)
    assert (c1.pos == c2.pos).all() and (c1.neg == c2.neg).all()
