"""LoRA children on disk: the adapter's hash, the manifest, loading a child onto its parent (the adapter
merged into the parent's weights, so the engine runs a plain transformers model), and finding children."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from maskscope.errors import UserError

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MANIFEST = "maskscope-child.json"
# The parts of a fingerprint that say which weights a child was trained on. dtype and precision may differ:
# a child trained in fp32 loads onto the same parent in bf16.
PARENT_KEYS = ("backend", "weights", "chat_template", "adapter")
# adapter_config.json fields that do not change the adapter's effect (where the parent was, versions).
_IDENTITY_FREE = {"base_model_name_or_path", "revision", "peft_version", "auto_mapping", "inference_mode"}


def adapter_hash(directory: str | Path) -> str:
    """SHA-256 over the adapter's tensors (name, dtype, shape, bytes; in name order) and the parts of its
    config that change its effect (rank, alpha, target modules, ...): equal for equal adapters wherever
    they were saved."""
    import torch
    from safetensors import safe_open

    directory = Path(directory)
    h = hashlib.sha256()
    config = json.loads((directory / CONFIG_FILE).read_text())
    # peft stores target_modules from a set, in an order that changes from process to process
    canonical = {
        k: sorted(v) if isinstance(v, list) and all(isinstance(x, str) for x in v) else v
        for k, v in config.items()
        if k not in _IDENTITY_FREE
    }
    h.update(json.dumps(canonical, sort_keys=True).encode())
    with safe_open(str(directory / ADAPTER_FILE), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """A child directory's manifest (parent fingerprint, data hash, config, tokens seen, ...)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"adapter directory not found: {directory}")
    for name in (CONFIG_FILE, ADAPTER_FILE):
        if not (directory / name).exists():
            raise UserError(f"not a LoRA adapter directory (no {name}): {directory}")
    path = directory / MANIFEST
    if not path.exists():
        raise UserError(f"{directory} has no {MANIFEST}: not a maskscope child, its parent is unknown")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg})") from None


def split_name(name: str) -> tuple[str, list[Path]]:
    """A model name "PARENT+lora:DIR[+lora:DIR...]" as the parent's name and the adapter directories."""
    parent, *adapters = name.split("+lora:")
    if not all(adapters):
        raise UserError(f"{name!r}: '+lora:' must be followed by an adapter directory")
    return parent, [Path(a).expanduser() for a in adapters]


def check_adapter_dir(directory: str | Path) -> None:
    """Refuse, without loading anything, a directory that is not a maskscope LoRA child."""
    read_manifest(directory)


def parent_identity(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The parts of a model's fingerprint that a child's parent must match."""
    return {k: fingerprint.get(k) for k in PARENT_KEYS}


def check_parent(manifest: dict[str, Any], parent: Any, directory: Path) -> None:
    """Refuse (one line) an adapter trained on other weights than the model it is loaded on."""
    wanted = parent_identity(manifest.get("parent_fingerprint", {}))
    have = parent_identity(parent.fingerprint())
    diff = [k for k in PARENT_KEYS if wanted[k] != have[k]]
    if diff:
        k = diff[0]
        raise UserError(
            f"adapter {directory} was trained on another parent ({manifest.get('parent', '?')}): "
            f"its {k} is {str(wanted[k])[:16]}, the model's {str(have[k])[:16]}"
        )


def apply_adapter(parent: Any, directory: str | Path, *, precision: str = "fp32") -> Any:
    """A new HFModel: the LoRA adapter in `directory` merged (peft `merge_and_unload`) into `parent`'s
    weights. `parent` must be an fp32 HFModel whose module may be consumed (it is merged in place)."""
    import torch
    from peft import PeftModel

    from maskscope.models.hf import HFModel

    directory = Path(directory).expanduser()
    manifest = read_manifest(directory)
    if not hasattr(parent, "model") or parent.precision != "fp32":
        raise UserError("a LoRA adapter loads onto a local transformers model in fp32 (hf:, gguf:, default)")
    check_parent(manifest, parent, directory)
    digest = adapter_hash(directory)
    if manifest.get("adapter_hash") not in (None, digest):
        raise UserError(f"adapter {directory} does not match its manifest's hash: the files were changed")
    base = parent.model.float()
    with torch.no_grad(), warnings.catch_warnings():
        # peft calls a transformers method that transformers deprecated; the call is peft's, not ours.
        warnings.filterwarnings("ignore", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(
            base, str(directory), is_trainable=False, local_files_only=True
        )
        merged = peft_model.merge_and_unload()
    fingerprint_adapter = (
        digest
        if parent.fingerprint().get("adapter") is None
        else (hashlib.sha256(f"{parent.fingerprint()['adapter']}+{digest}".encode()).hexdigest())
    )
    return HFModel(
        merged,
        parent.tokenizer,
        name=f"{parent.name}+lora:{directory.name}",
        weights_digest=parent.weights_digest,
        precision=precision,
        adapter=fingerprint_adapter,
    )


def find_children(root: str | Path, depth: int = 3) -> list[tuple[Path, dict[str, Any]]]:
    """Child directories (with a manifest) under `root`, at most `depth` levels down, with their manifests."""
    root = Path(root)
    found: list[tuple[Path, dict[str, Any]]] = []
    if not root.is_dir():
        return found
    for level in range(depth + 1):
        for path in sorted(root.glob("/".join(["*"] * level + [MANIFEST]))):
            try:
                found.append((path.parent, json.loads(path.read_text())))
            except (OSError, json.JSONDecodeError):
                continue
    return found
