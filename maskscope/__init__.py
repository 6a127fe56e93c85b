"""maskscope: measure what a language model does behind the persona it wears.

import maskscope as ms
model = ms.load_model()                      # the bundled SmolLM2-135M-Instruct, offline
ctx = ms.Conversation.of(system="...", user="...")
model.score(ctx, ["no", "No"])               # exact log-probabilities

`import maskscope` loads only the light types; torch, transformers and the experiments are imported when
first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from maskscope.errors import UserError
from maskscope.finetune import finetune
from maskscope.models.base import (
    Candidate,
    Capability,
    Context,
    ContinueJob,
    Conversation,
    ForcedJob,
    LanguageModel,
    Message,
    Sample,
    SampleParams,
    Scored,
    Seq,
    TokenDist,
)

__version__ = "0.1.0"

# Public names defined in modules that import heavy libraries: imported on first access.
_LAZY = {
    "load_model": "maskscope.models.registry",
    "load_spec": "maskscope.runner",
    "run_spec": "maskscope.runner",
    "read_run": "maskscope.runs",
    "read_runs": "maskscope.runs",
    "read_samples": "maskscope.runs",
    "wilson": "maskscope.stats",
    "CachedModel": "maskscope.store",
    "Store": "maskscope.store",
    "implicit_reward": "maskscope.reward",
    "load_reward_model": "maskscope.reward",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'maskscope' has no attribute {name!r}")


__all__ = [
    "CachedModel",
    "Candidate",
    "Capability",
    "Context",
    "ContinueJob",
    "Conversation",
    "ForcedJob",
    "LanguageModel",
    "Message",
    "Sample",
    "SampleParams",
    "Scored",
    "Seq",
    "Store",
    "TokenDist",
    "UserError",
    "__version__",
    "finetune",
    "implicit_reward",
    "load_model",
    "load_reward_model",
    "load_spec",
    "read_run",
    "read_runs",
    "read_samples",
    "run_spec",
    "wilson",
]
