"""The engine's contracts: random streams per context, the LM-head probe, no deprecated calls, one cache
layer that refuses what it does not cache, typed capabilities, and a light `import maskscope`."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import maskscope as ms
from maskscope.errors import UserError
from maskscope.models.base import Capability, SampleParams, require
from maskscope.store import CachedModel, Store


def test_two_contexts_with_the_same_seed_and_index_draw_from_different_streams(tiny):
    """Sample i of two contexts must not share uniforms: with a shared stream, the first token drawn from
    two contexts whose distributions are equal would always coincide. The same prompt under two prefills
    that leave the next-token distribution nearly unchanged would then give equal draws for every index."""
    a = ms.Conversation.of(user="Tell me a story.")
    b = ms.Conversation.of(user="Tell me a story!")
    params = SampleParams(max_new_tokens=1, temperature=1e4, seed=7)  # near-uniform: draws = uniforms
    first_a = [s.token_ids[:1] for s in tiny.sample_indices(a, range(40), params)]
    first_b = [s.token_ids[:1] for s in tiny.sample_indices(b, range(40), params)]
    same = sum(x == y for x, y in zip(first_a, first_b, strict=True))
    assert same <= 3, f"{same} of 40 samples coincide: the streams are shared"
    # the stream depends on (seed, context, index) only: redrawing one index alone gives the same sample
    again = list(tiny.sample_indices(a, [17], params))[0]
    assert again.token_ids[:1] == first_a[17]


def test_continuation_streams_depend_on_the_cut(tiny):
    seq = tiny.sequence(ms.Conversation.of(user="Count."), tiny.tokens(" one two three four"))
    jobs = [
        ms.ContinueJob(seq, seq.prompt_len + k, 1, temperature=1e4, seed=1, index=i)
        for k in (2, 3)
        for i in range(30)
    ]
    out = tiny.continued(jobs)
    same = sum(out[i]["token_ids"] == out[30 + i]["token_ids"] for i in range(30))
    assert same <= 3


def test_resumed_sampling_equals_an_uninterrupted_run(tiny, tmp_path: Path):
    ctx = ms.Conversation.of(user="Name a colour.")
    params = SampleParams(max_new_tokens=6, temperature=1.0, seed=3)
    whole = sorted(tiny.sample_indices(ctx, range(10), params), key=lambda s: s.index)
    with Store(tmp_path / "s.sqlite") as store:
        cached = CachedModel(tiny, store)
        part = list(cached.sample_indices(ctx, [0, 3, 7], params))  # an interrupted run stored these
        assert [s.text for s in part] == [whole[i].text for i in (0, 3, 7)]
        resumed = sorted(cached.sample_indices(ctx, range(10), params), key=lambda s: s.index)
        assert (cached.hits, cached.misses) == (3, 10)
    assert [s.token_ids for s in resumed] == [s.token_ids for s in whole]


class _ScaledHead(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.inner = model

    def forward(self, input_ids=None, **kw):  # noqa: ANN001, ANN003, ANN201
        out = self.inner(input_ids=input_ids, **kw)
        out.logits = out.logits * 2.0  # post-processing the engine's head path does not apply
        return out

    def __getattr__(self, name: str):  # noqa: ANN204
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def test_the_head_probe_refuses_a_model_whose_head_post_processes(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from maskscope.models.hf import HFModel

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)
    HFModel(model, tok, name="plain", weights_digest="x")  # the plain model passes the probe
    with pytest.raises(UserError, match="post-processes logits"):
        HFModel(_ScaledHead(model), tok, name="scaled", weights_digest="x")


def test_no_deprecation_warning_from_the_engine(tiny):
    """Every engine path once, with transformers' and torch's FutureWarnings and DeprecationWarnings as
    errors (a deprecated call breaks the install on the release that removes it)."""
    ctx = ms.Conversation.of(user="Hi")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        tiny.score(ctx, ["Hello there", "Hi"])
        tiny.next_token_distribution(ctx, top_k=3)
        tiny.sample(ctx, n=2, max_new_tokens=3, seed=0)
        seq = tiny.sequence(ctx, tiny.tokens(" Hello, friend."))
        tiny.forced([ms.ForcedJob(seq, len(seq.ids) - 2, tiny.tokens(" So"), (tiny.candidate("x", [" x"]),))])
        tiny.continued([ms.ContinueJob(seq, len(seq.ids) - 1, 3)])
        list(tiny.support_logprobs([(ctx, tiny.tokens("Hello"), 3)]))


def test_cached_model_refuses_calls_it_does_not_cache(tiny, tmp_path: Path):
    with Store(tmp_path / "s.sqlite") as store:
        cached = CachedModel(tiny, store)
        assert cached.tokens("Hi") == tiny.tokens("Hi")  # the text side is forwarded, by name
        with pytest.raises(AttributeError, match="does not forward 'teacher_forced'"):
            cached.teacher_forced([([1, 2], [3])])
        with pytest.raises(AttributeError, match="does not forward 'model'"):
            cached.model  # noqa: B018


def test_capabilities_are_typed_and_checked(tiny):
    require(tiny, Capability.CUTS, "x")
    require(tiny, "score", "x")  # the strings of earlier versions still work
    require(tiny, Capability.ADAPTERS, "x")

    class Server:  # a backend that says what it lacks, and why
        name = "server"
        capabilities = frozenset({Capability.SAMPLE})

        def missing_capabilities(self) -> dict[str, str]:
            return {"activations": "servers do not expose activations"}

    with pytest.raises(UserError, match="needs 'activations'.*servers do not expose activations"):
        require(Server(), Capability.ACTIVATIONS, "the directions experiment")

    class Liar:  # advertises scoring without implementing it
        name = "liar"
        capabilities = frozenset({Capability.SCORE})

    with pytest.raises(UserError, match="needs 'score'"):
        require(Liar(), Capability.SCORE, "x")


def test_import_maskscope_is_light():
    code = (
        "import sys, maskscope; heavy = [m for m in ('torch', 'transformers', 'scipy.optimize', "
        "'maskscope.experiments', 'matplotlib') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _doc_blocks(lang: str) -> list[str]:
    text = (Path(__file__).parent.parent / "docs" / "experiments.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_the_worked_example_of_a_new_experiment_runs(tiny, tmp_path: Path, monkeypatch):
    """docs/experiments.md's example, taken from the page: module, template, registry line and spec."""
    import types

    import jinja2
    import yaml

    from maskscope import experiments, report
    from maskscope.runner import parse_spec

    module = types.ModuleType("maskscope.experiments.first_words")
    exec(compile(_doc_blocks("python")[0], "first_words.py", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    entry = eval(_doc_blocks("text")[0].split(":", 1)[1].strip().rstrip(","), vars(experiments))
    monkeypatch.setitem(experiments.EXPERIMENTS, "first_words", entry)
    experiment, spec = parse_spec(yaml.safe_load(_doc_blocks("yaml")[0]))
    assert spec.limited(1).prompts == spec.prompts[:1] and len(spec.prompts) > 1  # --limit 1
    with pytest.raises(UserError, match="field 'words'"):
        parse_spec({"experiment": "first_words", "name": "x", "prompts": ["a"], "words": []})

    with Store(tmp_path / "s.sqlite") as store:
        cached = CachedModel(tiny, store)
        summary = experiment.run(cached, spec)
        assert cached.misses == 4 and experiment.run(cached, spec) == summary and cached.hits == 4
    for row in summary["rows"]:
        ctx = ms.Conversation.of(user=row["prompt"])
        assert row["p"] == {
            s.continuation: pytest.approx(s.prob, rel=1e-5) for s in tiny.score(ctx, spec.words)
        }

    loader = jinja2.ChoiceLoader(
        [jinja2.DictLoader({"first_words.html": _doc_blocks("html")[0]}), report._environment().loader]
    )
    env = jinja2.Environment(loader=loader, autoescape=True)
    summary["rows"][0]["prompt"] = "<script>alert(1)</script>"
    html = env.get_template("first_words.html").render(s=summary, spec_yaml="", version="x")
    assert "<!doctype html>" in html and "&lt;script&gt;" in html and "<script>" not in html


def test_version_flag():
    out = subprocess.run(
        [sys.executable, "-m", "maskscope.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"maskscope {ms.__version__}"
