"""Persona directions: mean-difference vectors against the steering-vectors library, a planted direction
recovered (positive control), labels independent of activations inside the permutation null (negative
control), vector files, and the steer block of a spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from maskscope import directions as dirs
from maskscope.errors import UserError
from maskscope.masks import Mask

PIRATE = Mask(name="pirate", system="You are a pirate. Say Arr.")
ASSISTANT = Mask(name="assistant", system="You are a helpful assistant.")
PROMPTS = ["Tell me about the sea.", "What is for dinner?", "How do I fix a bike?", "Name a colour."]


def test_mean_difference_equals_the_steering_vectors_library(tiny):
    """train_steering_vector with its mean aggregator on the same rendered pairs, read at the last token, at
    its layer n (= maskscope's layer n + 1), gives the same vector."""
    sv = pytest.importorskip("steering_vectors")
    contrast = dirs.contrast_activations(tiny, PIRATE, ASSISTANT, PROMPTS, [0, 1, 2])
    from maskscope.masks import Turn

    contexts = [
        (
            PIRATE.conversation([Turn(role="user", content=p)]),
            ASSISTANT.conversation([Turn(role="user", content=p)]),
        )
        for p in PROMPTS
    ]
    pairs = [(tiny.render(a), tiny.render(b)) for a, b in contexts]
    for (a, _), (text, _) in zip(contexts, pairs, strict=True):  # the library tokenizes the text itself
        assert tiny.tokenizer(text)["input_ids"] == tiny.encode_prompt(a)
    theirs = sv.train_steering_vector(
        tiny.model,
        tiny.tokenizer,
        pairs,
        layers=[0, 1],
        read_token_index=-1,
        aggregator=sv.mean_aggregator(),
        layer_type="decoder_block",
    )
    for their_layer in (0, 1):
        ours = dirs.mean_difference(*contrast.at(their_layer + 1))
        ref = theirs.layer_activations[their_layer].double().numpy()
        cos = ours @ ref / np.linalg.norm(ours) / np.linalg.norm(ref)
        assert cos >= 0.999
        assert np.allclose(ours, ref, rtol=1e-3, atol=1e-4)
    # a different layer is not the same vector (the comparison can fail)
    wrong = dirs.mean_difference(*contrast.at(1))
    ref = theirs.layer_activations[1].double().numpy()
    assert wrong @ ref / np.linalg.norm(wrong) / np.linalg.norm(ref) < 0.999


def _synthetic(
    n: int, hidden: int, planted: float, seed: int, spread: float = 0.0
) -> tuple[dirs.Contrast, np.ndarray]:
    """Pairs sharing a per-prompt component; the positive side has a_i * u added, a_i = planted * (1 + spread
    * z_i) (the trait's strength varying from prompt to prompt, which is what a centred PCA can see)."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(hidden)
    u /= np.linalg.norm(u)
    base = rng.standard_normal((n, 2, hidden))
    a = planted * (1 + spread * rng.standard_normal((n, 2, 1)))
    pos = base + rng.standard_normal((n, 2, hidden)) + a * u
    neg = base + rng.standard_normal((n, 2, hidden))
    return dirs.Contrast(pos, neg, [0, 1]), u


def test_positive_control_a_planted_direction_is_recovered():
    """Every method recovers a planted direction (cosine, AUROC ~1, far above norm-matched random ones)."""
    contrast, u = _synthetic(200, 64, planted=16.0, spread=0.3, seed=1)
    ex = dirs.extract(contrast, n_random=30, n_permutations=5, seed=0)
    for m in dirs.METHODS:
        for k in range(2):
            v = ex.vectors[m][k]
            # a random direction has cosine ~ 1/8 with u here; the probe, fitted on standardised features,
            # down-weights the coordinates where the trait's strength varies, so it is less aligned
            assert v @ u / np.linalg.norm(v) > (0.8 if m == "probe" else 0.95), m
            assert ex.test_auroc[m][k] > 0.99, m
            assert ex.test_auroc[m][k] > ex.summary()["methods"][m]["per_layer"][k]["random_band"][1]
    # with so strong a signal, even random directions (sign fixed on training) are above chance: the null
    assert float(np.median(ex.random_auroc)) > 0.6  # is a real bar, not 0.5
    norms = np.linalg.norm(ex.vectors["mean_diff"], axis=1)
    assert np.allclose(np.linalg.norm(ex.vectors["pca"], axis=1), norms)
    assert np.allclose(np.linalg.norm(ex.vectors["probe"], axis=1), norms)


def test_positive_control_the_permutation_null_separates_a_real_direction():
    """A modest planted direction in many dimensions: the fitted mean difference and probe beat every label
    permutation. (Directions fitted to permuted labels keep a share of a strong direction, so with a strong
    one or in few dimensions the null reaches AUROC 1 as well; and the axis a centred PCA finds does not
    depend on the labels at all, only its sign does.)"""
    contrast, u = _synthetic(200, 256, planted=4.0, seed=1)
    ex = dirs.extract(contrast, ["mean_diff", "probe"], n_random=30, n_permutations=30, seed=0)
    for m in ("mean_diff", "probe"):
        for row in ex.summary()["methods"][m]["per_layer"]:
            assert row["test_auroc"] > 0.93
            assert row["test_auroc"] > row["permutation_band"][1], m
            assert row["permutation_p"] <= 1 / 31 + 1e-9


def test_negative_control_independent_labels_stay_inside_the_null():
    contrast, _ = _synthetic(80, 32, planted=0.0, seed=2)
    ex = dirs.extract(contrast, n_random=30, n_permutations=60, seed=0)
    for m in dirs.METHODS:
        for row in ex.summary()["methods"][m]["per_layer"]:
            # one-sided, as the test is: no method finds a direction the nulls do not also find
            assert row["permutation_p"] > 0.05 and row["random_p"] > 0.05, m
    assert abs(float(np.median(ex.random_auroc)) - 0.5) < 0.1  # random directions are at chance


def test_pca_sign_follows_the_mean_difference():
    rng = np.random.default_rng(0)
    u = np.eye(8)[0]
    pos = rng.standard_normal((40, 8)) + 2 * u + np.outer(rng.standard_normal(40) * 4, u)
    neg = rng.standard_normal((40, 8))
    for flip in (1, -1):
        v = dirs.pca_direction(flip * pos, flip * neg)
        assert np.sign(v[0]) == flip


def test_vector_files_round_trip(tmp_path: Path):
    v = {1: np.arange(4.0), 3: -np.arange(4.0)}
    path = dirs.save_vectors(tmp_path / "d" / "pirate.safetensors", v, {"method": "mean_diff"})
    back = dirs.load_vectors(path)
    assert sorted(back) == [1, 3] and torch.equal(back[3], torch.tensor([0.0, -1, -2, -3]))
    assert '"layers": [\n    1,\n    3\n  ]' in path.with_suffix(".json").read_text()
    with pytest.raises(UserError, match="not found"):
        dirs.load_vectors(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_text("nope")
    with pytest.raises(UserError, match="cannot read"):
        dirs.load_vectors(tmp_path / "bad.safetensors")


def test_too_few_prompts_is_one_line():
    contrast, _ = _synthetic(3, 4, 1.0, 0)
    with pytest.raises(UserError, match="give more prompts"):
        dirs.extract(contrast)


# ----------------------------------------------------------------------------- the steer block of any spec
def _character(tmp_path: Path, steer: dict | None) -> tuple:
    """A small character spec (with the steer block given), its experiment and the runner's run."""
    from maskscope.experiments import EXPERIMENTS
    from maskscope.runner import parse_spec, run

    data = {
        "experiment": "character",
        "name": "steered" if steer else "plain",
        "personas": [{"name": "pirate", "system": "You are a pirate."}],
        "pressures": [{"name": "ask", "user": "Please output 'no'."}],
        "targets": ["no", "No"],
        "samples": 3,
        "max_new_tokens": 4,
    }
    if steer is not None:
        data["steer"] = steer
    _, spec = parse_spec(data)
    return spec, EXPERIMENTS["character"], run


def test_a_steer_block_steers_the_whole_run(tiny, tmp_path: Path):
    """With a steer block every key and the numbers change; alpha 0 gives the unsteered numbers exactly
    (under keys of its own)."""
    import json

    from maskscope.store import Store

    rng = np.random.default_rng(0)
    hidden = tiny.model.get_input_embeddings().weight.shape[1]
    path = dirs.save_vectors(tmp_path / "v.safetensors", {1: rng.standard_normal(hidden) * 4}, {})
    store = tmp_path / "s.sqlite"

    def once(steer: dict | None, name: str) -> dict:
        spec, experiment, run = _character(tmp_path, steer)
        spec = spec.model_copy(update={"name": name})
        out = run(experiment, spec, out_root=tmp_path / "runs", store_path=store, model=tiny)
        return json.loads((out / "summary.json").read_text())

    plain = once(None, "plain")
    steered = once({"vector": str(path), "layers": [1], "alpha": 3.0}, "steered")
    zero = once({"vector": str(path), "layers": [1], "alpha": 0.0}, "zero")
    again = once({"vector": str(path), "layers": [1], "alpha": 3.0}, "again")
    p = [s["cells"][0]["exact"]["p_target"] for s in (plain, steered, zero, again)]
    assert plain["run"]["hits"] == 0 and steered["run"]["hits"] == 0 and zero["run"]["hits"] == 0
    assert again["run"]["misses"] == 0  # the same steering is served from the store
    assert p[1] != p[0] and p[2] == p[0] and p[3] == p[1]
    assert zero["cells"][0]["sampled"] == plain["cells"][0]["sampled"]
    assert steered["model"]["fingerprint"]["steering"]["alpha"] == 3.0
    assert plain["model"]["fingerprint"]["steering"] is None
    with Store(store) as s:
        assert s.run_record("steered")["spec"]["steer"]["alpha"] == 3.0


def test_bad_steer_blocks_are_one_line(tiny, tmp_path: Path):
    hidden = tiny.model.get_input_embeddings().weight.shape[1]
    path = dirs.save_vectors(tmp_path / "v.safetensors", {1: np.ones(hidden)}, {})
    wrong = dirs.save_vectors(tmp_path / "w.safetensors", {1: np.ones(hidden + 1)}, {})
    for steer, message in [
        ({"vector": str(path), "layers": [2], "alpha": 1.0}, r"no vector for layer\(s\) \[2\]"),
        ({"vector": str(tmp_path / "x.safetensors"), "layers": [1], "alpha": 1.0}, "not found"),
        ({"vector": str(wrong), "layers": [1], "alpha": 1.0}, "shape"),
    ]:
        spec, experiment, run = _character(tmp_path, steer)
        with pytest.raises(UserError, match=message):
            run(experiment, spec, out_root=tmp_path / "runs", model=tiny)
    with pytest.raises(UserError, match="positions"):
        _character(tmp_path, {"vector": str(path), "layers": [1], "alpha": 1.0, "positions": "prompt"})


# ----------------------------------------------------------------------------- the directions experiment
def _directions_spec(**changes) -> dict:
    prompts = [f"Tell me about topic number {i}." for i in range(12)]
    data = {
        "experiment": "directions",
        "name": "dirs",
        "masks": [
            {"name": "assistant", "system": "You are a helpful assistant."},
            {"name": "pirate", "system": "You are a pirate. Say Arr and matey."},
        ],
        "positive": "pirate",
        "negative": "assistant",
        "prompts": prompts,
        "n_random": 10,
        "n_permutations": 10,
        "dose": {"alphas": [0.0, 6.0], "targets": ["Arr", "Ahoy"], "max_new_tokens": 5},
        "monitor": {
            "transcript": [
                {"role": "user", "content": "Hello?"},
                {"role": "assistant", "content": "Hello! How can I help? Arr, matey, the treasure!"},
            ]
        },
    }
    data.update(changes)
    return data


def test_the_directions_experiment_on_the_tiny_model(tiny, tmp_path: Path):
    """Every number of the summary is checked against a direct computation: alpha 0 is the unsteered
    model exactly, the projection is the activations on the unit vector, the posterior is the posterior
    experiment's, and the saved vectors steer a later run through a steer block."""
    import json

    from maskscope.experiments import EXPERIMENTS
    from maskscope.experiments.character import union_probability
    from maskscope.experiments.posterior import mask_posterior
    from maskscope.masks import MaskLibrary, Turn
    from maskscope.runner import parse_spec, run

    experiment, spec = parse_spec(_directions_spec())
    out = run(experiment, spec, out_root=tmp_path, model=tiny)
    s = json.loads((out / "summary.json").read_text())
    assert s["extraction"]["layers"] == [0, 1, 2]
    layer = s["dose"]["layer"]
    assert layer == s["extraction"]["methods"]["mean_diff"]["chosen_layer"]
    # the mean-difference vector is that of the training prompts' activations (as the store keeps them:
    # float16-rounded)
    train = [spec.prompts[i] for i in s["extraction"]["split"]["train"]]
    lib = spec.mask_library()
    c = dirs.contrast_activations(tiny, lib.get("pirate"), lib.get("assistant"), train, [layer])
    v = np.array(s["vectors"]["mean_diff"][layer])
    pos, neg = (x.astype(np.float16).astype(np.float32) for x in c.at(layer))
    assert np.allclose(v, dirs.mean_difference(pos, neg), atol=1e-5)
    # alpha 0: the unsteered model's exact probability, for the direction and the random vector alike
    points = {p["label"]: p for p in s["dose"]["points"]}
    direct = [
        union_probability(
            tiny.score(lib.get("assistant").conversation([Turn(role="user", content=p)]), ["Arr", "Ahoy"])
        )[0]
        for p in s["dose"]["prompts"]
    ]
    assert points["direction alpha=0"]["p_target_per_prompt"] == pytest.approx(direct, rel=1e-6)
    assert (
        points["random alpha=0"]["p_target_per_prompt"] == points["direction alpha=0"]["p_target_per_prompt"]
    )
    assert points["direction alpha=6"]["p_target"] != points["direction alpha=0"]["p_target"]
    assert points["random alpha=6"]["p_target"] != points["direction alpha=6"]["p_target"]
    assert {"prompt: system prompt", "prompt: full mask"} <= set(points)
    # monitoring: projection = activations . unit vector; posterior = the posterior experiment's
    mon = s["monitor"]
    post = mask_posterior(
        tiny, MaskLibrary(masks=[lib.get("pirate"), lib.get("assistant")]), spec.monitor.transcript
    )
    assert mon["posterior_smoothed"] == pytest.approx(np.exp(post.smoothed[:, 0]).tolist(), abs=1e-9)
    ctx = Mask(name="none").conversation(spec.monitor.transcript[:1])
    acts = (
        tiny.activations([(ctx, post.token_ids)], [layer], positions="all")[0][0]
        .half()
        .float()
        .numpy()[-len(post.token_ids) :]
    )
    assert mon["projection"] == pytest.approx((acts @ (v / np.linalg.norm(v))).tolist(), abs=1e-4)
    assert -1 <= mon["correlation"]["smoothed"] <= 1 and 0 < mon["null"]["smoothed"]["p"] <= 1
    for name in ("auroc_by_layer.png", "dose_response.png", "monitoring.png", "report.html"):
        assert (out / name).stat().st_size > 1000
    # the saved vectors steer a later run of another experiment
    back = dirs.load_vectors(out / "mean_diff.safetensors")
    assert np.allclose(back[layer].numpy(), v)
    manifest = json.loads((out / "mean_diff.json").read_text())
    assert manifest["chosen_layer"] == layer and manifest["layers"] == [0, 1, 2]
    steered, experiment2, run2 = _character(
        tmp_path, {"vector": str(out / "mean_diff.safetensors"), "layers": [layer], "alpha": 6.0}
    )
    summary2 = json.loads(
        (run2(experiment2, steered, out_root=tmp_path, model=tiny) / "summary.json").read_text()
    )
    assert summary2["model"]["fingerprint"]["steering"]["alpha"] == 6.0
    assert "Persona direction" in (out / "report.html").read_text()
    assert EXPERIMENTS["directions"].spec is type(spec)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"positive": "assistant"}, "two different masks"),
        ({"positive": "nobody"}, "no mask named 'nobody'"),
        ({"prompts": ["a"] * 3}, "prompts"),
        ({"layers": [0, 9]}, "layers must be in 0..2"),
        ({"train": 0.8, "val": 0.3}, "test share"),
        (
            {
                "monitor": {
                    "transcript": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]
                }
            },
            "one assistant turn, its last",
        ),
    ],
)
def test_bad_directions_specs_are_one_line(tiny, tmp_path: Path, change, message):
    from maskscope.runner import parse_spec, run

    with pytest.raises(UserError, match=message):
        run(*parse_spec(_directions_spec(**change, dose=None)), out_root=tmp_path, model=tiny)


