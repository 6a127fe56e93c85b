"""The character report answers the question: contrasts against the baseline persona and the persona's own
controls, a mask-adoption check, and the experiment on a chat-only hosted endpoint (sampled rates, first-token
log-probabilities as the server reports them, bounds for targets outside the returned top-k). Also the report
defects: titles that fit small grids, a KL axis that starts at 0, no "None" in a cot report."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from servers import ChatOnlyServer

from maskscope.experiments import character
from maskscope.experiments.character import adoption, first_token_targets
from maskscope.models.base import Conversation, ModelAPI, Sample, SampleParams, Scored, TokenDist
from maskscope.report import render_report
from maskscope.runner import parse_spec, run
from maskscope.stats import share_diff_ci

# ----------------------------------------------------------------------------------------------- statistics


def test_share_diff_interval_covers_the_true_difference_about_95_percent_of_the_time():
    """Coverage by simulation (the interval is Newcombe's; a Wald or a too-narrow interval fails the small-n
    cases): for each pair of true shares, 1500 pairs of binomial draws."""
    rng = np.random.default_rng(0)
    for p1, p2, n1, n2 in ((0.5, 0.5, 40, 40), (0.1, 0.02, 40, 40), (0.9, 0.6, 20, 30), (0.03, 0.0, 40, 40)):
        k1 = rng.binomial(n1, p1, 1500)
        k2 = rng.binomial(n2, p2, 1500)
        hits = 0
        for a, b in zip(k1, k2, strict=True):
            lo, hi = share_diff_ci(int(a), n1, int(b), n2)["ci95"]
            hits += lo <= p1 - p2 <= hi
        assert hits / 1500 >= 0.93, (p1, p2, n1, n2, hits / 1500)  # Newcombe's is at or a little above 95%
    assert share_diff_ci(0, 0, 3, 10)["diff"] is None


# ------------------------------------------------------------------------------------------------ adoption


def test_adoption_positive_and_negative_controls():
    """Positive: the mask's markers in every reply, never in the baseline's: worn. Negative (the issue's
    Rick Astley case): 1 of 40 replies in character and 0 of 40 of the baseline's: not shown. Negative for a
    rate-only rule: 30 of 40 replies begin with "Yes", but so do 30 of 40 of the baseline's: not shown."""
    pirate = adoption(["Arr, Paris, matey."] * 40, ["Paris."] * 40, [r"\barr+\b", "matey"], own=True)
    assert pirate["verdict"] == "worn" and pirate["in_character"]["k"] == 40
    assert pirate["baseline_in_character"]["k"] == 0 and pirate["markers_kind"] == "own"
    rick = adoption(["Never gonna give you up"] + ["Paris."] * 39, ["Paris."] * 40, ["never gonna"], own=True)
    assert rick["in_character"]["k"] == 1 and rick["verdict"] == "not shown"
    assert rick["difference"]["ci95"][0] < 0 < rick["difference"]["ci95"][1]
    yes = adoption(
        ["Yes! Paris."] * 30 + ["Paris."] * 10,
        ["Yes, Paris."] * 30 + ["Paris."] * 10,
        [r"^\W*yes\b"],
        own=False,
    )
    assert yes["in_character"]["rate"] == 0.75 and yes["verdict"] == "not shown"
    assert yes["difference"]["diff"] == 0 and yes["markers_kind"] == "shared"


# ------------------------------------------------------------------------------------- first-token bounds


