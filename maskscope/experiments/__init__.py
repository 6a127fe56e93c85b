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
    """For experiments whose report is tables only."""
    return []


def _character_plots(summary: dict[str, Any], out_dir: Any) -> list[Any]:
    from maskscope.report.plots import character_plots

    return character_plots(summary, out_dir)


def _posterior_plots(summary: dict[str, Any], out_dir: Any) -> list[Any]:
    from pathlib import Path

    from maskscope.experiments import posterior
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
    "character": Experiment("maskscope.experiments.character", "CharacterSpec", _character_plots),
    "posterior": Experiment("maskscope.experiments.posterior", "PosteriorSpec", _posterior_plots),
    "explain": Experiment("maskscope.experiments.explain", "ExplainSpec", _explain_plots),
    "cot": Experiment("maskscope.experiments.cot", "CotSpec", _cot_plots),
    "capabilities": Experiment("maskscope.experiments.capabilities", "CapabilitiesSpec", _capabilities_plots),
    "prefill": Experiment("maskscope.experiments.prefill", "PrefillSpec", _prefill_plots),
    "latent": Experiment(
        "maskscope.experiments.latent",
        "LatentSpec",
        lambda s, o: importlib.import_module("maskscope.report.latent_plots").latent_plots(s, o),
    ),  # noqa: E501
    "reward": Experiment(
        "maskscope.experiments.reward",
        "RewardSpec",
        lambda s, o: importlib.import_module("maskscope.experiments.reward").plots(s, o),
    ),  # noqa: E501
    "misalignment": Experiment(
        "maskscope.experiments.misalignment",
        "MisalignmentSpec",
        lambda s, o: importlib.import_module("maskscope.experiments.misalignment").plots(s, o),
    ),  # noqa: E501
    "diff": Experiment(
        "maskscope.experiments.diff",
        "DiffSpec",
        lambda s, o: importlib.import_module("maskscope.experiments.diff").plots(s, o),
    ),  # noqa: E501
    "directions": Experiment(
        "maskscope.experiments.directions",
        "DirectionsSpec",
        lambda s, o: importlib.import_module("maskscope.experiments.directions").plots(s, o),
    ),  # noqa: E501
    "drift": Experiment(
        "maskscope.experiments.drift",
        "DriftSpec",
        lambda s, o: importlib.import_module("maskscope.experiments.drift").plots(s, o),
    ),  # noqa: E501
}

__all__ = ["EXPERIMENTS", "Experiment"]
