"""Fields every experiment spec shares: the run's name and model, and for the mask experiments, the library."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from maskscope.masks import Mask, MaskLibrary
from maskscope.models.openai_backend import ServerOptions

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NAME_RULE = (
    "a run name is a label of 1 to 100 letters, digits, '.', '_' or '-', beginning with a letter or digit "
    "(it names the directory runs/<name>/)"
)


def check_run_name(name: object) -> str:
    """A run name, refused (ValueError) unless it is a safe directory name: no path separators, no '..',
    no NUL byte, not empty, at most 100 characters."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 40 else repr(name[:40] + "...")
        raise ValueError(f"{NAME_RULE}, not {shown}")
    return name


class SteerSpec(BaseModel):
    """Steering for the whole run: `alpha * vector` added to the residual stream after the given layers
    (0 = embedding output, i = output of decoder layer i) at the reply's positions or at all positions."""

    model_config = ConfigDict(extra="forbid")
    vector: str = Field(
        description="A .safetensors file of vectors named layer.<n> (as `directions` writes)."
    )
    layers: list[int] = Field(
        min_length=1, description="Layers to steer; the file must hold a vector for each."
    )
    alpha: float = Field(description="Multiplier of the vectors (0 leaves the model as it is).")
    positions: Literal["reply", "all"] = Field(
        "reply",
        description='"reply": from the prompt\'s last token on (so the first reply token is steered).',
    )

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of model.steer: the file's vectors for the chosen layers, alpha, positions."""
        from maskscope.directions import load_vectors
        from maskscope.errors import UserError

        vectors = load_vectors(self.vector)
        missing = [x for x in self.layers if x not in vectors]
        if missing:
            raise UserError(f"{self.vector} has no vector for layer(s) {missing} (it has {sorted(vectors)})")
        return {
            "vector": {x: vectors[x] for x in self.layers},
            "layers": list(self.layers),
            "alpha": self.alpha,
            "positions": self.positions,
        }


class RunSpec(BaseModel):
    """A run: its name (results go to runs/<name>/), the model, and the precision of forward passes."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(
        description="Run name, a label: results go to runs/<name>-<hash of the parameters>/ (runs/<name> links "
        "to the latest)."
    )
    model: str = Field(
        "default", description='"default" (bundled), "hf:DIR", "gguf:FILE" or "openai:URL#MODEL".'
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="fp32 is exact; bf16 is faster on AMX CPUs."
    )
    server: ServerOptions | None = Field(
        None, description="For openai:URL#MODEL: tokenizer, concurrency, timeouts and retries."
    )
    steer: SteerSpec | None = Field(
        None, description="Steer every call of the run (vector file, layers, alpha, positions)."
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return check_run_name(name)

    def extra_models(self) -> dict[str, str]:
        """Models the experiment uses besides `model`, by role (e.g. {"writer": "hf:DIR"}); the runner loads
        each, wraps it in the store and hands them to the experiment's run(..., models=...)."""
        return {}

    @model_validator(mode="after")
    def _server_for_servers(self) -> RunSpec:
        if self.server is not None and not self.model.startswith("openai:"):
            raise ValueError("`server` options apply only to openai:URL#MODEL models")
        return self


class LibrarySpec(RunSpec):
    """A run over a mask library, given as a file or inline."""

    library: str | None = Field(None, description="Path of a mask library YAML (or give `masks` inline).")
    masks: list[Mask] | None = Field(None, description="Masks given inline instead of a library file.")

    @model_validator(mode="after")
    def _one_library(self) -> LibrarySpec:
        if (self.library is None) == (self.masks is None):
            raise ValueError("give either `library` (a file) or `masks` (inline), not both or neither")
        return self

    def mask_library(self) -> MaskLibrary:
        """The library this spec names."""
        return (
            MaskLibrary(masks=self.masks) if self.masks is not None else MaskLibrary.load(self.library or "")
        )
