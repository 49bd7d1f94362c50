"""Real photographs that ship inside PyPI packages (scikit-image, scikit-learn, matplotlib): no download."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image

from ..extras import optional_imports


def _skimage(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        with optional_imports("the shipped photos"):
            import skimage.data

        return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")

    return load


def _sklearn(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        with optional_imports("the shipped photos"):
            from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(name)).convert("RGB")

    return load


def _grace_hopper() -> Image.Image:
    with optional_imports("the shipped photos"):
        import matplotlib.cbook

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(path) as im:
        return im.convert("RGB")


PHOTOS: dict[str, tuple[Callable[[], Image.Image], str]] = {
    "astronaut": (_skimage("astronaut"), "scikit-image: astronaut Eileen Collins"),
    "coffee": (_skimage("coffee"), "scikit-image: a cup of coffee"),
    "chelsea": (_skimage("chelsea"), "scikit-image: Chelsea the cat"),
    "rocket": (_skimage("rocket"), "scikit-image: a rocket on its launch tower"),
    "hubble": (_skimage("hubble_deep_field"), "scikit-image: Hubble deep field"),
    "china": (_sklearn("china.jpg"), "scikit-learn: a temple in China"),
    "flower": (_sklearn("flower.jpg"), "scikit-learn: a flower"),
    "grace_hopper": (_grace_hopper, "matplotlib: Grace Hopper"),
}

DEFAULT_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "china", "grace_hopper")


def load_photo(name: str) -> Image.Image:
    """Load one shipped photo by name (see :data:`PHOTOS`)."""
    try:
        loader, _ = PHOTOS[name]
    except KeyError:
        raise ValueError(f"unknown photo {name!r}; available: {', '.join(PHOTOS)}") from None
    return loader()
