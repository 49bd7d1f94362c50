"""globalcom2.loading: one loader for every command, and no transformers class changed by it, ever.

The class check compares ``vars()`` of ``ProcessorMixin`` and of every processor, image-processor and model class
involved before and after building and loading each tiny family, and also *while* they load: a trace function
compares them on every call into transformers' processing code, so a patch that is undone afterwards (as a
context manager would) is caught too.
"""

from __future__ import annotations

import pickle
import sys

import pytest

from globalcom2 import processors
from globalcom2.loading import ModelLoadError, load_model_and_processor, load_processor
from tests.conftest import random_image

_CLASS_NAMES = (
    "LlavaNextProcessor", "LlavaOnevisionProcessor", "InternVLProcessor",
    "LlavaNextImageProcessorPil", "LlavaOnevisionImageProcessorPil", "GotOcr2ImageProcessorPil",
    "LlavaNextImageProcessor", "LlavaOnevisionImageProcessor", "GotOcr2ImageProcessor",
    "LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration", "InternVLForConditionalGeneration",
    "LlavaNextModel", "LlavaOnevisionModel", "InternVLModel", "PreTrainedTokenizerFast",
    "AutoProcessor", "AutoImageProcessor", "AutoModelForImageTextToText",
)  # fmt: skip


def _is_cache(name: str) -> bool:
    """Class attributes Python and transformers add as memos on first use: ``copyreg``'s ``__slotnames__`` (any
    deepcopy or pickle) and ``PreTrainedModel``'s ``_can_set_*_cached_value``. Never a replaced method."""
    return name == "__slotnames__" or (name.startswith("_can_set_") and name.endswith("_cached_value"))


def _classes() -> list[type]:
    import transformers
    from transformers.processing_utils import ProcessorMixin

    found = [ProcessorMixin]
    for name in _CLASS_NAMES:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return found


def _snapshot(classes: list[type]) -> dict[type, dict[str, object]]:
    return {cls: dict(vars(cls)) for cls in classes}


def _changes(before: dict[type, dict[str, object]]) -> list[str]:
    out = []
    for cls, old in before.items():
        new = vars(cls)
        for key in sorted(set(old) | set(new)):
            if key not in new:
                out.append(f"{cls.__name__}.{key} removed")
            elif key not in old:
                if not _is_cache(key):
                    out.append(f"{cls.__name__}.{key} added: {new[key]!r}")
            elif new[key] is not old[key]:
                out.append(f"{cls.__name__}.{key} replaced: {old[key]!r} -> {new[key]!r}")
    return out


class _Watch:
    """Compare the classes with ``before`` on every call into transformers' processor / image-processor code."""

    def __init__(self, before: dict[type, dict[str, object]]) -> None:
        self.before, self.calls, self.seen = before, 0, []

    def __call__(self, frame, event, arg):
        if event == "call":
            filename = frame.f_code.co_filename
            if "transformers" in filename and ("processing" in filename or "image_processing" in filename):
                self.calls += 1
                changes = _changes(self.before)
                if changes and not self.seen:
                    self.seen = [f"during {frame.f_code.co_name} ({filename}): {c}" for c in changes]
        return None  # no line tracing

    def __enter__(self) -> _Watch:
        self.previous = sys.gettrace()
        sys.settrace(self)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self.previous)


def _build_all(tmp_path):
    from globalcom2.demo.tiny_families import build_tiny_internvl, build_tiny_llava_onevision
    from globalcom2.demo.tiny_model import build_tiny_llava_next

    return {
        "llava_next": build_tiny_llava_next(tmp_path / "next", text_layers=1),
        "llava_onevision": build_tiny_llava_onevision(tmp_path / "ov", text_layers=1),
        "internvl": build_tiny_internvl(tmp_path / "iv", text_layers=1),
    }


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    return _build_all(tmp_path_factory.mktemp("families"))


def test_building_and_loading_changes_no_transformers_class(tmp_path):
    classes = _classes()
    before = _snapshot(classes)
    with _Watch(before) as watch:
        paths = _build_all(tmp_path)
        loaded = {family: load_model_and_processor(path) for family, path in paths.items()}
    assert watch.calls > 0, "the watch never saw transformers' processing code run"
    assert not watch.seen, "\n".join(watch.seen)
    assert not _changes(before), "\n".join(_changes(before))
    for family, (model, processor) in loaded.items():
        assert not model.training, family
        stock = {"llava_next": "LlavaNextProcessor", "llava_onevision": "LlavaOnevisionProcessor",
                 "internvl": "InternVLProcessor"}[family]  # fmt: skip
        import transformers

        assert isinstance(processor, getattr(transformers, stock)), family
        assert type(processor).__name__ == stock  # what save_pretrained writes as processor_class


