"""GlobalCom²: training-free, thumbnail-guided visual-token compression for high-resolution VLMs (AAAI 2026).

import globalcom2
gc = globalcom2.apply(model, processor, ratio=0.25)
out = model.generate(**processor(images=image, text=prompt, return_tensors="pt"))
gc.plans; gc.remove()

A baseline or combination instead of GlobalCom² (the same handle): ``globalcom2.apply_method(model, processor,
"fastv", ratio=0.25)`` (= :func:`globalcom2.methods.apply_method`).
"""

from .adapters.base import GlobalComHandle
from .adapters.errors import (
    AlreadyAppliedError,
    GlobalComError,
    IncompatibleProcessorError,
    PlaceholderMismatchError,
    UnsupportedModelError,
)
from .apply import apply
from .config import GlobalComConfig
from .core.plan import Plan
from .methods import apply_method

__version__ = "0.1.0"
__all__ = [
    "AlreadyAppliedError",
    "GlobalComConfig",
    "GlobalComError",
    "GlobalComHandle",
    "IncompatibleProcessorError",
    "PlaceholderMismatchError",
    "Plan",
    "UnsupportedModelError",
    "apply_method",
    "__version__",
    "apply",
]
