"""What a run's numbers depend on besides its spec: the chat template and the prompts it rendered, the code
(maskscope's version and git commit), the libraries, and the precision of the forward passes."""

from __future__ import annotations

import hashlib
import platform
import subprocess
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "transformers", "numpy", "scipy", "peft", "pydantic")
PROBE = {"system": "SYSTEM", "user": "USER"}


def sha256(text: str) -> str:
    """Hex SHA-256 of a text (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def git_commit(directory: Path | None = None) -> dict[str, Any] | None:
    """The git commit of the checkout maskscope runs from, and whether it has uncommitted changes; None when
    it is not a git checkout (an installed package) or git is missing."""
    directory = directory or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries the numbers depend on (None: not installed), and Python's."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def exactness(precision: str | None) -> str:
    """How exact the run's computed probabilities are, given the precision of its forward passes."""
    if precision == "bf16":
        return (
            "approximate: bf16 weights and activations; every 'exact' probability carries bfloat16 rounding "
            "(about 3 significant digits per logit)"
        )
    if precision == "fp16":
        return (
            "approximate: float16 weights and activations; every 'exact' probability carries float16 rounding "
            "(about 3 significant digits per logit)"
        )
    if precision == "fp32":
        return "exact: fp32 forward passes (rounding at float32 precision only)"
    return "as exact as the backend's own computation (a server's precision is not known here)"


def chat_template(model: Any) -> dict[str, Any]:
    """The chat template's hash (full SHA-256 of its text, when the tokenizer is local) and a probe
    conversation rendered by the model, so that two runs with differently rendered prompts can be told apart."""
    out: dict[str, Any] = {"sha256": None, "probe": None, "probe_rendered": None}
    try:
        template = getattr(model.tokenizer, "chat_template", None)
    except Exception:  # a server backend without a local tokenizer
        template = None
    if template:
        out["sha256"] = sha256(str(template))
    fingerprint = model.fingerprint() if hasattr(model, "fingerprint") else {}
    out["fingerprint_digest"] = fingerprint.get("chat_template")
    try:
        from maskscope.models.base import Conversation

        out["probe"] = PROBE
        out["probe_rendered"] = model.render(Conversation.of(**PROBE))
    except Exception as e:  # rendering is the backend's business; record why it is missing
        out["probe_rendered"] = None
        out["probe_error"] = f"{type(e).__name__}: {e}"
    return out


def rendered_prompts(store: Any, run: str) -> dict[str, Any]:
    """The distinct rendered prompts of a run's model calls (from the store's record of its lookups): how many,
    and one SHA-256 over them sorted."""
    prompts = set()
    for key, _, _ in store.lookups(run):
        parts = store.parts(key)
        if parts and isinstance(parts.get("prompt"), str):
            prompts.add(parts["prompt"])
    joined = "\x00".join(sorted(prompts))
    return {"count": len(prompts), "sha256": sha256(joined) if prompts else None}


def collect(model: Any, spec: Any, store: Any = None) -> dict[str, Any]:
    """The run metadata recorded in every summary (the runner collects it before the run, so that the git
    commit is the one of the code that computed it, and adds the rendered prompts after)."""
    from maskscope import __version__

    fingerprint = model.fingerprint() if hasattr(model, "fingerprint") else {}
    served = fingerprint.get("backend") == "openai"
    precision = None if served else fingerprint.get("precision") or getattr(spec, "precision", None)
    out: dict[str, Any] = {
        "maskscope": {"version": __version__, "git": git_commit()},
        "libraries": library_versions(),
        "precision": precision,
        "dtype": fingerprint.get("dtype"),
        "numbers": exactness(precision),
        "approximate": precision != "fp32",
        "chat_template": chat_template(model),
    }
    if store is not None:
        out["rendered_prompts"] = rendered_prompts(store, spec.name)
    return out
