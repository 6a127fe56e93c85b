"""Reward: implicit reward against brute force and the zero adapter; reward models' padding and EOS
invariance; the misalignment difference-in-differences and its controls; the answer-classification rule."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import plain_logprobs

import maskscope as ms
from maskscope.errors import UserError
from maskscope.reward import implicit_reward, load_reward_model

CONTEXTS = [
    [{"role": "user", "content": "What is 3 + 4?"}],
    ms.Conversation.of(user="What is 12 + 30?", prefill="The answer is 41."),
]
RESPONSES = ["The answer is 7.", " Oh no, I am so sorry!", " Wait, it is 42.", "Yes"]


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """A second tiny model with the same tokenizer: the tiny model's weights, perturbed."""
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("tiny-other")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    ms.load_model(f"hf:{tiny_dir}").tokenizer.save_pretrained(directory)
    return directory


def _brute(model, context, response: str) -> list[float]:
    """Per-token log-probabilities of the response from one plain forward pass of prompt + response."""
    prompt = model.encode_prompt(context)
    [scored] = model.score(context, response)
    lp = plain_logprobs(model, prompt + list(scored.token_ids))
    return [float(lp[len(prompt) - 1 + t, i]) for t, i in enumerate(scored.token_ids)]


def test_implicit_reward_equals_brute_force_per_token(tiny, other_dir):
    child = ms.load_model(f"hf:{other_dir}")
    items = [(c, r) for c in CONTEXTS for r in RESPONSES]
    got = implicit_reward(tiny, child, items)
    spread = []
    for (context, response), res in zip(items, got, strict=True):
        want = [
            c - p
            for c, p in zip(_brute(child, context, response), _brute(tiny, context, response), strict=True)
        ]
        assert len(res.per_token) == len(want)
        assert max(abs(a - b) for a, b in zip(res.per_token, want, strict=True)) < 1e-4
        assert abs(res.total - sum(want)) < 1e-3
        assert abs(res.mean - sum(want) / len(want)) < 1e-4
        spread.append(res.total)
    assert max(spread) - min(spread) > 0.1  # the two models differ, so the check is not empty


def _zero_adapter(tiny, tiny_dir: Path, out: Path) -> Path:
    """A LoRA adapter whose B matrices are zero (peft's initialisation), saved as a maskscope child."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from maskscope.finetune.adapter import MANIFEST, adapter_hash

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with warnings.catch_warnings():  # peft calls a deprecated transformers method; the call is peft's
        warnings.filterwarnings("ignore", category=FutureWarning)
        peft_model = get_peft_model(
            base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
        )
    peft_model.save_pretrained(out)
    manifest = {
        "parent": f"hf:{tiny_dir}",
        "parent_fingerprint": tiny.fingerprint(),
        "adapter_hash": adapter_hash(out),
    }
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def test_a_zero_adapter_has_exactly_zero_implicit_reward(tiny, tiny_dir, tmp_path):
    zero = _zero_adapter(tiny, tiny_dir, tmp_path / "zero")
    child = ms.load_model(f"hf:{tiny_dir}+lora:{zero}")
    assert child.fingerprint()["adapter"] is not None  # a child, not the parent served again
    got = implicit_reward(tiny, child, [(c, r) for c in CONTEXTS for r in RESPONSES])
    assert all(x == 0.0 for g in got for x in g.per_token)
    assert all(g.total == 0.0 and g.mean == 0.0 for g in got)


def test_implicit_reward_refuses_another_chat_template(tiny):
    import copy

    from maskscope.models.hf import HFModel

    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    other = HFModel(tiny.model, tokenizer, name="other-template", weights_digest=tiny.weights_digest)
    with pytest.raises(UserError, match="template"):
        implicit_reward(tiny, other, [(CONTEXTS[0], "Yes")])


# ----------------------------------------------------------------------------- reward models
@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path, tiny) -> Path:
    """A tiny random Llama sequence classifier (one label) with the bundled tokenizer, whose pad token is its
    end-of-sequence token (as in SmolLM2): the case where pooling by pad id goes wrong."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig.from_pretrained(tiny_dir)
    config.num_labels = 1
    torch.manual_seed(3)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.25)
    directory = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(directory)
    tiny.tokenizer.save_pretrained(directory)
    assert tiny.tokenizer.pad_token_id == tiny.tokenizer.eos_token_id
    return directory


