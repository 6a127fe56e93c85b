"""Fields every experiment spec shares: the run's name and model, and for the mask experiments, the library."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

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
    path_fields: ClassVar[dict[str, str]] = {"vector": "file"}
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
    # Fields holding a path ("file"), a mapping of names to paths ("file_map") or a model name ("model");
    # relative ones are resolved against the spec file's directory (resolve_paths). A subclass or a nested
    # model adds its own.
    path_fields: ClassVar[dict[str, str]] = {"model": "model"}
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
    device: str | None = Field(
        None,
        description="Local models: cpu (default), cuda, cuda:N, mps, or auto (every GPU, via accelerate).",
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = Field(
        None, description="Local models: the weights' dtype (default: the one `precision` names)."
    )
    batch_tokens: int | None = Field(
        None,
        ge=16,
        description="Local models: tokens per batch (default: from free memory on CUDA, else 8192).",
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return check_run_name(name)

    def extra_models(self) -> dict[str, str]:
        """Models the experiment uses besides `model`, by role (e.g. {"writer": "hf:DIR"}); the runner loads
        each, wraps it in the store and hands them to the experiment's run(..., models=...)."""
        return {}

    def placement(self) -> dict[str, Any]:
        """load_model's device, dtype and batch_tokens for this run's local models."""
        return {"device": self.device, "dtype": self.dtype, "batch_tokens": self.batch_tokens}

    def limited(self, n: int) -> RunSpec:
        """This spec cut to the first `n` items of the list the experiment iterates (`--limit N`); each
        experiment says which list. Refused for one that has none."""
        from maskscope.errors import UserError

        raise UserError(f"--limit is not defined for the {type(self).__name__} experiment")

    def _replaced(self, **fields: Any) -> RunSpec:
        """A copy with `fields` replaced, validated again (a list cut below its minimum length is one line)."""
        from maskscope.files import validate

        return validate(type(self), {**self.model_dump(), **fields}, "--limit")

    @model_validator(mode="after")
    def _server_for_servers(self) -> RunSpec:
        if self.server is not None and not self.model.startswith("openai:"):
            raise ValueError("`server` options apply only to openai:URL#MODEL models")
        local = self.device is not None or self.dtype is not None or self.batch_tokens is not None
        if local and self.model.startswith("openai:"):
            raise ValueError("device, dtype and batch_tokens apply to local models, not openai:URL#MODEL")
        if self.precision == "bf16" and self.dtype not in (None, "bfloat16", "auto"):
            raise ValueError(f"precision bf16 and dtype {self.dtype} disagree: give one of them")
        return self


class LibrarySpec(RunSpec):
    """A run over a mask library, given as a file or inline."""

    path_fields: ClassVar[dict[str, str]] = {**RunSpec.path_fields, "library": "file"}
    library: str | None = Field(
        None, description="Path of a mask library YAML, relative to the spec file (or give `masks` inline)."
    )
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


def resolve_model_name(name: str, base: Path) -> str:
    """A model name with its relative local paths (hf:DIR, gguf:FILE, +lora:DIR) resolved against `base`.
    hf:ORG/NAME stays a hub id unless `base`/ORG/NAME is a directory."""
    from maskscope.models.loading import is_hub_id

    def local(rest: str) -> str:
        path = Path(rest)
        return rest if rest.startswith("~") or path.is_absolute() else os.path.normpath(base / path)

    parent, *adapters = name.split("+lora:")
    scheme, sep, rest = parent.partition(":")
    if sep and scheme == "gguf" and rest:
        parent = f"gguf:{local(rest)}"
    elif sep and scheme == "hf" and rest:
        candidate = local(rest)
        try:
            found = Path(candidate).is_dir()
        except (OSError, ValueError):
            found = False
        if found or not is_hub_id(rest):
            parent = f"hf:{candidate}"
    return "+lora:".join([parent, *(local(a) if a else a for a in adapters)])


def check_regex(value: str) -> str:
    """A spec field holding a regular expression: the value if it compiles, else a ValueError naming it."""
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"bad regular expression {value!r}: {e}") from e
    return value


def resolve_paths(
    spec: BaseModel, base: Path, keep: frozenset[tuple[Any, ...]] = frozenset(), where: tuple[Any, ...] = ()
) -> None:
    """Resolve, in place, every relative path a spec names (its models' `path_fields`, nested models and
    lists of them included) against `base`, the spec file's directory, so that a spec means the same files
    from any current directory. Locations in `keep` (set on the command line) stay relative to it."""
    kinds = getattr(type(spec), "path_fields", {})
    for name in type(spec).model_fields:
        value = getattr(spec, name)
        loc = (*where, name)
        if any(loc[: len(k)] == k for k in keep):
            continue
        if name in kinds and isinstance(value, str) and value:
            setattr(spec, name, _resolved(kinds[name], value, base))
        elif isinstance(value, BaseModel):
            resolve_paths(value, base, keep, loc)
        elif isinstance(value, dict) and kinds.get(name) == "file_map":  # names -> paths
            for key, item in value.items():
                if isinstance(item, str) and item:
                    value[key] = _resolved("file", item, base)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    resolve_paths(item, base, keep, (*loc, i))
                elif name in kinds and isinstance(item, str) and item:  # a list of paths or model names
                    value[i] = _resolved(kinds[name], item, base)


def _resolved(kind: str, value: str, base: Path) -> str:
    """One path ("file") or model name ("model") resolved against `base`."""
    if kind == "model":
        return resolve_model_name(value, base)
    return value if value.startswith("~") or Path(value).is_absolute() else os.path.normpath(base / value)
