"""`globalcom2.apply`: the one-call entry point (PEFT-style: look up the adapter, check, patch, return a handle)."""

from __future__ import annotations

from typing import Any

from .adapters import adapter_for
from .adapters.base import GlobalComHandle, existing_handle
from .config import GlobalComConfig


def apply(
    model: Any, processor: Any = None, config: GlobalComConfig | None = None, **options: Any
) -> GlobalComHandle:
    """Patch ``model`` and ``processor`` in place for GlobalCom² compression and return the handle.

    Args:
        model: a Hugging Face ``LlavaNextForConditionalGeneration`` (as loaded by ``from_pretrained``).
        processor: its ``LlavaNextProcessor`` (required in budget mode, which is the default).
        config: a :class:`GlobalComConfig`; keyword ``options`` override its fields
            (ratio, mode, allocation, scoring, alpha, tau, score, importance).

    Returns:
        A :class:`GlobalComHandle`: ``.plans`` after each forward, ``.remove()`` to undo, usable as a context manager.

    Raises:
        ValueError / TypeError: bad options, unsupported model or processor, or ``apply`` twice on one model.
        Every check runs before anything is patched, so a failed call leaves model and processor untouched.
    """
    cfg = GlobalComConfig.from_kwargs(config, **options)
    adapter_cls = adapter_for(model)
    for obj, what in ((model, "model"), (processor, "processor")):
        if obj is not None and existing_handle(obj) is not None:
            raise ValueError(
                f"GlobalCom² is already applied to this {what}; call .remove() on its handle first"
            )
    adapter = adapter_cls(model, processor, cfg)
    adapter.check()
    handle = GlobalComHandle(model, processor, cfg)
    handle.adapter = adapter  # type: ignore[attr-defined]
    try:
        adapter.install(handle)
        handle.mark()
    except BaseException:
        handle.remove()
        raise
    return handle
