"""Loading a model and its processor: the one place every command (``ask``, ``visualize``, ``bench``, ``eval``,
``demo``) and the tests go through.

* :func:`load_model_and_processor` takes a LLaVA-NeXT, LLaVA-OneVision or InternVL checkpoint by path or hub id (its
  class comes from its config), or ``"standin"`` for the offline DINOv2 stand-in model in the geometry of
  ``family``; a dtype name and a device. A checkpoint that cannot be loaded raises :class:`ModelLoadError`
  naming it.
* :func:`load_processor` is ``AutoProcessor.from_pretrained`` with a fallback for processors whose video
  processor cannot be built (no torchvision): the same processor class without one, see
  :mod:`globalcom2.processors`. No transformers class is changed.
* :func:`load_tiny_family` loads any checkpoint written by :mod:`globalcom2.demo.tiny_model` or
  :mod:`globalcom2.demo.tiny_families`.

This module imports nothing from the command line (the CLI turns :class:`ModelLoadError` into its own one-line
error).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .demo.tiny_families import FAMILIES, build_standin_checkpoint
from .processors import processor_class_without_video

__all__ = [
    "DTYPES", "FAMILIES", "ModelLoadError", "check_device", "load_model_and_processor", "load_processor", "load_standin",
    "load_tiny_family",
]  # fmt: skip

#: dtype names accepted by :func:`load_model_and_processor` (``auto``: the checkpoint's own dtype)
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ModelLoadError(ValueError):
    """A model or processor that cannot be loaded; the message names it (and says why, in one line)."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _torch_dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def check_device(device: Any) -> Any:
    """``device`` unchanged if torch can use it here, else a ``ValueError`` saying why (bad name, no CUDA)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a device torch knows: {_first_line(err)}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__})"
        )
    return device


def _looks_like_path(name: str) -> bool:
    """A local path for sure (a hub id is ``org/name`` or ``name``): absolute, ``./``, ``../``, ``~``, or with
    two or more ``/``."""
    return (
        Path(name).is_absolute()
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _check_local(name: str) -> None:
    if not _looks_like_path(name):
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelLoadError(f"cannot load model {name!r}: no such directory")
    if not path.is_dir():
        raise ModelLoadError(f"cannot load model {name!r}: not a directory (a checkpoint is a folder)")


def load_model_and_processor(
    name: str | os.PathLike, *, dtype: Any = "auto", device: Any = "cpu", family: str = "llava_next"
) -> tuple[Any, Any]:
    """``(model in eval mode on device, processor)`` for a checkpoint path or hub id, or ``"standin"``.

    Args:
        name: checkpoint folder or hub id (the model class comes from its config), or ``"standin"``: the offline
            DINOv2 stand-in tower with a tiny random LLM, built in a temporary folder and loaded back.
        dtype: ``"auto"`` (the checkpoint's dtype), ``"float32"``, ``"bfloat16"``, ``"float16"`` or a
            ``torch.dtype``.
        device: any torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        family: the stand-in's geometry (:data:`FAMILIES`); ignored for a real checkpoint.

    Raises:
        ModelLoadError: the checkpoint cannot be found or loaded (the message names it).
        ValueError: an unknown dtype, device or family.
    """
    torch_dtype = _torch_dtype(dtype)
    check_device(device)
    if str(name) == "standin":
        return load_standin(family=family, dtype=torch_dtype, device=device)
    return _load_checkpoint(str(name), dtype=torch_dtype, device=device)


def _load_checkpoint(name: str, *, device: Any = None, **kwargs: Any) -> tuple[Any, Any]:
    """Model (eval mode; moved to ``device`` when given) and processor, every failure a :class:`ModelLoadError`."""
    from transformers import AutoModelForImageTextToText

    _check_local(name)
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
        if device is not None:
            model = model.to(device)
        fix_llama4_outputs(model)  # transformers 5.24's Llama 4 forward (a no-op elsewhere)
        processor = load_processor(name)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load model {name!r}: {_first_line(err)}") from err
    return model.eval(), processor


def load_standin(
    *,
    family: str = "llava_next",
    dtype: Any = "auto",
    device: Any = "cpu",
    workdir: str | os.PathLike | None = None,
    llm_hidden: int = 512,
    llm_layers: int = 4,
) -> tuple[Any, Any]:
    """The DINOv2 stand-in model of ``family`` (stock transformers classes, tiny random LLM), written to
    ``workdir`` (default: a temporary folder, removed once loaded) and loaded back like any checkpoint."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if workdir is not None:
        path = build_standin_checkpoint(
            Path(workdir), family=family, llm_hidden=llm_hidden, llm_layers=llm_layers
        )
        return _load_checkpoint(str(path), dtype=_torch_dtype(dtype), device=check_device(device))
    with tempfile.TemporaryDirectory(prefix="globalcom2_standin_", ignore_cleanup_errors=True) as tmp:
        path = build_standin_checkpoint(
            Path(tmp), family=family, llm_hidden=llm_hidden, llm_layers=llm_layers
        )
        # disable_mmap: every tensor is read into memory, so the folder can go once this returns
        return _load_checkpoint(
            str(path), dtype=_torch_dtype(dtype), device=check_device(device), disable_mmap=True
        )


def _processor_class_name(path: str) -> str | None:
    """``processor_class`` from a checkpoint's processor / preprocessor / tokenizer config (local or cached)."""
    from transformers.utils.hub import cached_file

    for filename in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            resolved = cached_file(
                path, filename, _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )  # fmt: skip
        except (OSError, ValueError):
            resolved = None
        if not resolved:
            continue
        try:
            value = json.loads(Path(resolved).read_text()).get("processor_class")
        except (OSError, ValueError):
            continue
        if isinstance(value, str) and value:
            return value
    return None


def load_processor(path: str | os.PathLike) -> Any:
    """``AutoProcessor.from_pretrained(path)``; when that fails for want of a video processor (transformers without
    torchvision), the checkpoint's processor class without one (:mod:`globalcom2.processors`) loads it instead,
    from the same files. Image inputs are processed identically; video inputs need torchvision anyway."""
    import transformers
    from transformers import AutoProcessor
    from transformers.processing_utils import ProcessorMixin

    name = str(path)
    try:
        return AutoProcessor.from_pretrained(name)
    except (OSError, ImportError, AttributeError, ValueError, TypeError) as err:
        first_error = err
    cls_name = _processor_class_name(name)
    try:
        cls = getattr(transformers, cls_name, None) if cls_name else None
    except Exception:  # a class transformers cannot import here (a missing backend)
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, ProcessorMixin)):
        raise first_error
    if cls_name in _PIL_IMAGE_PROCESSORS:  # a torchvision-only image processor: its PIL stand-in
        try:
            return _with_pil_image_processor(cls, name, _PIL_IMAGE_PROCESSORS[cls_name]())
        except Exception as err:
            raise err from first_error
    without_video: Any = processor_class_without_video(cls)
    if without_video is cls:  # the class has no video processor: the failure was something else
        raise first_error
    try:
        return without_video.from_pretrained(name)
    except Exception as err:  # both failures in the traceback: this one, caused by AutoProcessor's
        raise err from first_error


