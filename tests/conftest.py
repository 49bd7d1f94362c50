"""Shared fixtures: tiny random LLaVA-NeXT checkpoints written to disk and loaded back offline."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    from globalcom2.demo.tiny_model import build_tiny_llava_next

    return build_tiny_llava_next(tmp_path_factory.mktemp("tiny_llava_next_clip"))


@pytest.fixture()
def tiny(tiny_clip_dir):
    """A fresh (model, processor) pair loaded with from_pretrained from the tiny checkpoint."""
    from globalcom2.demo.tiny_model import load_tiny

    return load_tiny(tiny_clip_dir)


def random_image(height: int, width: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    # Smooth random blobs rather than white noise, so scores have spatial structure.
    small = rng.integers(0, 255, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
