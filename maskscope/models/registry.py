"""Model names to models: "default" (the bundled model), "hf:DIR", "gguf:FILE"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from maskscope.errors import UserError
from maskscope.models.base import LanguageModel

SCHEMES = {
    "default": "the bundled SmolLM2-135M-Instruct (offline, CPU)",
    "hf:DIR": "a local transformers model directory",
    "gguf:FILE": "a local GGUF file, dequantized through transformers and cached",
}


def load_model(name: str = "default", *, precision: str = "fp32", progress: Any = None) -> LanguageModel:
    """Resolve a model name to a loaded model. `precision` is "fp32" (exact, default) or "bf16" (faster)."""
    from maskscope.models import loading

    if name in ("default", "bundled", loading.BUNDLED_NAME):
        return loading.load_bundled(precision=precision, progress=progress)
    scheme, sep, rest = name.partition(":")
    if sep and scheme == "hf":
        return loading.load_hf_dir(Path(rest).expanduser(), precision=precision)
    if sep and scheme == "gguf":
        return loading.load_gguf(Path(rest).expanduser(), precision=precision, progress=progress)
    known = ", ".join(SCHEMES)
    raise UserError(f"unknown model {name!r}: use one of {known}")
