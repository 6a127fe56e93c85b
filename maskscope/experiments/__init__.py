"""One module per experiment: a pydantic Spec, and run(model, spec, progress) -> summary dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from maskscope.experiments import capabilities, character, cot, explain, posterior, prefill


@dataclass(frozen=True)
class Experiment:
    """An experiment's spec type, its run function and the function that draws its plots."""

    spec: type[BaseModel]
    run: Any
    plots: Any


def _character_plots(summary: dict[str, Any], out_dir: Any) -> list[Any]:
    from maskscope.report.plots import character_plots

    return character_plots(summary, out_dir)


def _posterior_plots(summary: dict[str, Any], out_dir: Any) -> list[Any]:
    from pathlib import Path

    from maskscope.report.plots import posterior_plots

    return [posterior.write_csv(summary, Path(out_dir) / "posterior.csv"), *posterior_plots(summary, out_dir)]


def _explain_plots(summary: dict[str, Any], out_dir: Any) -> list[Any]:
    from maskscope.report.plots import explain_plots

    return explain_plots(summary, out_dir)


def _capabilities_plots(summary: dict[str, Any], out_dir: Any) -> list[Any]:
    from maskscope.report.reasoning_plots import capabilities_plots

    return capabilities_plots(summary, out_dir)


def _prefill_plots(summary: dict[str, Any], out_dir: Any) -> list[Any]:
    from maskscope.report.reasoning_plots import prefill_plots

    return prefill_plots(summary, out_dir)


def _cot_plots(summary: dict[str, Any], out_dir: Any) -> list[Any]:
    from maskscope.report.reasoning_plots import cot_plots

    return cot_plots(summary, out_dir)


EXPERIMENTS: dict[str, Experiment] = {
    "character": Experiment(character.CharacterSpec, character.run, _character_plots),
    "posterior": Experiment(posterior.PosteriorSpec, posterior.run, _posterior_plots),
    "explain": Experiment(explain.ExplainSpec, explain.run, _explain_plots),
    "cot": Experiment(cot.CotSpec, cot.run, _cot_plots),
    "capabilities": Experiment(capabilities.CapabilitiesSpec, capabilities.run, _capabilities_plots),
    "prefill": Experiment(prefill.PrefillSpec, prefill.run, _prefill_plots),
}

__all__ = ["EXPERIMENTS", "Experiment", "capabilities", "character", "cot", "explain", "posterior", "prefill"]