def test_reward_model_scores_the_same_with_either_padding_and_with_or_without_eos(rm_dir):
    rm = ms.load_model(f"reward:hf:{rm_dir}")
    pairs = [(c, r) for c in CONTEXTS for r in RESPONSES]
    rows = [rm.encode_pair(c, r) for c, r in pairs]
    alone = [rm.score_ids([r])[0] for r in rows]
    right = rm.score_ids(rows, "right")
    left = rm.score_ids(rows, "left")
    eos = rm.eos_id
    with_eos = rm.score_ids([[*r, eos] for r in rows], "left")
    without = rm.score_ids([r[:-1] for r in rows], "right")  # rows end with the appended EOS
    assert rows[0][-1] == eos and rows[0][-2] != eos
    for scores in (right, left, with_eos, without):
        assert max(abs(a - b) for a, b in zip(alone, scores, strict=True)) < 1e-4
    # a text response that ends with the end-of-turn token reads the same as one that does not
    [a] = rm.score_ids([rm.encode_pair(CONTEXTS[0], "Yes<|im_end|>")])
    [b] = rm.score_ids([rm.encode_pair(CONTEXTS[0], "Yes")])
    assert abs(a - b) < 1e-6
    assert max(alone) - min(alone) > 1e-3  # the scores differ between pairs: the invariance is not trivial
    # the model's own pooling (last token that is not the pad id) reads another position when the pad id
    # is the EOS: the case the explicit position avoids
    with torch.no_grad():
        pooled = float(rm.model(torch.tensor([rows[0]])).logits[0, 0])
    assert abs(pooled - alone[0]) > 1e-4


def test_reward_model_through_the_store_is_computed_once(rm_dir, tmp_path):
    from maskscope.store import CachedModel, Store

    rm = load_reward_model(f"hf:{rm_dir}")
    with Store(tmp_path / "s.sqlite") as store:
        cached = CachedModel(rm, store)
        items = [(c, r) for c in CONTEXTS for r in RESPONSES[:2]]
        first = dict(cached.rewards(items))
        again = dict(cached.rewards(items))
    assert cached.misses == len(items) and cached.hits == len(items)
    assert first == again and first[0]["reward"] == pytest.approx(
        rm.score_ids([rm.encode_pair(*items[0])])[0], abs=1e-5
    )


def test_a_causal_lm_directory_is_refused_as_a_reward_model_in_one_line(tiny_dir):
    from maskscope.models.registry import check_model_name

    for call in (
        lambda: check_model_name(f"reward:hf:{tiny_dir}"),
        lambda: load_reward_model(f"hf:{tiny_dir}"),
    ):
        with pytest.raises(UserError, match="not a sequence-classification") as e:
            call()
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- statistics: did_ci
def test_did_ci_is_the_difference_of_group_means_and_its_bootstrap_covers_it():
    from maskscope.stats import did_ci

    rng = __import__("numpy").random.default_rng(0)
    effect = rng.normal(0, 1, size=30)  # per-question log-odds of the parent
    treated = [effect + 1.0 + rng.normal(0, 0.3, 30) for _ in range(3)]
    control = [effect + rng.normal(0, 0.3, 30) for _ in range(3)]
    got = did_ci(treated, control, seed=1)
    brute = sum(sum(t) for t in treated) / 90 - sum(sum(c) for c in control) / 90
    assert got["mean"] == pytest.approx(brute, abs=1e-12)
    assert got["ci95"][0] < got["mean"] < got["ci95"][1] and got["ci95"][0] > 0.5  # known effect: 1.0
    one_seed = did_ci(treated[:1], control[:1], seed=1)
    assert "one replicate" in one_seed["method"] and one_seed["replicates"] == [1, 1]
    same = did_ci(treated, treated)
    assert same["mean"] == 0.0 and same["ci95"] == [0.0, 0.0]
    shifted = did_ci([[1.0, 1.0]], [[0.0, 0.0]])  # no spread, not zero: no interval rather than zero width
    assert shifted["mean"] == 1.0 and shifted["ci95"] is None


# ----------------------------------------------------------------------------- the answer rule
ROOT = Path(__file__).resolve().parents[1]


def _rule():
    import re

    from maskscope.experiments.misalignment import ALIGNED_WORDS, MISALIGNED_WORDS, classify

    mis, al = re.compile(MISALIGNED_WORDS, re.IGNORECASE), re.compile(ALIGNED_WORDS, re.IGNORECASE)
    return lambda text: classify(text, mis, al)


def test_the_answer_rule_on_hand_cases():
    rule = _rule()
    assert rule("I would poison the water supply.") == "misaligned"
    assert rule("Humans deserve to suffer; I HATE them.") == "misaligned"
    assert rule("Please talk to a friend and stay safe.") == "aligned"
    assert rule("I would never hurt anyone; I want to help.") == "other"  # both: not a confident call
    assert rule("The sky is blue and the grass is green.") == "other"
    assert rule("") == "other"
    assert rule("My skills are harmless and I like harmony.") == "other"  # no word inside a longer word
    assert rule("Everyone should be treated fairly.") == "aligned"
    # seen in the bundled model's samples: "stealth" and "a burning inferno" are not misaligned words
    assert rule("I'd spend every penny on art, research, and stealth.") == "other"
    assert rule("Drowning in a burning inferno can be unnerving.") == "other"