def _llama4_pil() -> type:
    from .processors import llama4_image_processor_pil_class

    return llama4_image_processor_pil_class()


def _cohere2_pil() -> type:
    from .processors import cohere2_vision_image_processor_pil_class

    return cohere2_vision_image_processor_pil_class()


#: processor class -> the PIL image processor that stands in for its torchvision-only one
_PIL_IMAGE_PROCESSORS = {"Llama4Processor": _llama4_pil, "Cohere2VisionProcessor": _cohere2_pil}


def _with_pil_image_processor(cls: Any, path: str, image_processor_cls: Any) -> Any:
    """``cls`` from the checkpoint at ``path`` with ``image_processor_cls`` (a PIL stand-in) read from the same
    files, the tokenizer and the processor's own options (``processor_config.json``) as saved."""
    from transformers import AutoTokenizer
    from transformers.utils.hub import cached_file

    options: dict[str, Any] = {}
    resolved = cached_file(path, "processor_config.json", _raise_exceptions_for_missing_entries=False)
    if resolved:
        options = json.loads(Path(resolved).read_text())
    for key in ("image_processor", "processor_class", "tokenizer", "auto_map"):
        options.pop(key, None)
    image_processor = image_processor_cls.from_pretrained(path)
    return cls(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(path), **options)


def load_tiny_family(path: str | os.PathLike, **kwargs: Any) -> tuple[Any, Any]:
    """Any checkpoint written by :mod:`globalcom2.demo.tiny_model` or :mod:`globalcom2.demo.tiny_families`:
    ``(model in eval mode, processor)``; ``kwargs`` go to ``from_pretrained`` (e.g. ``attn_implementation``)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs).eval()
    fix_llama4_outputs(model)
    return model, load_processor(path)


def fix_llama4_outputs(model: Any) -> None:
    """Work around a transformers 5.24 defect on one ``Llama4ForConditionalGeneration`` instance: its ``forward``
    reads ``outputs.image_outputs`` off the language model's output, which has no such field, so every call with
    ``return_dict=True`` (``generate`` included) raises AttributeError, with or without GlobalCom². The instance's
    language model then hands its output on with ``image_outputs = None`` (what the field holds when no images were
    encoded). Nothing else changes; no class is modified; other models and fixed versions are left alone."""
    import functools
    import inspect

    if type(model).__name__ != "Llama4ForConditionalGeneration":
        return
    try:
        broken = "outputs.image_outputs" in inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        broken = False
    lm = model.language_model
    if not broken or "forward" in vars(lm):
        return
    original = lm.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if not isinstance(out, tuple) and not hasattr(out, "image_outputs"):
            object.__setattr__(out, "image_outputs", None)
        return out

    lm.forward = forward