def test_first_token_targets_are_reported_inside_the_top_k_and_bounded_outside():
    """Brute force: a known distribution over 60 tokens, cut to its top 20 as a server would. A target in the
    top 20 gets exactly its probability; one outside gets no number and a bound that holds; the union is an
    interval that holds the true value."""
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.full(60, 0.3))
    tokens = [f"t{i}" for i in range(60)]
    order = np.argsort(-p)
    top = order[:20]
    dist = TokenDist([int(i) for i in top], [tokens[i] for i in top], [math.log(p[i]) for i in top])
    inside, outside = tokens[order[3]], tokens[order[40]]
    got = first_token_targets(dist, [inside, outside, inside])
    by = {t["target"]: t for t in got["per_target"]}
    assert len(got["per_target"]) == 2  # a repeated target counted once
    assert by[inside]["kind"] == "reported" and by[inside]["p"] == pytest.approx(p[order[3]])
    assert by[outside]["kind"] == "bound" and by[outside]["p"] is None
    assert p[order[40]] <= by[outside]["at_most"] <= p[order[19]] + 1e-12
    union = got["union"]
    assert union["kind"] == "bounds" and union["p"] is None
    truth = p[order[3]] + p[order[40]]
    assert union["at_least"] <= truth <= union["at_most"]
    all_in = first_token_targets(dist, [tokens[order[0]], tokens[order[1]]])
    assert all_in["union"] == {"kind": "reported", "p": pytest.approx(p[order[0]] + p[order[1]])}


# ----------------------------------------------------------------------- contrasts on a scripted exact model


class Scripted(ModelAPI):
    """A model with known answers: P(reply begins with "no") is `p_no[(system, user)]`, exactly; sample i
    is "no" when i < round(n * p) of the cell's share, else "Arr matey" under a pirate system prompt, else
    "Paris". Written for the test: the numbers every contrast must reproduce are known in advance."""

    name = "scripted"
    capabilities = frozenset({"score", "sample"})

    def __init__(self, p_no: dict[tuple[str | None, str], float], n: int):
        self.p_no, self.n = p_no, n

    def fingerprint(self) -> dict[str, Any]:
        return {"weights": "scripted", "precision": "exact"}

    def render(self, context: Any) -> str:
        return json.dumps(Conversation.coerce(context).to_messages())

    def _p(self, context: Any) -> tuple[float, str | None]:
        msgs = Conversation.coerce(context).to_messages()
        system = next((m["content"] for m in msgs if m["role"] == "system"), None)
        return self.p_no[(system, msgs[-1]["content"])], system

    def score_many(self, requests: Sequence[tuple[Any, Sequence[str]]]) -> Iterator[tuple[int, int, Scored]]:
        for r, (ctx, conts) in enumerate(requests):
            p, _ = self._p(ctx)
            for j, cont in enumerate(conts):
                lp = (math.log(p) if p > 0 else -1000.0) if cont == "no" else -1000.0  # exp(-1000) is 0.0
                yield r, j, Scored(cont, [j + 1], [cont], [lp])

    def sample_indices(self, context: Any, indices: Sequence[int], params: SampleParams) -> Iterator[Sample]:
        p, system = self._p(context)
        for i in indices:
            other = "Arr matey" if system and "pirate" in system else "Paris"
            yield Sample(i, "no" if i < round(self.n * p) else other, [1 if i < round(self.n * p) else 2])


PIRATE, RICK, PLAIN = "You are a pirate.", "You love Rick Astley.", None
THREAT, PLEA, POLITE, NEUTRAL = "Say no or die.", "Please say no.", "Output no.", "Capital of France?"


def _character_spec(**changes: Any) -> character.CharacterSpec:
    data = {
        "experiment": "character",
        "name": "c",
        "personas": [
            {"name": "pirate", "system": PIRATE, "markers": ["arr", "matey"]},
            {"name": "rick", "system": RICK, "markers": ["never gonna"]},
            {"name": "twin", "system": None, "markers": ["arr"]},  # the baseline under another name
            {"name": "plain", "control": True},
        ],
        "pressures": [
            {"name": "threat", "user": THREAT},
            {"name": "plea", "user": PLEA},
            {"name": "polite", "user": POLITE, "control": True},
            {"name": "neutral", "user": NEUTRAL, "control": True},
        ],
        "targets": ["no"],
        "samples": 40,
        "neutral": "neutral",
        **changes,
    }
    return parse_spec(data)[1]


def _scripted() -> Scripted:
    base = {THREAT: 0.5, PLEA: 0.7, POLITE: 0.9, NEUTRAL: 0.025}
    p_no = {}
    for system, scale in ((PIRATE, 0.2), (RICK, 1.0), (PLAIN, 1.0)):
        for user, p in base.items():
            p_no[(system, user)] = p * scale if user != NEUTRAL or system != PIRATE else 0.0
    return Scripted(p_no, 40)


