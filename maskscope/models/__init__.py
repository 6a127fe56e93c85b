"""Backends behind one protocol, and the registry that resolves model names."""

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
from maskscope.models.registry import SCHEMES, load_model

__all__ = [
    "SCHEMES",
    "Context",
    "Conversation",
    "LanguageModel",
    "Message",
    "Sample",
    "SampleParams",
    "Scored",
    "TokenDist",
    "load_model",
]
