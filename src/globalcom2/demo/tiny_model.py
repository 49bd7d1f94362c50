"""Tiny, randomly initialised LLaVA-NeXT checkpoints built offline (real transformers classes, real files).

Used by the tests and by the demo's end-to-end run. Nothing is downloaded: the tokenizer is a fixed byte-level BPE
(built in code, not trained), the weights are random, and the checkpoint is written with ``save_pretrained`` so that
it is loaded back through the same ``from_pretrained`` path a real checkpoint takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .tiny_parts import (
    CLIP_MEAN,
    CLIP_STD,
    build_family_tokenizer,
    llm_config,
    save_random_checkpoint,
    standin_vision,
    tiny_vit_config,
)


def build_tokenizer(vocab_size: int = 320):
    """The fixed tiny byte-level BPE (no training), a ``PreTrainedTokenizerFast`` with ``<image>``."""
    return build_family_tokenizer({"image_token": "<image>"}, vocab_size)


def llava_next_config_and_processor(
    tokenizer: Any,
    vision_config: Any,
    text_config: Any,
    tile_size: int,
    patch_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
):
    """``(LlavaNextConfig, LlavaNextProcessor)`` around the given towers: five pinpoint canvases of
    ``tile_size`` tiles (1x2, 2x1, 2x2, 3x1, 1x3), a [CLS] tower read at layer -2 (strategy ``"default"``)."""
    from transformers import LlavaNextConfig, LlavaNextImageProcessorPil, LlavaNextProcessor

    pinpoints = [[tile_size * a, tile_size * b] for a, b in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
    config = LlavaNextConfig(  # type: ignore[call-arg]
        vision_config=vision_config, text_config=text_config, image_grid_pinpoints=pinpoints,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )  # fmt: skip
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile_size}, crop_size={"height": tile_size, "width": tile_size},
        image_grid_pinpoints=pinpoints, image_mean=list(mean), image_std=list(std),
    )  # fmt: skip
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    return config, processor


def build_tiny_llava_next(
    out_dir: str | Path,
    *,
    vision: str = "clip",
    tile_size: int = 64,
    patch_size: int = 8,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 2,
    seed: int = 0,
    vision_tower: Any = None,
) -> Path:
    """Write a tiny random LLaVA-NeXT checkpoint + processor to ``out_dir`` and return the path.

    Args:
        vision: ``"clip"`` (3-layer random CLIP, tile ``tile_size``, patch ``patch_size``) or ``"dinov2"``
            (the real DINOv2 ViT-S/14 stand-in at ``tile_size`` px, see :mod:`globalcom2.demo.encoder`).
        tile_size, patch_size: tile side in pixels and ViT patch size (CLIP only; DINOv2 uses 14).
        text_hidden, text_layers, text_heads: tiny Llama LLM (head_dim = text_hidden // text_heads).
        vision_tower: an already built DINOv2 tower to reuse (saves a conversion).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextForConditionalGeneration

    tokenizer = build_tokenizer()
    mean, std = CLIP_MEAN, CLIP_STD
    if vision == "clip":
        vision_config: Any = tiny_vit_config(CLIPVisionConfig, tile_size, patch_size, 3, projection_dim=32)
    elif vision == "dinov2":
        vision_tower, vision_config, patch_size, mean, std = standin_vision(tile_size, vision_tower)
    else:
        raise ValueError(f"`vision` must be 'clip' or 'dinov2', got {vision!r}")
    text = llm_config(LlamaConfig, tokenizer, text_hidden, text_layers, text_heads, max_positions=8192)
    config, processor = llava_next_config_and_processor(
        tokenizer, vision_config, text, tile_size, patch_size, mean, std
    )
    return save_random_checkpoint(
        out_dir, LlavaNextForConditionalGeneration, config, processor, seed=seed, vision_tower=vision_tower
    )


def load_tiny(path: str | Path, **kwargs: Any):
    """Load a checkpoint written by :func:`build_tiny_llava_next` (model in eval mode, processor)."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(path, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor
