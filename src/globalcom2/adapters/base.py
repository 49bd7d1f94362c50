"""PEFT-style injection: every patch is recorded on a handle so that `remove()` restores the originals exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..config import GlobalComConfig
from ..core.plan import Plan

MARKER = "_globalcom2_handle"
_MISSING = object()


class GlobalComHandle:
    """Returned by :func:`globalcom2.apply`. Holds the plans of the last forward and undoes every patch.

    Attributes:
        plans: one :class:`~globalcom2.core.plan.Plan` per image of the last forward, in batch order.
        config: the validated :class:`~globalcom2.GlobalComConfig`.
    """

    def __init__(self, model: Any, processor: Any, config: GlobalComConfig) -> None:
        self.model = model
        self.processor = processor
        self.config = config
        self.plans: list[Plan] = []
        self._patches: list[tuple[Any, str, Any]] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._pending_scores: list[torch.Tensor] = []
        self.active = False

    # -- patch bookkeeping ---------------------------------------------------------------------------------
    def patch(self, owner: Any, name: str, new: Callable) -> None:
        """Set ``owner.name = new`` on the instance, remembering what was there."""
        self._patches.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, new)

    def add_hook(self, hook: torch.utils.hooks.RemovableHandle) -> None:
        self._hooks.append(hook)

    def mark(self) -> None:
        for obj in (self.model, self.processor):
            if obj is not None:
                self.patch(obj, MARKER, self)  # type: ignore[arg-type]
        self.active = True

    def remove(self) -> None:
        """Restore model and processor exactly; calling it again is a no-op."""
        for hook in reversed(self._hooks):
            hook.remove()
        for owner, name, original in reversed(self._patches):
            if original is _MISSING:
                owner.__dict__.pop(name, None)
            else:
                setattr(owner, name, original)
        self._hooks.clear()
        self._patches.clear()
        self._pending_scores.clear()
        self.active = False

    # -- context manager -------------------------------------------------------------------------------------
    def __enter__(self) -> GlobalComHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"GlobalComHandle({type(self.model).__name__}, {self.config}, {state})"


def existing_handle(obj: Any) -> GlobalComHandle | None:
    """The active handle patched onto ``obj``, if any."""
    h = getattr(obj, "__dict__", {}).get(MARKER)
    return h if isinstance(h, GlobalComHandle) and h.active else None
