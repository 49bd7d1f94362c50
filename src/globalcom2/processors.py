"""Hugging Face processors without a video processor, built without changing any transformers class.

In transformers 5.19-5.24 ``LlavaOnevisionProcessor`` and ``InternVLProcessor`` take a ``video_processor``;
``ProcessorMixin.__init__`` checks it against ``VideoProcessorMixin`` (which transformers only provides when
torchvision imports) and fails even for ``None``; ``save_pretrained`` fails on a ``None`` sub-processor and
``from_pretrained`` insists on loading one. Images need none of it.

:func:`processor_class_without_video` returns, per processor class, one cached subclass whose ``get_attributes()``
leaves ``video_processor`` out. ``ProcessorMixin`` then neither checks, saves nor loads a video processor, so
construction, ``save_pretrained`` and ``from_pretrained`` all work as for a processor that never had one; the
instance's ``video_processor`` is ``None`` (a class attribute of the subclass). The subclass keeps the base class's
``__name__``, so what ``save_pretrained`` writes (``processor_class``) names the stock class and reloads with
``AutoProcessor`` wherever torchvision is installed; it lives in this module
(``globalcom2.processors.LlavaOnevisionProcessor``), resolved by name on first use, so it pickles. Nothing of
``ProcessorMixin`` or of the stock class is modified: the override is a method of the subclass only.
"""

from __future__ import annotations

import inspect
from typing import Any

#: stock processor class -> its subclass without a video processor (one per class, however often it is built)
_WITHOUT_VIDEO: dict[type, type] = {}


def _has_video_processor(cls: type) -> bool:
    return "video_processor" in cls.get_attributes()  # type: ignore[attr-defined]


def _required_video_position(cls: type) -> int | None:
    """Position of ``video_processor`` among ``cls.__init__``'s positional arguments when it has no default."""
    params = list(inspect.signature(cls).parameters.values())  # the constructor's, less self
    for i, p in enumerate(params):
        if p.name == "video_processor" and p.default is inspect.Parameter.empty:
            return i
    return None


def processor_class_without_video(cls: type) -> type:
    """The subclass of ``cls`` (a ``ProcessorMixin`` class) that takes no video processor; ``cls`` itself when it
    has none (e.g. ``LlavaNextProcessor``). Cached: the same class object on every call."""
    from transformers.processing_utils import ProcessorMixin

    if not (isinstance(cls, type) and issubclass(cls, ProcessorMixin)):
        raise TypeError(f"expected a transformers processor class, got {cls!r}")
    if getattr(cls, "__module__", None) == __name__ or not _has_video_processor(cls):
        return cls  # already one of ours, or nothing to leave out
    found = _WITHOUT_VIDEO.get(cls)
    if found is not None:
        return found

    base: Any = cls

    class WithoutVideo(base):
        # what the stock class would hold for video_processor=None; a class attribute, so never saved
        video_processor = None

        @classmethod
        def get_attributes(klass) -> list[str]:
            return [a for a in super().get_attributes() if a != "video_processor"]

        @classmethod
        def _get_arguments_from_pretrained(klass, *args: Any, **kwargs: Any) -> list:
            # The sub-processors, passed positionally; a stock class that requires video_processor (SmolVLMProcessor)
            # gets None in its place.
            found = super()._get_arguments_from_pretrained(*args, **kwargs)
            at = _required_video_position(base)
            return found if at is None or len(found) < at else [*found[:at], None, *found[at:]]

    WithoutVideo.__name__ = WithoutVideo.__qualname__ = cls.__name__
    WithoutVideo.__module__ = __name__
    WithoutVideo.__doc__ = (
        f"``transformers.{cls.__name__}`` without a video processor (see :mod:`{__name__}`)."
    )
    # setdefault: when two threads race, both get the class that was stored first
    return _WITHOUT_VIDEO.setdefault(cls, WithoutVideo)


def build_processor_without_video(cls: type, **kwargs: Any) -> Any:
    """``cls(**kwargs)`` (image processor, tokenizer, options) with no video processor and no torchvision needed."""
    if kwargs.pop("video_processor", None) is not None:
        raise ValueError("build_processor_without_video: pass no video_processor (or None)")
    if _required_video_position(cls) is not None:
        kwargs["video_processor"] = None  # a required argument of the stock __init__ (SmolVLMProcessor)
    return processor_class_without_video(cls)(**kwargs)


def __getattr__(name: str) -> type:
    """``globalcom2.processors.<ProcessorClass>``: the class without a video processor (how pickle finds it)."""
    if name.startswith("_") or not name.endswith("Processor"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import transformers
    from transformers.processing_utils import ProcessorMixin

    try:
        cls = getattr(transformers, name, None)
    except Exception:  # a class transformers cannot import here (a missing backend)
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, ProcessorMixin)) or not _has_video_processor(cls):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return processor_class_without_video(cls)