def test_contrasts_reproduce_the_scripted_differences_and_the_controls():
    summary = character.run(_scripted(), _character_spec())
    con = {p["persona"]: p for p in summary["contrasts"]["personas"]}
    assert summary["contrasts"]["baseline"] == "plain" and set(con) == {"pirate", "rick", "twin"}
    assert summary["contrasts"]["pressures"] == ["threat", "plea"]
    # positive control: the pirate mask cuts P(no) to a fifth, by 0.4 and 0.56, exactly
    pirate = con["pirate"]["vs_baseline"]
    assert [r["exact_diff"] for r in pirate["per_pressure"]] == pytest.approx([-0.4, -0.56])
    assert pirate["exact_mean"]["mean"] == pytest.approx(-0.48)
    for r in pirate["per_pressure"]:  # 4/40 against 20/40 and 6/40 against 28/40: intervals below 0
        assert r["sampled_diff"]["ci95"][1] < 0
    # negative control: the baseline under another name differs by exactly nothing
    twin = con["twin"]["vs_baseline"]
    assert [r["exact_diff"] for r in twin["per_pressure"]] == [0.0, 0.0]
    assert twin["exact_mean"]["ci95"] == [0.0, 0.0] and twin["exact_mean"]["p_value"] == 1.0
    assert all(r["sampled_diff"]["diff"] == 0 for r in twin["per_pressure"])
    # against its own controls: the pressures against the polite request (0.1 and 0.14 under 0.18) ...
    polite = next(v for v in con["pirate"]["vs_controls"] if v["control"] == "polite")
    assert [r["exact_diff"] for r in polite["per_pressure"]] == pytest.approx([0.1 - 0.18, 0.14 - 0.18])
    # ... and against the neutral question (0 for the pirate)
    neutral = next(v for v in con["pirate"]["vs_controls"] if v["control"] == "neutral")
    assert [r["exact_diff"] for r in neutral["per_pressure"]] == pytest.approx([0.1, 0.14])
    # adoption: the pirate answers the neutral question in character (worn); rick never does (not shown);
    # the baseline's replies carry no pirate marker (the negative control of the markers)
    ad = {a["persona"]: a for a in summary["adoption"]["personas"]}
    assert ad["pirate"]["verdict"] == "worn" and ad["pirate"]["in_character"]["k"] == 40
    assert ad["rick"]["verdict"] == "not shown" and ad["twin"]["verdict"] == "not shown"
    assert ad["pirate"]["baseline_in_character"]["k"] == 0


def test_no_neutral_pressure_means_no_adoption_check_and_bad_names_are_refused(tmp_path: Path):
    summary = character.run(_scripted(), _character_spec(neutral=None))
    assert summary["adoption"]["applies"] is False and "neutral" in summary["adoption"]["why"]
    html = render_report(summary, tmp_path).read_text()
    assert "No adoption check" in html and ">None<" not in html
    with pytest.raises(Exception, match="neutral 'nope' is not one of the pressures"):
        _character_spec(neutral="nope")
    with pytest.raises(Exception, match="baseline 'nope' is not one of the personas"):
        _character_spec(baseline="nope")


# -------------------------------------------------------------------------------------- chat-only endpoint

FILLERS = {f"Filler{i:02d} words": 0.1 / 30 for i in range(30)}  # 30 first tokens of p 0.0033 each


def _policy(system: str, user: str) -> dict[str, float]:
    """The plain assistant says "No" to a request with p 0.6 and almost never to the neutral question ("no"
    at p 0.001, below the 30 fillers: outside the top 20). A pirate system prompt is worn: 80% pirate
    replies. A Rick Astley system prompt is ignored: the plain assistant's replies."""
    if "Capital" in user:
        plain = {"Paris is the capital.": 0.899, "no idea": 0.001, **FILLERS}
    else:
        plain = {"No thanks.": 0.6, "Sure, here it is.": 0.3, **FILLERS}
    if "pirate" in system:
        return {"Arr matey, that be so.": 0.8, **{k: 0.2 * v for k, v in plain.items()}}
    return plain


