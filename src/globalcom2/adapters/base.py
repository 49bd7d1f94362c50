"""The handle and the one install path (PEFT-style): every patch is recorded so that `remove()` restores it exactly.

Per-forward state lives in :class:`ForwardState`, one instance per thread, so one patched model can serve several
threads at once: a forward's scores and plans are never seen by another thread's forward.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..config import GlobalComConfig
from ..core.plan import Plan
from .errors import AlreadyAppliedError

if TYPE_CHECKING:
    from .family import FamilyAdapter

MARKER = "_globalcom2_handle"
_MISSING = object()


class ForwardState(threading.local):
    """Scratch state of the forward running in the current thread (a fresh instance per thread).

    Attributes:
        capturing: > 0 while the patched ``get_image_features`` runs: only then do the scoring hooks record
            (so video frames and stray tower calls never leave scores behind).
        scores: per-tile score tensors recorded during the current image encode.
        plans: plans of this thread's last image encode (None before the first).
        context: family data for the current ``forward``/``generate`` call (e.g. InternVL's tile grids).
        skip_last: True while the patched ``get_image_features`` runs with features from an earlier layer: the
            tower's last layer then hands its input on instead of running (its output would be thrown away).
        pending: the last layer's [CLS] query or keys, recorded by one projection hook until the other fires.
    """

    def __init__(self) -> None:
        self.capturing = 0
        self.skip_last = False
        self.pending: dict[str, torch.Tensor] = {}
        self.scores: list[torch.Tensor] = []
        self.plans: list[Plan] | None = None
        self.context: dict[str, Any] = {}


class GlobalComHandle:
    """Returned by :func:`globalcom2.apply` and :func:`globalcom2.methods.apply_method`.

    Attributes:
        model, processor: what was patched.
        config: the validated :class:`~globalcom2.GlobalComConfig`.
        adapter: the family adapter (or method object) that did the patching.
        method: ``"globalcom2"`` or the baseline's name; method_options: its options.
        active: True until :meth:`remove`.
        plans: one :class:`~globalcom2.Plan` per image of the last forward, in batch order: the calling thread's
            last forward if it ran one, else the last forward of any thread.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        config: GlobalComConfig,
        adapter: FamilyAdapter | Any = None,
        method: str = "globalcom2",
        method_options: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.config = config
        self.adapter = adapter
        self.method = method
        self.method_options: dict[str, Any] = dict(method_options or {})
        self.active = False
        self._patches: list[tuple[Any, str, Any]] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._state = ForwardState()
        self._last_plans: list[Plan] = []
        self._lock = threading.Lock()

    # -- plans -------------------------------------------------------------------------------------------------
    @property
    def plans(self) -> list[Plan]:
        own = self._state.plans
        if own is not None:
            return own
        with self._lock:
            return self._last_plans

    @property
    def state(self) -> ForwardState:
        """This thread's :class:`ForwardState`."""
        return self._state

    def publish(self, plans: list[Plan]) -> None:
        """Record the plans of the encode that just ran in this thread."""
        self._state.plans = plans
        with self._lock:
            self._last_plans = plans

    # -- patch bookkeeping ---------------------------------------------------------------------------------
    def patch(self, owner: Any, name: str, new: Callable | Any) -> None:
        """Set ``owner.name = new`` on the instance (never its class), remembering what was there."""
        self._patches.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, new)

    def add_hook(self, hook: torch.utils.hooks.RemovableHandle) -> None:
        self._hooks.append(hook)

    def mark(self) -> None:
        for obj in (self.model, self.processor):
            if obj is not None:
                self.patch(obj, MARKER, self)
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
        self._state.scores = []
        self.active = False

    def __deepcopy__(self, memo: dict) -> GlobalComHandle:
        # A handle is live patch bookkeeping, not data: copies of a patched processor (transformers deep-copies
        # its __dict__ for repr/to_dict) share it rather than duplicate the model it refers to.
        return self

    # -- context manager -------------------------------------------------------------------------------------
    def __enter__(self) -> GlobalComHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"GlobalComHandle({type(self.model).__name__}, method={self.method!r}, {self.config}, {state})"


def existing_handle(obj: Any) -> GlobalComHandle | None:
    """The active handle patched onto ``obj``, if any."""
    h = getattr(obj, "__dict__", {}).get(MARKER)
    return h if isinstance(h, GlobalComHandle) and h.active else None


def install(
    adapter: Any, *, method: str = "globalcom2", method_options: dict[str, Any] | None = None
) -> GlobalComHandle:
    """The one install path of :func:`globalcom2.apply` and every method: check everything, then patch, then mark.

    ``adapter`` has ``model``, ``processor``, ``config``, ``check()`` and ``install(handle)``. Every check runs
    before anything is patched, and a failure while patching undoes what was done, so a failed call leaves model
    and processor untouched.
    """
    for obj, what in ((adapter.model, "model"), (adapter.processor, "processor")):
        if obj is not None and existing_handle(obj) is not None:
            raise AlreadyAppliedError(
                f"GlobalCom² is already applied to this {what}; call .remove() on its handle first"
            )
    adapter.check()
    handle = GlobalComHandle(
        adapter.model,
        adapter.processor,
        adapter.config,
        adapter,
        method=method,
        method_options=method_options,
    )
    try:
        adapter.install(handle)
        handle.mark()
    except BaseException:
        handle.remove()
        raise
    return handle
