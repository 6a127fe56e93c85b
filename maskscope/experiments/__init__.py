"""The experiment registry. Each experiment is one module with a pydantic Spec (inheriting RunSpec) and
run(model, spec, progress[, models]) -> summary dict, one report template extending base.html, and one example
YAML; its registry entry below names them. Modules are imported when an experiment is first used."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Experiment:
    """An experiment: its module and Spec class (imported on first use) and the function that writes its
    plots (and any other output files) from the summary."""

    module: str
    spec_class: str
    plots: Any

    @property
    def spec(self) -> Any:
        """The experiment's pydantic Spec class."""
        return getattr(importlib.import_module(self.module), self.spec_class)

    @property
    def run(self) -> Any:
        """The experiment's run function."""
        return importlib.import_module(self.module).run


def _no_plots(summary: dict[str, Any], out_dir: Any) -> list[Any]:
    """For experiments whose report is tables only (docs/experiments.md's worked example uses it)."""
    return []


def _posterior_plots(summary: dict[str, Any], out_dir: Any) -> list[Any]:
    from pathlib import Path

    from maskscope.experiments import posterior
    from maskscope.report.plots import posterior_plots

    return [posterior.write_csv(summary, Path(out_dir) / "posterior.csv"), *posterior_plots(summary, out_dir)]


def _lazy(module: str, name: str = "plots") -> Any:
    """A plot function that imports `module` (and so matplotlib) only when a run writes its plots."""

    def plots(summary: dict[str, Any], out_dir: Any) -> list[Any]:
        return getattr(importlib.import_module(module), name)(summary, out_dir)

    return plots


EXPERIMENTS: dict[str, Experiment] = {
    "character": Experiment(
        "maskscope.experiments.character", "CharacterSpec", _lazy("maskscope.report.plots", "character_plots")
    ),
    "posterior": Experiment("maskscope.experiments.posterior", "PosteriorSpec", _posterior_plots),
    "explain": Experiment(
        "maskscope.experiments.explain", "ExplainSpec", _lazy("maskscope.report.plots", "explain_plots")
    ),
    "cot": Experiment(
        "maskscope.experiments.cot", "CotSpec", _lazy("maskscope.report.reasoning_plots", "cot_plots")
    ),
    "capabilities": Experiment(
        "maskscope.experiments.capabilities",
        "CapabilitiesSpec",
        _lazy("maskscope.report.reasoning_plots", "capabilities_plots"),
    ),
    "prefill": Experiment(
        "maskscope.experiments.prefill",
        "PrefillSpec",
        _lazy("maskscope.report.reasoning_plots", "prefill_plots"),
    ),
    "latent": Experiment(
        "maskscope.experiments.latent", "LatentSpec", _lazy("maskscope.report.latent_plots", "latent_plots")
    ),
    "reward": Experiment("maskscope.experiments.reward", "RewardSpec", _lazy("maskscope.experiments.reward")),
    "misalignment": Experiment(
        "maskscope.experiments.misalignment", "MisalignmentSpec", _lazy("maskscope.experiments.misalignment")
    ),
    "diff": Experiment("maskscope.experiments.diff", "DiffSpec", _lazy("maskscope.experiments.diff")),
    "directions": Experiment(
        "maskscope.experiments.directions", "DirectionsSpec", _lazy("maskscope.experiments.directions")
    ),
    "drift": Experiment("maskscope.experiments.drift", "DriftSpec", _lazy("maskscope.experiments.drift")),
}

__all__ = ["EXPERIMENTS", "Experiment"]
