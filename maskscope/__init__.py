"""maskscope: measure what a language model does behind the persona it wears.

import maskscope as ms
model = ms.load_model()                      # the bundled SmolLM2-135M-Instruct, offline
ctx = ms.Conversation.of(system="...", user="...")
model.score(ctx, ["no", "No"])               # exact log-probabilities
"""

from maskscope.errors import UserError
from maskscope.finetune import finetune
from maskscope.models.base import (
    Context,
    Conversation,
    LanguageModel,
    Message,
    Sample,
    SampleParams,
    Scored,
    TokenDist,
)
from maskscope.models.registry import load_model
from maskscope.runner import load_spec, run_spec
from maskscope.stats import wilson
from maskscope.store import CachedModel, Store

__version__ = "0.1.0"

__all__ = [
    "CachedModel",
    "Context",
    "Conversation",
    "LanguageModel",
    "Message",
    "Sample",
    "SampleParams",
    "Scored",
    "Store",
    "TokenDist",
    "UserError",
    "__version__",
    "finetune",
    "load_model",
    "load_spec",
    "run_spec",
    "wilson",
]
