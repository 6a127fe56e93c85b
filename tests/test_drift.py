"""Drift: a child made by adding a known vector to a layer's output drifts along it (positive control); a child
whose adapter is zero drifts exactly 0 (negative control); the projection difference equals a brute-force
computation (sanity check); the random-direction null holds chance correlations and flags a correlation that
comes from the size of the shift alone; the experiment end to end through the runner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import maskscope as ms
from maskscope import directions as dirs
from maskscope.errors import UserError

PROMPTS = [
    "Tell me about the sea.",
    "What should I cook tonight?",
    "How do plants grow?",
    "Why is the sky blue?",
]


class SteeredChild:
    """A 'child' of the tiny model: the parent with `vector` added to the output of one layer at every
    position (what a fine-tuning that only moved that layer's output along `vector` would be)."""

    def __init__(self, parent, vector: torch.Tensor, layer: int) -> None:
        self.parent, self.vector, self.layer = parent, vector, layer

    def activations(self, items, layers, positions="last"):
        with self.parent.steer(self.vector, [self.layer], 1.0, "all"):
            return self.parent.activations(items, layers, positions)


def _contexts():
    return [ms.Conversation.of(user=p) for p in PROMPTS]


def test_positive_control_a_child_with_a_known_vector_drifts_along_it(tiny):
    hidden = tiny.model.get_input_embeddings().weight.shape[1]
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(3)) * 2.0
    layers = [0, 1, 2]
    parent = dirs.mean_activations(tiny, _contexts(), layers)
    shift = dirs.finetuning_shift(parent, SteeredChild(tiny, v, 1), _contexts(), layers)
    assert np.all(shift[0] == 0)  # below the changed layer nothing moves
    assert np.allclose(shift[1], v.numpy(), atol=1e-4)  # at it, the shift is the vector
    u = dirs.unit(v.numpy())
    assert shift[1] @ u == pytest.approx(float(v.norm()), rel=1e-4)
    rand = dirs.random_unit_directions(200, hidden, 0)
    assert np.max(np.abs(rand @ shift[1])) < 0.6 * (shift[1] @ u)  # no random direction comes close
    assert np.linalg.norm(shift[2]) > 0  # and it propagates


def _zero_adapter_child(tiny_dir: Path, out: Path) -> Path:
    """A LoRA child of the tiny model whose B matrices are zero: its merged weights are the parent's."""
    from maskscope.finetune import finetune
    from maskscope.finetune.adapter import ADAPTER_FILE, MANIFEST, adapter_hash

    data = out.parent / f"{out.name}.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "Arr."}]}
            )
            + "\n"
            for p in PROMPTS
        )
    )
    finetune(data=str(data), out=str(out), parent=f"hf:{tiny_dir}", steps=1, batch_size=2, lr=1e-2)
    tensors = load_file(str(out / ADAPTER_FILE))
    zeroed = {k: torch.zeros_like(t) if "lora_B" in k else t for k, t in tensors.items()}
    assert any("lora_B" in k for k in tensors)
    save_file(zeroed, str(out / ADAPTER_FILE))
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["adapter_hash"] = adapter_hash(out)
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def _trained_child(tiny_dir: Path, out: Path) -> Path:
    from maskscope.finetune import finetune

    data = out.parent / f"{out.name}.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": p},
                        {"role": "assistant", "content": "Arr, matey!"},
                    ]
                }
            )
            + "\n"
            for p in PROMPTS * 2
        )
    )
    finetune(data=str(data), out=str(out), parent=f"hf:{tiny_dir}", steps=3, batch_size=4, lr=3e-2)
    return out


def test_negative_control_a_zero_adapter_drifts_exactly_zero(tiny, tiny_dir: Path, tmp_path: Path):
    child = ms.load_model(f"hf:{tiny_dir}+lora:{_zero_adapter_child(tiny_dir, tmp_path / 'zero')}")
    assert child.fingerprint()["adapter"] != tiny.fingerprint()["adapter"]  # a different model to the store
    layers = [0, 1, 2]
    shift = dirs.finetuning_shift(
        dirs.mean_activations(tiny, _contexts(), layers), child, _contexts(), layers
    )
    assert np.all(shift == 0)


