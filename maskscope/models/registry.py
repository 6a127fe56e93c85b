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
    "hf:ORG/NAME": "a Hugging Face hub model already in the local hub cache (HF_HUB_CACHE); never downloaded",
    "gguf:FILE": "a local GGUF file, dequantized through transformers and cached",
    "openai:URL#MODEL": "a model on an OpenAI-compatible server (vLLM, llama.cpp); see docs/servers.md",
    "NAME+lora:DIR": "a LoRA child made by `maskscope finetune` on a local parent; see docs/organisms.md",
    "reward:hf:DIR": "a local sequence-classification reward model (the `reward` experiment); docs/reward.md",
}
LORA = "+lora:"


def load_model(
    name: str = "default",
    *,
    precision: str = "fp32",
    progress: Any = None,
    server: Any = None,
    credentials: Any = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_tokens: int | None = None,
) -> LanguageModel:
    """Resolve a model name to a loaded model. `precision` is "fp32" (exact, default) or "bf16" (faster);
    `server` (ServerOptions or a mapping) configures an openai:URL#MODEL backend, and `credentials` (the
    user's Credentials: which variable holds the API key, whether plain http may carry it) reaches it.
    For a local model, `device` (cpu, cuda, cuda:N, mps, auto), `dtype` (float32, bfloat16, float16, auto)
    and `batch_tokens` (tokens per batch; default sized from free memory on CUDA) place it."""
    from maskscope.models import loading

    if server is not None and not name.startswith("openai:"):
        raise UserError(f"server options apply only to openai:URL#MODEL models, not {name!r}")
    placement = {"device": device, "dtype": dtype, "batch_tokens": batch_tokens}
    if name.startswith("openai:") and any(v is not None for v in placement.values()):
        raise UserError("device, dtype and batch_tokens apply to local models; a server places its own model")
    if device is not None:  # before anything heavy: a device this machine lacks is one line at once
        loading.resolve_device(device)
    if dtype is not None and dtype not in loading.DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use {', '.join(loading.DTYPES)}")
    if name.startswith("reward:"):
        from maskscope.reward import load_reward_model

        return load_reward_model(name)  # type: ignore[return-value]
    if LORA in name:
        parent, *adapters = name.split(LORA)
        if parent.startswith("openai:"):
            raise UserError(
                "a LoRA adapter loads onto a local model (default, hf:DIR, gguf:FILE), not a server"
            )
        if not all(adapters):
            raise UserError(f"{name!r}: '+lora:' must be followed by an adapter directory")
        model = load_model(
            parent, precision="fp32", progress=progress, device=device, batch_tokens=batch_tokens
        )
        if dtype is not None:  # the adapter merges into float32 weights; the child then takes the dtype asked
            precision = loading.PRECISION_OF_DTYPE[loading.resolve_dtype(dtype, precision, str(model.device))]
        return loading.load_adapters(model, [Path(a).expanduser() for a in adapters], precision=precision)
    if name in ("default", "bundled", loading.BUNDLED_NAME):
        return loading.load_bundled(precision=precision, progress=progress, **placement)
    scheme, sep, rest = name.partition(":")
    if sep and scheme == "hf":
        directory, shown = loading.resolve_hf(rest)
        return loading.load_hf_dir(directory, name=shown, precision=precision, **placement)
    if sep and scheme == "gguf":
        return loading.load_gguf(Path(rest).expanduser(), precision=precision, progress=progress, **placement)
    if sep and scheme == "openai":
        from maskscope.files import validate
        from maskscope.models.openai_backend import ServerOptions, load_openai

        options = (
            server if isinstance(server, ServerOptions) else validate(ServerOptions, server or {}, "server")
        )
        return load_openai(rest, options, credentials)
    known = ", ".join(SCHEMES)
    raise UserError(f"unknown model {_shown(name)!r}: use one of {known}")


def _shown(name: str) -> str:
    from maskscope.models.openai_backend import redact_model_name

    return redact_model_name(name)[:200]


def check_model_name(name: str) -> None:
    """Refuse a model name that cannot load, without loading anything: an unknown scheme, a missing file or
    directory, a file that is not GGUF, an adapter directory that is not a child. (Cheap checks only; the
    load itself says the rest.)"""
    from maskscope.models import loading

    if name.startswith("reward:"):
        from maskscope.reward import check_reward_dir

        check_reward_dir(name)
        return
    if LORA in name:
        from maskscope.finetune.adapter import check_adapter_dir, split_name

        parent, adapters = split_name(name)
        if parent.startswith("openai:"):
            raise UserError(
                "a LoRA adapter loads onto a local model (default, hf:DIR, gguf:FILE), not a server"
            )
        check_model_name(parent)
        for directory in adapters:
            check_adapter_dir(directory)
        return
    if name in ("default", "bundled", loading.BUNDLED_NAME):
        loading.bundled_gguf_path()
        return
    scheme, sep, rest = name.partition(":")
    if sep and scheme == "hf":
        loading.check_hf_dir(loading.resolve_hf(rest)[0])
    elif sep and scheme == "gguf":
        loading.check_gguf(Path(rest).expanduser())
    elif sep and scheme == "openai":
        from maskscope.models.openai_backend import parse_name

        parse_name(rest)
    else:
        raise UserError(f"unknown model {_shown(name)!r}: use one of {', '.join(SCHEMES)}")
