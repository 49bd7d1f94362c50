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
    if name == "Llama4ImageProcessorPil":
        return llama4_image_processor_pil_class()
    if name == "Cohere2VisionImageProcessorPil":
        return cohere2_vision_image_processor_pil_class()
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


def llama4_image_processor_pil_class() -> type:
    """``Llama4ImageProcessorPil``: Llama 4's image processing without torchvision (the stock
    ``Llama4ImageProcessor`` is torchvision-only). Built on first use (transformers imported lazily), cached.

    Lays the pixel values out exactly as the stock processor does: the canvas of
    :func:`globalcom2.adapters.llama4.llama4_canvas`, the image resized onto it without distortion (PIL bilinear),
    zero-padded at the bottom and right, rescaled and normalised, cut into tiles row-major, and -- for more than one
    tile -- the whole image squashed to one tile appended last; ``aspect_ratios`` (rows, cols) per image. The stock
    processor resizes with torchvision and normalises in bfloat16, so pixel values differ from it in the low bits;
    the layout, the tile grid and the token counts are the same. Saved as ``Llama4ImageProcessor`` (the PIL
    backend's rule), so a checkpoint written with it loads the stock class where torchvision is installed."""
    global _LLAMA4_PIL
    if _LLAMA4_PIL is not None:
        return _LLAMA4_PIL
    import numpy as np
    from transformers.image_processing_backends import PilBackend
    from transformers.image_processing_utils import BatchFeature
    from transformers.image_utils import PILImageResampling, SizeDict
    from transformers.processing_utils import ImagesKwargs

    from .adapters.llama4 import llama4_canvas

    class Llama4ImageProcessorKwargs(ImagesKwargs, total=False):  # the stock processor's two options
        max_patches: int
        resize_to_max_canvas: bool

    class Llama4ImageProcessorPil(PilBackend):
        resample = PILImageResampling.BILINEAR
        image_mean = [0.5, 0.5, 0.5]
        image_std = [0.5, 0.5, 0.5]
        size = {"height": 336, "width": 336}
        do_resize = True
        do_rescale = True
        do_normalize = True
        do_convert_rgb = True
        max_patches = 16
        resize_to_max_canvas = False
        model_input_names = ["pixel_values"]
        valid_kwargs = Llama4ImageProcessorKwargs

        def _preprocess(  # type: ignore[override]  # the stock processor's two options added
            self, images: list, size: SizeDict, resample: Any, do_rescale: bool, rescale_factor: float,
            do_normalize: bool, image_mean: Any, image_std: Any, return_tensors: Any, max_patches: int = 16,
            resize_to_max_canvas: bool = False, **kwargs: Any,
        ) -> Any:  # fmt: skip
            tile = int(size.height or 0)
            norm = _normaliser(self, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
            tiles: list[np.ndarray] = []
            ratios: list[list[int]] = []
            for image in images:  # channel-first arrays
                height, width = image.shape[-2:]
                rows, cols, new_h, new_w = llama4_canvas(
                    height, width, tile, max_patches, resize_to_max_canvas
                )
                resized = self.resize(image, SizeDict(height=new_h, width=new_w), resample=resample)
                canvas = np.zeros((image.shape[0], rows * tile, cols * tile), dtype=resized.dtype)
                canvas[:, :new_h, :new_w] = resized
                tiles += _tiles_and_thumbnail(self, image, norm(canvas), rows, cols, tile, resample, norm)
                ratios.append([rows, cols])
            return BatchFeature(
                data={"pixel_values": np.stack(tiles), "aspect_ratios": np.array(ratios)},
                tensor_type=return_tensors,
            )

    Llama4ImageProcessorPil.__module__ = __name__
    _LLAMA4_PIL = Llama4ImageProcessorPil
    return Llama4ImageProcessorPil


_LLAMA4_PIL: type | None = None


def _normaliser(proc: Any, do_rescale: bool, factor: float, do_normalize: bool, mean: Any, std: Any) -> Any:
    """``x -> x`` rescaled and normalised as ``proc`` does it (float32 out)."""
    import numpy as np

    def norm(x: Any) -> Any:
        if do_rescale:
            x = proc.rescale(x, factor)
        if do_normalize:
            x = proc.normalize(x, mean, std)
        return x.astype(np.float32)

    return norm


def _tiles_and_thumbnail(proc: Any, image: Any, canvas: Any, rows: int, cols: int, tile: int, resample: Any,
                         norm: Any) -> list:  # fmt: skip
    """The ``(C, tile, tile)`` tiles of a normalised ``rows x cols`` canvas, row-major, then -- for more than one
    tile -- the whole ``image`` squashed to one tile and normalised (the thumbnail / global tile, last)."""
    from transformers.image_utils import SizeDict

    cut = canvas.reshape(-1, rows, tile, cols, tile).transpose(1, 3, 0, 2, 4)
    out = list(cut.reshape(rows * cols, -1, tile, tile))
    if rows * cols > 1:
        out.append(norm(proc.resize(image, SizeDict(height=tile, width=tile), resample=resample)))
    return out


def cohere2_vision_image_processor_pil_class() -> type:
    """``Cohere2VisionImageProcessorPil``: Cohere2 Vision's image processing without torchvision (the stock
    ``Cohere2VisionImageProcessor`` is torchvision-only). Built on first use, cached.

    Lays the pixel values out as the stock processor does: the grid of
    :func:`globalcom2.adapters.cohere2_vision.cohere2_tile_grid`, the image stretched onto it (PIL bicubic), cut
    into tiles row-major, and -- for more than one tile -- the whole image squashed to one tile appended last;
    rescaled and normalised; ``num_patches`` (tiles) per image. The stock processor resizes with torchvision, so
    pixel values differ from it in the low bits; the layout, the grid and the token counts are the same. Saved as
    ``Cohere2VisionImageProcessor``."""
    global _COHERE2_PIL
    if _COHERE2_PIL is not None:
        return _COHERE2_PIL
    import numpy as np
    from transformers.image_processing_backends import PilBackend
    from transformers.image_processing_utils import BatchFeature
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, SizeDict
    from transformers.processing_utils import ImagesKwargs

    from .adapters.cohere2_vision import cohere2_tile_grid

    class Cohere2VisionImageProcessorKwargs(ImagesKwargs, total=False):  # the stock processor's options
        crop_to_patches: bool
        min_patches: int
        max_patches: int

    class Cohere2VisionImageProcessorPil(PilBackend):
        resample = PILImageResampling.BICUBIC
        image_mean = OPENAI_CLIP_MEAN
        image_std = OPENAI_CLIP_STD
        size = {"height": 512, "width": 512}
        do_resize = True
        do_rescale = True
        do_normalize = True
        do_convert_rgb = True
        crop_to_patches = True
        min_patches = 1
        max_patches = 12
        patch_size = 16  # merged tokens per tile side, which the processor reads
        model_input_names = ["pixel_values"]
        valid_kwargs = Cohere2VisionImageProcessorKwargs

        def _preprocess(  # type: ignore[override]  # the stock processor's options added
            self, images: list, size: SizeDict, resample: Any, do_rescale: bool, rescale_factor: float,
            do_normalize: bool, image_mean: Any, image_std: Any, return_tensors: Any, crop_to_patches: bool = True,
            min_patches: int = 1, max_patches: int = 12, **kwargs: Any,
        ) -> Any:  # fmt: skip
            tile = int(size.height or 0)
            norm = _normaliser(self, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
            tiles: list[np.ndarray] = []
            counts: list[int] = []
            for image in images:  # channel-first arrays
                height, width = image.shape[-2:]
                rows, cols = (
                    cohere2_tile_grid(height, width, (tile, tile), min_patches, max_patches)
                    if crop_to_patches and max_patches > 1
                    else (1, 1)
                )
                canvas = self.resize(
                    image, SizeDict(height=rows * tile, width=cols * tile), resample=resample
                )
                made = _tiles_and_thumbnail(self, image, norm(canvas), rows, cols, tile, resample, norm)
                tiles += made
                counts.append(len(made))
            return BatchFeature(
                data={"pixel_values": np.stack(tiles), "num_patches": counts}, tensor_type=return_tensors
            )

        def get_number_of_image_patches(
            self, height: int, width: int, images_kwargs: dict | None = None
        ) -> int:
            options = {"crop_to_patches": self.crop_to_patches, "min_patches": self.min_patches,
                       "max_patches": self.max_patches, "size": self.size, **(images_kwargs or {})}  # fmt: skip
            size = options["size"]
            tile = int(size["height"]) if isinstance(size, dict) else int(size.height)
            if not (options["crop_to_patches"] and int(options["max_patches"]) > 1):
                return 1
            rows, cols = cohere2_tile_grid(height, width, (tile, tile), 1, int(options["max_patches"]))
            return 1 if rows * cols == 1 else rows * cols + 1

    Cohere2VisionImageProcessorPil.__module__ = __name__
    _COHERE2_PIL = Cohere2VisionImageProcessorPil
    return Cohere2VisionImageProcessorPil


_COHERE2_PIL: type | None = None