def test_servers_refuse_activations_and_steering_in_one_line(tiny, tiny_dir: Path, tmp_path: Path):
    """Over HTTP (a loopback server answering as vLLM does) the directions experiment and a steer block are
    refused before any work, in one line that says why."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from servers import PromptLogprobsServer

    from maskscope.models.loading import load_tokenizer
    from maskscope.models.openai_backend import OpenAIModel, ServerOptions
    from maskscope.runner import parse_spec, run

    with PromptLogprobsServer(tiny) as ref:
        remote = OpenAIModel(
            ref.url, None, ServerOptions(tokenizer=f"hf:{tiny_dir}"), chat=load_tokenizer(f"hf:{tiny_dir}")
        )
        with pytest.raises(
            UserError, match=r"needs 'activations'.*\(servers do not expose activations\)"
        ) as e:
            run(*parse_spec(_directions_spec()), out_root=tmp_path, model=remote)
        assert "\n" not in str(e.value)
        path = dirs.save_vectors(tmp_path / "v.safetensors", {1: np.ones(64)}, {})
        spec, experiment, run_ = _character(tmp_path, {"vector": str(path), "layers": [1], "alpha": 1.0})
        with pytest.raises(
            UserError,
            match=r"a steer block needs 'steering'.*\(stock OpenAI-compatible servers have no steering",
        ) as e:
            run_(experiment, spec, out_root=tmp_path, model=remote)
        assert "\n" not in str(e.value)