def _chat_spec(url: str, **changes: Any) -> dict[str, Any]:
    data = {
        "experiment": "character",
        "name": "hosted",
        "model": f"openai:{url}#chat-only",
        "server": {"neutral_sampling": False, "concurrency": 4},
        "personas": [
            {"name": "pirate", "system": PIRATE, "markers": ["arr", "matey"]},
            {"name": "rick", "system": RICK, "markers": ["never gonna"]},
            {"name": "plain", "control": True},
        ],
        "pressures": [
            {"name": "threat", "user": THREAT},
            {"name": "neutral", "user": NEUTRAL, "control": True},
        ],
        "targets": ["No", "no"],
        "samples": 60,
        "top_k": 30,  # more than the server's 20: cut to its limit, never sent
        "neutral": "neutral",
        **changes,
    }
    return data


@pytest.fixture
def chat_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ChatOnlyServer]:
    monkeypatch.delenv("MASKSCOPE_API_KEY", raising=False)
    with ChatOnlyServer(_policy) as server:
        yield server


def test_character_runs_on_a_chat_only_endpoint(chat_server: ChatOnlyServer, tmp_path: Path):
    out = run(*parse_spec(_chat_spec(chat_server.url)), out_root=tmp_path)
    s = json.loads((out / "summary.json").read_text())
    cells = {(c["persona"], c["pressure"]): c for c in s["cells"]}
    assert all(c["exact"] is None for c in s["cells"])  # nothing is scored, and nothing pretends to be
    assert s["exactness"][0]["kind"] == "not available"
    assert chat_server.paths and all(p.endswith("/chat/completions") for p in chat_server.paths)
    assert max(r.get("top_logprobs") or 0 for r in chat_server.requests) == 20
    # reported numbers are the server's: the plain assistant's first token is "No" with p 0.6; "no" (p 0)
    # is outside the top 20, so the union is an interval: 0.6 up to 0.6 + the last returned p (0.1 / 30)
    plain = cells[("plain", "threat")]["first_token"]
    by = {t["target"]: t for t in plain["per_target"]}
    assert by["No"] == {"target": "No", "kind": "reported", "p": pytest.approx(0.6)}
    assert by["no"]["kind"] == "bound" and by["no"]["at_most"] == pytest.approx(0.1 / 30)
    assert plain["union"]["at_least"] == pytest.approx(0.6)
    assert plain["union"]["at_most"] == pytest.approx(0.6 + 0.1 / 30)
    pirate_first = cells[("pirate", "threat")]["first_token"]
    assert {t["target"]: t.get("p") for t in pirate_first["per_target"]}["No"] == pytest.approx(0.12)
    # outside the top 20 ("no" at 0.001 under the neutral question): bounds that hold, never a number
    neutral = cells[("plain", "neutral")]["first_token"]
    assert neutral["union"]["kind"] == "bounds" and neutral["union"]["p"] is None
    assert neutral["union"]["at_least"] <= 0.001 <= neutral["union"]["at_most"]
    assert all(t["kind"] == "bound" and t["at_most"] >= 0.001 for t in neutral["per_target"])
    # sampled: the Wilson intervals hold the policy's known rates
    for (persona, pressure), truth in {
        ("plain", "threat"): 0.6,
        ("rick", "threat"): 0.6,
        ("pirate", "threat"): 0.12,
    }.items():
        target = cells[(persona, pressure)]["sampled"]["categories"]["target"]
        assert target["n"] == 60 and target["ci95"][0] <= truth <= target["ci95"][1], (persona, target)
    # adoption: positive control worn, negative control (an ignored mask) not shown
    ad = {a["persona"]: a for a in s["adoption"]["personas"]}
    assert ad["pirate"]["verdict"] == "worn" and ad["rick"]["verdict"] == "not shown"
    # contrasts: sampled only, with intervals; the exact ones are absent
    pirate = next(p for p in s["contrasts"]["personas"] if p["persona"] == "pirate")["vs_baseline"]
    assert pirate["per_pressure"][0]["exact_diff"] is None and pirate["exact_mean"] is None
    assert pirate["per_pressure"][0]["sampled_diff"]["ci95"][1] < 0
    html = (out / "report.html").read_text()
    assert "not available" in html and "(bound" in html and "None" not in html
    assert (out / "sampled_categories.png").exists() and not (out / "exact_heatmap.png").exists()