def test_the_watch_catches_a_temporary_patch(family_dirs):
    """The check above would have caught the old ``processor_without_video`` (a patch undone afterwards)."""
    from transformers.processing_utils import ProcessorMixin

    before = _snapshot(_classes())
    original = ProcessorMixin.__dict__["check_argument_for_proper_class"]
    with _Watch(before) as watch:
        ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None  # type: ignore[method-assign]
        try:
            load_processor(family_dirs["internvl"])
        finally:
            ProcessorMixin.check_argument_for_proper_class = original  # type: ignore[method-assign]
    assert any("check_argument_for_proper_class replaced" in s for s in watch.seen), watch.seen
    assert not _changes(before)


@pytest.mark.parametrize("family, cls_name", [("llava_onevision", "LlavaOnevisionProcessor"),
                                              ("internvl", "InternVLProcessor")])  # fmt: skip
def test_processor_without_video_is_the_stock_class_less_its_video_processor(
    family_dirs, tmp_path, family, cls_name
):
    import transformers

    stock_cls = getattr(transformers, cls_name)
    a, b = load_processor(family_dirs[family]), load_processor(family_dirs[family])
    sub = processors.processor_class_without_video(stock_cls)
    assert type(a) is type(b) is sub  # one subclass per class, however often it loads
    assert sub.__bases__ == (stock_cls,) and sub.__module__ == "globalcom2.processors"
    assert getattr(processors, cls_name) is sub  # found by name: pickle works
    assert a.video_processor is None and "video_processor" not in sub.get_attributes()
    assert "video_processor" in stock_cls.get_attributes()  # the stock class is untouched
    assert processors.processor_class_without_video(sub) is sub

    # images: the same output as the stock class's own code on the same state
    stock = object.__new__(stock_cls)
    stock.__dict__.update(a.__dict__)
    image = random_image(90, 150, seed=1)
    prompt = f"USER: {a.image_token}\nWhat is shown? ASSISTANT:"
    ours = a(images=[image], text=[prompt], return_tensors="pt")
    theirs = stock(images=[image], text=[prompt], return_tensors="pt")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert (ours[key] == theirs[key]).all(), key

    # save_pretrained writes the stock class's name; load_processor reads it back as the same subclass
    a.save_pretrained(tmp_path / "saved")
    assert f'"processor_class": "{cls_name}"' in (tmp_path / "saved" / "processor_config.json").read_text()
    again = load_processor(tmp_path / "saved")
    assert type(again) is sub and again.to_dict() == a.to_dict()

    clone = pickle.loads(pickle.dumps(a))
    assert type(clone) is sub and clone.to_dict() == a.to_dict()


def test_classes_without_a_video_processor_are_returned_as_they_are():
    from transformers import LlavaNextProcessor

    assert processors.processor_class_without_video(LlavaNextProcessor) is LlavaNextProcessor
    with pytest.raises(TypeError, match="processor class"):
        processors.processor_class_without_video(int)
    with pytest.raises(AttributeError):
        processors.LlavaNextProcessor  # noqa: B018 (nothing to leave out, so no such subclass)


def test_missing_checkpoint_is_a_clear_error_naming_it(tmp_path):
    missing = tmp_path / "no" / "such" / "checkpoint"
    with pytest.raises(ModelLoadError, match="cannot load model") as info:
        load_model_and_processor(str(missing))
    assert str(missing) in str(info.value) and len(str(info.value).splitlines()) == 1
    with pytest.raises(ModelLoadError, match="cannot load model 'nobody-here/no-such-model'"):
        load_model_and_processor("nobody-here/no-such-model")  # a hub id, offline: not cached
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model_and_processor(str(a_file))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=str(empty)):
        load_model_and_processor(str(empty))
    assert issubclass(ModelLoadError, ValueError)


def test_dtype_device_and_family_are_checked_before_loading(family_dirs):
    import torch

    model, _ = load_model_and_processor(family_dirs["llava_next"], dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model_and_processor(family_dirs["llava_next"], dtype="float8")
    with pytest.raises(ValueError, match="family must be one of"):
        load_model_and_processor("standin", family="qwen")
    with pytest.raises(ValueError, match="not a device"):
        load_model_and_processor(family_dirs["llava_next"], device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model_and_processor(family_dirs["llava_next"], device="cuda")
