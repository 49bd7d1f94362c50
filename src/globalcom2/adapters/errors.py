"""Error classes. Each also subclasses the builtin it refines, so ``except ValueError`` / ``TypeError`` still works."""

from __future__ import annotations


class GlobalComError(Exception):
    """Base class of every error GlobalCom² raises on purpose."""


class UnsupportedModelError(GlobalComError, TypeError):
    """The model (or its vision tower, or the processor's class) is not one GlobalCom² supports."""


class IncompatibleProcessorError(GlobalComError, ValueError):
    """The processor does not match the model (tile size, pinpoints, image token, ...)."""


class AlreadyAppliedError(GlobalComError, ValueError):
    """GlobalCom² (or a baseline) is already applied to this model or processor."""


class PlaceholderMismatchError(GlobalComError, ValueError):
    """The prompts' image placeholders do not match the image features of this forward."""