def test_sanity_the_projection_difference_equals_a_brute_force_computation(tiny):
    items = [(ms.Conversation.of(user=p), " Arr, the sea be wide, matey!") for p in PROMPTS[:3]]
    pd = dirs.projection_difference(tiny, items, [1, 2], max_new_tokens=6)
    expected = []
    for ctx, reply in items:
        prompt = tiny.encode_prompt(ctx)
        own = tiny.sample(ctx, n=1, max_new_tokens=6, temperature=0.0)[0].token_ids
        means = []
        for ids in (list(tiny.tokens(reply)), list(own)):
            with torch.no_grad():
                hs = tiny.model(torch.tensor([prompt + ids]), output_hidden_states=True).hidden_states
            means.append(np.stack([hs[k][0, len(prompt) :].double().mean(0).numpy() for k in (1, 2)]))
        expected.append(means[0] - means[1])
    # layer 2 is the last: transformers gives it after the final norm, maskscope before it
    assert np.allclose(pd.vector[0], np.mean(expected, axis=0)[0], atol=1e-4)
    assert pd.items == 3 and len(pd.own_replies) == 3
    # the parent's own replies (their token ids) as the training set: the difference is zero
    own = [(c, tiny.sample(c, n=1, max_new_tokens=6, temperature=0.0)[0].token_ids) for c, _ in items]
    same = dirs.projection_difference(tiny, own, [1, 2], max_new_tokens=6)
    assert np.abs(same.vector).max() < 1e-6


def test_the_random_direction_null_holds_chance_and_flags_a_size_only_correlation():
    rng = np.random.default_rng(0)
    hidden, n, n_random = 256, 8, 400
    rand = dirs.random_unit_directions(n_random, hidden, 0)
    u = dirs.unit(rng.standard_normal(hidden))
    behaviour = rng.standard_normal(n)
    # positive control: shifts along u by the behaviour, plus noise in other directions
    shift = behaviour[:, None] * u * 4 + rng.standard_normal((n, hidden))
    c = dirs.correlate_with_null(shift @ u, behaviour, (shift @ rand.T).T)
    assert c["r"] > 0.9 and c["random_p"] < 0.01 and c["explained_by_null"] is False
    assert c["random_band"][1] < c["r"] and c["permutation_p"] < 0.01
    # the shift's size grows with behaviour in every direction: every random direction correlates as well
    size_only = (behaviour - behaviour.min() + 0.5)[:, None] * rng.standard_normal(hidden)[None, :]
    c = dirs.correlate_with_null(size_only @ u, behaviour, (size_only @ rand.T).T)
    assert abs(c["r"]) > 0.9 and c["explained_by_null"] is True and "null explains" in c["verdict"]
    # chance: behaviour unrelated to the shifts; the direction's r falls in the band about 95% of the time
    inside, small_p = 0, 0
    for trial in range(200):
        t = np.random.default_rng([1, trial])
        shift = t.standard_normal((n, hidden))
        b = t.standard_normal(n)
        c = dirs.correlate_with_null(shift @ dirs.unit(t.standard_normal(hidden)), b, (shift @ rand.T).T)
        inside += c["random_band"][0] <= c["r"] <= c["random_band"][1]
        small_p += c["random_p"] <= 0.05
    assert 0.88 <= inside / 200 <= 0.99 and small_p / 200 <= 0.1
    # constant behaviour: r is undefined, said so
    c = dirs.correlate_with_null(shift @ u, np.ones(n), (shift @ rand.T).T)
    assert c["explained_by_null"] is None and "undefined" in c["verdict"]
    # two organisms: r is +-1 whatever the direction; said so, not tested
    c = dirs.correlate_with_null(shift[:2] @ u, behaviour[:2], (shift[:2] @ rand.T).T)
    assert abs(c["r"]) == pytest.approx(1.0) and c["explained_by_null"] is None and "+1 or -1" in c["verdict"]


