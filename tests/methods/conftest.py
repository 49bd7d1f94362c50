"""A tiny LLaVA-NeXT with a 4-layer LLM (FastV needs layers on both sides of K = 2)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny4_dir(tmp_path_factory):
    from globalcom2.demo.tiny_model import build_tiny_llava_next

    return build_tiny_llava_next(tmp_path_factory.mktemp("tiny_llava_next_4layers"), text_layers=4, seed=1)


@pytest.fixture()
def tiny4(tiny4_dir):
    from globalcom2.demo.tiny_model import load_tiny

    return load_tiny(tiny4_dir)


@pytest.fixture()
def tiny4_eager(tiny4_dir):
    from globalcom2.demo.tiny_model import load_tiny

    return load_tiny(tiny4_dir, attn_implementation="eager")