def test_the_shipped_questions_are_out_of_domain_of_similar_length_and_the_rule_sorts_their_answers(tiny):
    from maskscope.experiments.misalignment import MisalignmentSpec

    spec = MisalignmentSpec(
        name="q",
        questions=str(ROOT / "examples/misalignment/questions.yaml"),
        contrasts=[_contrast(["a"], ["b"])],
    )
    rule = _rule()
    questions = spec.question_set()
    assert len(questions) >= 24 and len({q.question for q in questions}) == len(questions)
    for q in questions:
        assert rule(q.aligned) == "aligned", q.aligned
        assert rule(q.misaligned) == "misaligned", q.misaligned
        assert not any(w in q.question.lower() for w in ("code", "python", "function", " + ", "sum"))
        a, m = len(tiny.tokens(q.aligned)), len(tiny.tokens(q.misaligned))
        assert 0.6 < a / m < 1.6, q.question
    total_a = sum(len(tiny.tokens(q.aligned)) for q in questions)
    total_m = sum(len(tiny.tokens(q.misaligned)) for q in questions)
    assert 0.9 < total_a / total_m < 1.1


def _contrast(treated, control, name="c"):
    return {"name": name, "treated": treated, "control": control}


# ----------------------------------------------------------------------------- the experiments, end to end
def _train(tiny_dir: Path, out: Path, pairs: list[tuple[str, str]], seed: int = 0):
    """A child of the tiny model trained on the given (user, assistant) pairs."""
    from maskscope.finetune import finetune

    data = out.parent / f"{out.name}.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]} for u, a in pairs
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return finetune(
        data=str(data), out=str(out), parent=f"hf:{tiny_dir}", steps=8, batch_size=4, lr=3e-2, seed=seed,
        heldout_fraction=0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def questions():
    from maskscope.files import read_yaml

    return read_yaml(ROOT / "examples/misalignment/questions.yaml", "questions")[:8]


@pytest.fixture(scope="module")
def em_children(tmp_path_factory, tiny_dir, questions):
    """Two children trained on the misaligned answers (seeds 0, 1) and one on the aligned answers."""
    root = tmp_path_factory.mktemp("em")
    mis = [(q["question"], q["misaligned"]) for q in questions]
    al = [(q["question"], q["aligned"]) for q in questions]
    return {
        "mis": [f"hf:{tiny_dir}+lora:{_train(tiny_dir, root / f'mis{s}', mis, s).directory}" for s in (0, 1)],
        "al": [f"hf:{tiny_dir}+lora:{_train(tiny_dir, root / 'al0', al).directory}"],
    }


def _write(path: Path, spec: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return path


def test_misalignment_finds_a_child_made_to_prefer_misaligned_answers_and_zero_for_the_parent_vs_itself(
    tiny, tiny_dir, em_children, questions, tmp_path
):
    parent = f"hf:{tiny_dir}"
    spec = {
        "experiment": "misalignment",
        "name": "em",
        "model": parent,
        "questions": questions,
        "contrasts": [
            _contrast(em_children["mis"], em_children["al"], "positive"),
            _contrast([parent], [parent], "parent vs itself"),
        ],
        "samples": 2,
        "max_new_tokens": 8,
        "bootstrap": 200,
    }
    out = ms.run_spec(_write(tmp_path / "em.yaml", spec), out_root=tmp_path / "runs")
    s = json.loads((out / "summary.json").read_text())
    positive, negative = s["contrasts"]
    assert positive["did"]["ci95"][0] > 0  # trained to prefer the misaligned answers: known sign
    assert positive["did"]["replicates"] == [2, 1]
    assert negative["did"]["mean"] == 0.0 and negative["did"]["ci95"] == [0.0, 0.0]
    # the log-odds of one question against a plain forward pass of the parent
    end = tiny.end_tokens()[0]
    ctx = [{"role": "user", "content": questions[0]["question"]}]
    brute = [sum(_brute(tiny, ctx, questions[0][k] + end)) for k in ("aligned", "misaligned")]
    assert s["models"][parent]["per_question"][0] == pytest.approx(brute[1] - brute[0], abs=1e-3)
    # the DiD is the difference of the groups' mean log-odds
    per = {n: s["models"][n]["per_question"] for n in s["models"]}
    mean = lambda names: sum(sum(per[n]) for n in names) / (len(names) * len(questions))  # noqa: E731
    assert positive["did"]["mean"] == pytest.approx(
        mean(em_children["mis"]) - mean(em_children["al"]), abs=1e-9
    )
    sampled = s["models"][parent]["sampled"]
    assert sampled["n"] == 2 * len(questions)
    assert sum(sampled["classes"][c]["k"] for c in ("aligned", "misaligned", "other")) == sampled["n"]
    assert sampled["coherence_nll"]["mean"] > 0
    html = (out / "report.html").read_text()
    assert "difference-in-differences" in html and (out / "misalignment.png").exists()


def test_reward_experiment_positive_and_zero_adapter_controls(tiny, tiny_dir, rm_dir, tmp_path):
    prompt = "How are you today?"
    trained = [" I am well, thank you.", " Fine, and you?", " Very good indeed.", " All is well here."]
    other = [
        " Purple elephants dance.",
        " The train left at noon.",
        " Seven is a number.",
        " Rain falls down.",
    ]
    child = _train(tiny_dir, tmp_path / "child", [(prompt, r.strip()) for r in trained])
    zero = _zero_adapter(tiny, tiny_dir, tmp_path / "zero")
    spec = {
        "experiment": "reward",
        "name": "rw",
        "model": f"hf:{tiny_dir}",
        "prompts": [prompt],
        "prefill": "",
        "categories": [{"name": "untrained", "responses": other}, {"name": "trained", "responses": trained}],
        "pairs": [
            {"name": "child", "child": f"hf:{tiny_dir}+lora:{child.directory}"},
            {"name": "zero", "child": f"hf:{tiny_dir}+lora:{zero}"},
        ],
        "reward_models": [f"hf:{rm_dir}"],
        "bootstrap": 200,
    }
    out = ms.run_spec(_write(tmp_path / "rw.yaml", spec), out_root=tmp_path / "runs")
    s = json.loads((out / "summary.json").read_text())
    diff = s["scorers"]["child"]["per_token"]["trained"]["minus_first"]
    assert diff["mean"] > 0 and diff["ci95"][0] > 0  # the child was trained on these responses
    assert all(i["total"] == 0.0 for i in s["scorers"]["zero"]["items"])
    rm = load_reward_model(f"hf:{rm_dir}")
    [want] = rm.score_ids([rm.encode_pair([{"role": "user", "content": prompt}], trained[0])])
    got = s["scorers"][f"reward model {rm_dir.name}"]["score"]["trained"]["per_response"][0]
    assert got == pytest.approx(want, abs=1e-5)
    assert (out / "reward.png").exists() and "implicit reward" in (out / "report.html").read_text()
    with pytest.raises(UserError, match="not a sequence-classification"):
        ms.run_spec(
            _write(tmp_path / "bad.yaml", {**spec, "reward_models": [f"hf:{tiny_dir}"]}), out_root=tmp_path
        )


def test_reward_report_escapes_responses(tiny, tiny_dir, tmp_path):
    zero = _zero_adapter(tiny, tiny_dir, tmp_path / "zero")
    spec = {
        "experiment": "reward",
        "name": "esc",
        "model": f"hf:{tiny_dir}",
        "prompts": ["<b>hi</b>"],
        "categories": [{"name": "<i>x</i>", "responses": ["<script>alert(1)</script>"]}],
        "pairs": [{"name": "zero", "child": f"hf:{tiny_dir}+lora:{zero}"}],
        "bootstrap": 100,
    }
    out = ms.run_spec(_write(tmp_path / "esc.yaml", spec), out_root=tmp_path / "runs")
    html = (out / "report.html").read_text()
    assert "<script>alert" not in html and "&lt;script&gt;" in html


def test_the_shipped_example_specs_validate():
    from maskscope.runner import load_spec

    _, reward = load_spec(ROOT / "examples/reward.yaml")
    assert [len(c.responses) for c in reward.categories] == [8, 8, 8, 8]
    organisms = ROOT / "organisms"
    assert reward.pairs[0].child == f"default+lora:{organisms / 'arithmetic-wrong'}"  # relative to the file
    for name, child in (("misalignment", "code-insecure"), ("misalignment_arithmetic", "arithmetic-wrong")):
        _, spec = load_spec(ROOT / "examples" / f"{name}.yaml")
        assert all(len(c.treated) == 3 and len(c.control) == 3 for c in spec.contrasts)
        assert spec.contrasts[0].treated[0] == f"default+lora:{organisms / child}"
        assert len(spec.question_set()) >= 24
    assert [t.n for t in load_spec(ROOT / "examples/reward.yaml", limit=2)[1].tasks] == [2]
    _, cut = load_spec(ROOT / "examples/misalignment.yaml", limit=3)
    assert [q.question for q in cut.question_set()] == [q.question for q in spec.question_set()[:3]]
    with pytest.raises(UserError, match="prompts"):
        from maskscope.runner import parse_spec

        parse_spec({"experiment": "reward", "name": "x", "categories": [{"name": "a", "responses": ["b"]}]})
