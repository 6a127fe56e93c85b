"""Model names to models: "default" (the bundled model), "hf:DIR", "gguf:FILE", "openai:URL#MODEL", and any
local one followed by "+lora:DIR" (a fine-tuned child, its adapter merged into the parent's weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from maskscope.errors import UserError
from maskscope.models.base import LanguageModel

SCHEMES = {
    "default": "the bundled SmolLM2-135M-Instruct (offline, CPU)",
    "hf:DIR": "a local transformers model directory",
    "gguf:FILE": "a local GGUF file, dequantized through transformers and cached",
    "openai:URL#MODEL": "a model on an OpenAI-compatible server (vLLM, llama.cpp); see docs/servers.md",
    "NAME+lora:DIR": "a LoRA child made by `maskscope finetune` on a local parent; see docs/organisms.md",
}
LORA = "+lora:"


def load_model(
    name: str = "default", *, precision: str = "fp32", progress: Any = None, server: Any = None
) -> LanguageModel:
    """Resolve a model name to a loaded model. `precision` is "fp32" (exact, default) or "bf16" (faster);
    `server` (ServerOptions or a mapping) configures an openai:URL#MODEL backend."""
    from maskscope.models import loading

    if server is not None and not name.startswith("openai:"):
        raise UserError(f"server options apply only to openai:URL#MODEL models, not {name!r}")
    if LORA in name:
        parent, *adapters = name.split(LORA)
        if parent.startswith("openai:"):
            raise UserError(
                "a LoRA adapter loads onto a local model (default, hf:DIR, gguf:FILE), not a server"
            )
        if not all(adapters):
            raise UserError(f"{name!r}: '+lora:' must be followed by an adapter directory")
        model = load_model(parent, precision="fp32", progress=progress)
        return loading.load_adapters(model, [Path(a).expanduser() for a in adapters], precision=precision)
    if name in ("default", "bundled", loading.BUNDLED_NAME):
        return loading.load_bundled(precision=precision, progress=progress)
    scheme, sep, rest = name.partition(":")
    if sep and scheme == "hf":
        return loading.load_hf_dir(Path(rest).expanduser(), precision=precision)
    if sep and scheme == "gguf":
        return loading.load_gguf(Path(rest).expanduser(), precision=precision, progress=progress)
    if sep and scheme == "openai":
        from maskscope.files import validate
        from maskscope.models.openai_backend import ServerOptions, load_openai

        options = (
            server if isinstance(server, ServerOptions) else validate(ServerOptions, server or {}, "server")
        )
        return load_openai(rest, options)
    known = ", ".join(SCHEMES)
    raise UserError(f"unknown model {name!r}: use one of {known}")
