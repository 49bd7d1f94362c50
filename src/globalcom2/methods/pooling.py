"""Which pooling rule a family gets: one mixin per token layout (the rules in :mod:`globalcom2.methods.vision` and
:mod:`globalcom2.methods.native`), put in front of the family's adapter."""

from __future__ import annotations

import functools

from ..adapters.anyres import AnyresAdapter
from ..adapters.internvl import InternVLAdapter
from ..adapters.llava_next import LlavaNextAdapter
from ..adapters.qwen import QwenAdapter
from .native import native_pooling_class
from .vision import AnyresPooling, PoolingAdapter, TilePooling


@functools.cache
def pooling_class(family: type) -> type:
    """The pooling baseline's adapter class on ``family`` (one class per family, made once); TypeError for a family
    without a pooling rule."""
    if family is LlavaNextAdapter:
        return PoolingAdapter
    if issubclass(family, AnyresAdapter):
        mixin: type = AnyresPooling  # the thumbnail and the unpadded crop token grid
    elif issubclass(family, InternVLAdapter):
        mixin = TilePooling  # whole tiles of LLM tokens (InternVL, Idefics3, SmolVLM, Gemma 3, Aya Vision)
    elif issubclass(family, QwenAdapter):
        return native_pooling_class(family)  # type: ignore[no-any-return,arg-type]  # the merged grid
    else:
        raise TypeError(f"pooling has no rule for the token layout of {family.__name__}")
    return type(f"Pooling{family.__name__}", (mixin, family), {})


def pooling_rule(family: type) -> str | None:
    """None when :func:`pooling_class` has a rule for ``family``'s token layout, else why not."""
    try:
        pooling_class(family)
    except TypeError as err:
        return str(err)
    return None