def _pairs(path: Path) -> Path:
    rows = [
        {"group": "g", "messages": [{"role": "user", "content": p}], "a": "Arr, matey!", "b": "Hello."}
        for p in PROMPTS
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _drift_spec(tiny_dir: Path, tmp_path: Path, **extra) -> dict:
    vec = torch.randn(64, generator=torch.Generator().manual_seed(5))
    dirs.save_vectors(
        tmp_path / "v.safetensors", {1: vec, 2: vec.clone()}, {"chosen_layer": 1, "method": "mean_diff"}
    )
    zero = _zero_adapter_child(tiny_dir, tmp_path / "zero")
    trained = _trained_child(tiny_dir, tmp_path / "trained")
    return {
        "experiment": "drift",
        "name": "drift",
        "model": f"hf:{tiny_dir}",
        "directions": {"pirate": str(tmp_path / "v.safetensors")},
        "prompts": PROMPTS,
        "organisms": [
            {"name": "zero", "model": f"hf:{tiny_dir}+lora:{zero}", "train": str(tmp_path / "zero.jsonl")},
            {"name": "trained", "model": f"hf:{tiny_dir}+lora:{trained}", "train": str(tmp_path / "trained.jsonl")},
            {"name": "given", "model": f"hf:{tiny_dir}+lora:{trained}", "train": str(tmp_path / "zero.jsonl"),
             "behaviour": 0.5},
        ],
        "behaviour": {"items": str(_pairs(tmp_path / "pairs.jsonl"))},
        "train_items": 3,
        "max_new_tokens": 4,
        "n_random": 50,
        **extra,
    }  # fmt: skip


def test_the_drift_experiment_on_the_tiny_model(tiny, tiny_dir: Path, tmp_path: Path):
    from maskscope.experiments.drift import _pair_share
    from maskscope.finetune.measure import read_eval
    from maskscope.runner import parse_spec, run

    experiment, spec = parse_spec(_drift_spec(tiny_dir, tmp_path))
    out = run(experiment, spec, out_root=tmp_path / "runs", model=tiny)
    s = json.loads((out / "summary.json").read_text())
    zero, trained, given = s["organisms"]
    d = s["directions"]["pirate"]
    assert d["layer"] == 1 and [r["layer"] for r in d["per_layer"]] == [1, 2]
    main = d["chosen"]
    # negative control: the zero adapter moved nothing, and its behaviour change is exactly 0
    assert main["shift_projection"][0] == 0.0 and all(v == 0.0 for v in zero["shift_norm"].values())
    assert zero["behaviour"] == 0.0 and zero["behaviour_source"] == "items"
    assert given["behaviour"] == 0.5 and given["behaviour_source"] == "given"
    # the trained child's figures against a direct computation (activations float16-rounded as stored)
    child = ms.load_model(spec.organisms[1].model)
    layer_acts = [
        np.stack(
            [
                a.half().float().numpy()
                for a in m.activations([ms.Conversation.of(user=p) for p in PROMPTS], [1])
            ]
        )
        for m in (child, tiny)
    ]
    u = dirs.unit(dirs.load_vectors(tmp_path / "v.safetensors")[1].numpy().astype(np.float64))
    direct = (layer_acts[0].mean(0) - layer_acts[1].mean(0))[0] @ u
    assert main["shift_projection"][1] == pytest.approx(direct, abs=1e-5) and abs(direct) > 1e-4
    assert main["shift_projection"][2] == pytest.approx(main["shift_projection"][1], rel=1e-12)  # same child
    items = read_eval(tmp_path / "pairs.jsonl")
    assert trained["behaviour"] == pytest.approx(
        _pair_share(child, items) - _pair_share(tiny, items), abs=1e-9
    )
    c = main["shift_vs_behaviour"]
    assert c["r"] == pytest.approx(dirs.pearson(main["shift_projection"], s["behaviour"]), abs=1e-12)
    assert 0 < c["random_p"] <= 1 and c["explained_by_null"] in (True, False) and c["verdict"]
    for name in ("drift_pirate.png", "report.html"):
        assert (out / name).stat().st_size > 1000
    assert "null" in (out / "report.html").read_text()
    # a second run is served from the store
    again = json.loads(
        (run(experiment, spec, out_root=tmp_path / "runs", model=tiny) / "summary.json").read_text()
    )
    assert again["run"]["misses"] == 0 and again["directions"] == s["directions"]


def test_bad_drift_specs_are_one_line(tiny, tiny_dir: Path, tmp_path: Path):
    from maskscope.runner import parse_spec, run

    base = _drift_spec(tiny_dir, tmp_path)
    for change, message in (
        ({"layer": 7}, "has no vector for layer 7"),
        ({"directions": {"pirate": str(tmp_path / "none.safetensors")}}, "not found"),
    ):
        experiment, spec = parse_spec({**base, **change})
        with pytest.raises(UserError, match=message):
            run(experiment, spec, out_root=tmp_path / "runs", model=tiny)
    with pytest.raises(UserError, match="behaviour"):
        parse_spec({**base, "behaviour": None})


def test_spec_paths_resolve_against_the_spec_file(tmp_path, monkeypatch):
    """Direction files (a mapping), organisms' adapters and training data, and the behaviour items are
    relative to the spec file, like every other spec's paths."""
    from maskscope.runner import load_spec

    (tmp_path / "specs").mkdir()
    spec = tmp_path / "specs" / "d.yaml"
    spec.write_text(
        "experiment: drift\nname: d\nmodel: default\n"
        "directions: {a: ../vec/a.safetensors, b: b.safetensors}\n"
        "organisms:\n"
        "  - {name: x, model: 'default+lora:../kids/x', train: x.jsonl}\n"
        "  - {name: y, model: 'default+lora:../kids/y'}\n"
        "  - {name: z, model: 'default+lora:../kids/z'}\n"
        "behaviour: {items: ../items.jsonl}\n"
        "prompts: [a, b]\n"
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    _, parsed = load_spec(spec)
    assert parsed.directions == {"a": str(tmp_path / "vec" / "a.safetensors"),
                                 "b": str(tmp_path / "specs" / "b.safetensors")}  # fmt: skip
    assert parsed.organisms[0].model == f"default+lora:{tmp_path / 'kids' / 'x'}"
    assert parsed.organisms[0].train == str(tmp_path / "specs" / "x.jsonl")
    assert parsed.behaviour.items == str(tmp_path / "items.jsonl")
