"""`globalcom2.apply`: the one-call entry point (PEFT-style: look up the adapter, check, patch, return a handle)."""

from __future__ import annotations

from typing import Any

from .adapters import adapter_for
from .adapters.base import GlobalComHandle, install
from .config import GlobalComConfig


def apply(
    model: Any, processor: Any = None, config: GlobalComConfig | None = None, **options: Any
) -> GlobalComHandle:
    """Patch ``model`` and ``processor`` in place for GlobalCom² compression and return the handle.

    Args:
        model: a supported Hugging Face model (LLaVA-NeXT, LLaVA-OneVision, InternVL), as ``from_pretrained`` loads it.
        processor: its processor (required in budget mode, the default, and always for InternVL).
        config: a :class:`GlobalComConfig`; keyword ``options`` override its fields
            (ratio, mode, allocation, scoring, alpha, tau, score, importance).

    Returns:
        A :class:`GlobalComHandle`: ``.plans`` after each forward, ``.remove()`` to undo, usable as a context manager.

    Raises:
        ValueError / TypeError (or their subclasses in :mod:`globalcom2.adapters.errors`): bad options, unsupported
        model or processor, or ``apply`` twice on one model. Every check runs before anything is patched, so a
        failed call leaves model and processor untouched.
    """
    cfg = GlobalComConfig.from_kwargs(config, **options)
    adapter = adapter_for(model)(model, processor, cfg)
    return install(adapter, method="globalcom2", method_options=cfg.to_dict())