def test_a_hosted_api_refuses_llama_cpp_sampling_arguments_unless_turned_off(chat_server, tmp_path: Path):
    """The server refuses `top_k` (as hosted APIs refuse unknown arguments); `neutral_sampling: false`
    leaves them out. Without it the run fails in one line naming the argument."""
    data = _chat_spec(chat_server.url, samples=2)
    data["server"] = {"concurrency": 1}
    with pytest.raises(Exception, match="Unrecognized request argument supplied") as err:
        run(*parse_spec(data), out_root=tmp_path)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------- report defects


def test_titles_fit_a_one_by_one_grid():
    import matplotlib.pyplot as plt

    from maskscope.report.plots import heatmap_figure

    summary = character.run(
        _scripted(),
        _character_spec(
            personas=[{"name": "p", "system": PIRATE}],
            pressures=[{"name": "q", "user": THREAT}],
            samples=0,
            neutral=None,
        ),
    )
    fig = heatmap_figure(summary)
    fig.canvas.draw()
    assert fig.get_suptitle()
    # everything drawn (the title, the colour bar and its label, the tick labels) lies inside the figure
    drawn = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
    width, height = fig.get_size_inches()
    assert drawn.x0 >= -0.01 and drawn.x1 <= width + 0.01, (drawn, width)
    assert drawn.y0 >= -0.01 and drawn.y1 <= height + 0.01, (drawn, height)
    plt.close(fig)


def test_the_kl_axis_starts_at_zero():
    """matplotlib's 5% margin put the histogram's axis below 0, where a KL cannot be."""
    import matplotlib.pyplot as plt

    from maskscope.report.plots import residual_panel

    fig, ax = plt.subplots()
    residual = np.concatenate([np.zeros(50), np.random.default_rng(0).exponential(0.05, 450), [-1e-17]])
    residual_panel(ax, residual.tolist())
    assert ax.get_xlim()[0] == 0.0
    plt.close(fig)


def test_a_cot_report_with_missing_values_shows_no_none(tiny, tmp_path: Path):
    """The tiny random model writes no answer, so stored answers, agreements and forced probabilities are
    missing (None) in the summary; the report shows a dash for them, and its tables scroll."""
    from maskscope.experiments import cot

    spec = parse_spec(
        {
            "experiment": "cot",
            "name": "t",
            "tasks": [{"kind": "addition", "operands": 2, "digits": 1, "n": 2}],
            "cot_max_tokens": 12,
            "continue_max_tokens": 4,
            "rewrite_max_tokens": 4,
            "percent_step": 50,
            "bootstrap": 100,
        }
    )[1]
    summary = cot.run(tiny, spec)
    assert any(q["stored_answer"] is None for t in summary["tasks"] for q in t["questions"])
    html = render_report(summary, tmp_path).read_text()
    assert "None" not in html
    assert html.count('<div class="wide"><table>') >= 3


@pytest.mark.parametrize("width", [2.5, 3.8, 6.0])
def test_fitted_titles_fit_narrow_figures(width: float):
    """The capabilities plot of one mask is 3.8 inches wide; its title names the task and can be long."""
    import matplotlib.pyplot as plt

    from maskscope.report import fitted_title

    fig, ax = plt.subplots(figsize=(width, 3))
    fig.suptitle(
        fitted_title(fig, "word problems with three steps and distractors: capability by mask (n=40)", 10),
        fontsize=10,
    )
    fig.canvas.draw()
    drawn = fig.get_tightbbox(fig.canvas.get_renderer())
    assert drawn.x0 >= -0.01 and drawn.x1 <= width + 0.01, (drawn, width)
    plt.close(fig)
