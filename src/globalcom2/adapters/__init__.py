"""Model-family adapters. Each registers itself (:func:`~globalcom2.adapters.registry.register_adapter`);
:func:`adapter_for` picks the one whose model class matches. Family modules import transformers lazily."""

from __future__ import annotations

# the built-in families register themselves on import
from . import (  # noqa: F401
    aya_vision,
    cohere2_vision,
    gemma3,
    idefics3,
    internvl,
    llama4,
    llava_next,
    llava_onevision,
    qwen,
)
from .registry import ADAPTERS, adapter_for, register_adapter

__all__ = ["ADAPTERS", "adapter_for", "register_adapter"]
