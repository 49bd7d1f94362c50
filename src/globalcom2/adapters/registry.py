"""Family registry: adapter classes register themselves by model class; :func:`adapter_for` looks one up."""

from __future__ import annotations

from typing import Any

from .errors import UnsupportedModelError

ADAPTERS: dict[str, type] = {}


def register_adapter(cls: type) -> type:
    """Class decorator: register a family adapter under its ``family`` name (a duplicate is an error)."""
    family = cls.family  # type: ignore[attr-defined]
    if family in ADAPTERS:
        raise ValueError(
            f"an adapter for family {family!r} is already registered ({ADAPTERS[family].__name__})"
        )
    ADAPTERS[family] = cls
    return cls


def adapter_for(model: Any) -> Any:
    """The adapter class for ``model``; :class:`UnsupportedModelError` (a TypeError) naming the supported classes."""
    for cls in ADAPTERS.values():
        if cls.is_supported(model):  # type: ignore[attr-defined]
            return cls
    names = ", ".join(cls.model_class_name for cls in ADAPTERS.values())  # type: ignore[attr-defined]
    raise UnsupportedModelError(
        f"unsupported model class {type(model).__name__}; GlobalCom² supports {names}"
    )
