"""Model-family adapters. Each registers itself; `globalcom2.apply` picks the first that accepts the model."""

from __future__ import annotations

import importlib
from typing import Any

# Modules holding an adapter class with `family`, `is_supported(model)` and the adapter protocol
# (`__init__(model, processor, config)`, `check()`, `install(handle)`). Imported lazily: transformers is heavy.
ADAPTER_MODULES: list[str] = [
    "globalcom2.adapters.llava_next",
    "globalcom2.adapters.llava_onevision",
    "globalcom2.adapters.internvl",
]


def register_adapter_module(module: str) -> None:
    """Add an adapter module (duplicates are an error)."""
    if module in ADAPTER_MODULES:
        raise ValueError(f"adapter module {module!r} is already registered")
    ADAPTER_MODULES.append(module)


def adapter_for(model: Any):
    """The adapter class for ``model``; TypeError naming the supported classes otherwise."""
    supported = []
    for name in ADAPTER_MODULES:
        adapter = importlib.import_module(name).ADAPTER
        if adapter.is_supported(model):
            return adapter
        supported.append(adapter.model_class_name)
    raise TypeError(
        f"unsupported model class {type(model).__name__}; GlobalCom² supports {', '.join(supported)}"
    )
