"""Tiny, randomly initialised Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 checkpoints built offline.

Same recipe as :mod:`globalcom2.demo.tiny_families` (real transformers classes, random weights, the fixed BPE
tokenizer of :mod:`globalcom2.demo.tiny_parts`, ``save_pretrained`` then ``from_pretrained``), in the geometry of
the native-resolution families: a 2-layer random vision tower of the family's own class (Qwen2.5-VL's with window
attention and a full-attention block, Qwen3-VL's with one deepstack layer), 4-px patches merged 2 x 2 (one LLM token
per 8 x 8 px), ``Qwen2VLImageProcessorPil`` resizing every image to a multiple of 8 px between 32 x 32 and
256 x 256 px worth of pixels, and a tiny LLM of the family (M-RoPE sections sized to its head dimension; Qwen3.5's
hybrid attention: 3 layers, full, linear (Gated DeltaNet), full).

No stand-in tower: the DINOv2 stand-in used by the other families is a plain ViT with a [CLS] token, not a Qwen
tower (no 2-D rotary positions, no 2 x 2 merger): ``--model standin --family qwen2_5_vl`` (and the other three) is
this random tower in 14 px patches (:func:`~globalcom2.demo.tiny_families.build_standin_checkpoint`).

The processors need no torchvision: they are built without their video processor
(:func:`globalcom2.processors.build_processor_without_video`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..processors import build_processor_without_video
from .tiny_parts import CLIP_MEAN, CLIP_STD, build_family_tokenizer, llm_config, save_random_checkpoint

#: family name -> (model class, processor class, config class, text config class)
QWEN_CLASSES = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2VLConfig", "Qwen2VLTextConfig"),
    "qwen2_5_vl": (
        "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2_5_VLConfig", "Qwen2_5_VLTextConfig",
    ),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLConfig", "Qwen3VLTextConfig"),
    "qwen3_5": ("Qwen3_5ForConditionalGeneration", "Qwen3VLProcessor", "Qwen3_5Config", "Qwen3_5TextConfig"),
}  # fmt: skip

QWEN_SPECIALS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}

#: tiny geometry: 4-px patches, 2 x 2 merge -> one LLM token per 8 x 8 px
TINY_PATCH = 4
TINY_MERGE = 2


def _vision_config(family: str, patch: int, out_hidden: int, deepstack_layers: int = 1) -> dict[str, Any]:
    common = dict(
        depth=2, num_heads=2, patch_size=patch, spatial_merge_size=TINY_MERGE, temporal_patch_size=2,
        in_channels=3,
    )  # fmt: skip
    if family == "qwen2_vl":
        return dict(common, embed_dim=32, mlp_ratio=2, hidden_size=out_hidden)
    if family == "qwen2_5_vl":
        # window of 4 merged tokens (32 px): images larger than that use window attention in block 0
        return dict(
            common, hidden_size=32, intermediate_size=64, out_hidden_size=out_hidden,
            window_size=4 * patch * TINY_MERGE, fullatt_block_indexes=[1],
        )  # fmt: skip
    # Qwen3-VL: the tower's first blocks feed the LLM's first `deepstack_layers` layers
    extra = {"deepstack_visual_indexes": list(range(deepstack_layers))} if family == "qwen3_vl" else {}
    return dict(
        common, hidden_size=32, intermediate_size=64, out_hidden_size=out_hidden, num_position_embeddings=64,
        **extra,
    )  # fmt: skip


def build_tiny_qwen(
    out_dir: str | Path,
    family: str = "qwen2_vl",
    *,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 2,
    max_side_tokens: int = 32,
    patch_size: int = TINY_PATCH,
    deepstack_layers: int = 1,
    seed: int = 0,
) -> Path:
    """Write a tiny random checkpoint + processor of one native-resolution family to ``out_dir``; return the path.

    Args:
        family: ``"qwen2_vl"``, ``"qwen2_5_vl"``, ``"qwen3_vl"`` or ``"qwen3_5"`` (:data:`QWEN_CLASSES`).
        text_hidden, text_layers, text_heads: the tiny LLM (head dimension ``text_hidden // text_heads``).
        max_side_tokens: the processor's ``max_pixels`` is ``(max_side_tokens * 2 * patch_size)**2``.
        patch_size: vision patch in pixels (4 keeps tests cheap; 14 or 16 gives a real checkpoint's geometry).
        deepstack_layers: Qwen3-VL: LLM layers that receive deepstack features (at most the tower's 2 blocks).
    """
    import transformers

    if family not in QWEN_CLASSES:
        raise ValueError(f"`family` must be one of {tuple(QWEN_CLASSES)}, got {family!r}")
    model_name, processor_name, config_name, text_name = QWEN_CLASSES[family]
    tokenizer = build_family_tokenizer(QWEN_SPECIALS)
    head_dim = text_hidden // text_heads
    text_extra: dict[str, Any] = {"tie_word_embeddings": False}
    if family == "qwen3_5":
        rotary = head_dim // 4  # partial_rotary_factor 0.25
        text_extra.update(
            head_dim=head_dim,
            layer_types=["full_attention" if j % 2 == 0 else "linear_attention" for j in range(text_layers)],
            linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                             "mrope_section": [rotary // 2 - 2 * (rotary // 8), rotary // 8, rotary // 8],
                             "mrope_interleaved": True},
        )  # fmt: skip
    else:
        half = head_dim // 2
        section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
        if family == "qwen3_vl":
            rope["mrope_interleaved"] = True
            text_extra["head_dim"] = head_dim
        text_extra["rope_parameters"] = rope
    text_config = llm_config(
        getattr(transformers, text_name), tokenizer, text_hidden, text_layers, text_heads, max_positions=16384,
        **text_extra,
    )  # fmt: skip
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in QWEN_SPECIALS.items()}
    config = getattr(transformers, config_name)(
        vision_config=_vision_config(family, patch_size, text_hidden, deepstack_layers), text_config=text_config.to_dict(),
        image_token_id=ids["image_token"], video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"], vision_end_token_id=ids["vision_end_token"],
        tie_word_embeddings=False,
    )  # fmt: skip
    factor = patch_size * TINY_MERGE
    image_processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=TINY_MERGE, temporal_patch_size=2, image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        size={"shortest_edge": (4 * factor) ** 2, "longest_edge": (max_side_tokens * factor) ** 2},
    )  # fmt: skip
    processor = build_processor_without_video(
        getattr(transformers, processor_name), image_processor=image_processor, tokenizer=tokenizer
    )
    model_cls = getattr(transformers, model_name)
    return save_random_checkpoint(out_dir, model_cls, config, processor, seed=seed)


def build_tiny_qwen2_vl(out_dir: str | Path, **kwargs: Any) -> Path:
    """:func:`build_tiny_qwen` for ``Qwen2VLForConditionalGeneration``."""
    return build_tiny_qwen(out_dir, "qwen2_vl", **kwargs)


def build_tiny_qwen2_5_vl(out_dir: str | Path, **kwargs: Any) -> Path:
    """:func:`build_tiny_qwen` for ``Qwen2_5_VLForConditionalGeneration``."""
    return build_tiny_qwen(out_dir, "qwen2_5_vl", **kwargs)


def build_tiny_qwen3_vl(out_dir: str | Path, **kwargs: Any) -> Path:
    """:func:`build_tiny_qwen` for ``Qwen3VLForConditionalGeneration`` (one deepstack layer)."""
    return build_tiny_qwen(out_dir, "qwen3_vl", **kwargs)


def build_tiny_qwen3_5(out_dir: str | Path, **kwargs: Any) -> Path:
    """:func:`build_tiny_qwen` for ``Qwen3_5ForConditionalGeneration``: a hybrid LLM of 3 layers (full attention,
    linear attention, full attention), so the LLM-side methods of the family table score in full-attention layers
    and prune across a Gated DeltaNet layer."""
    return build_tiny_qwen(out_dir, "qwen3_5", **{"text_layers": 3, **kwargs})


def main(argv: list[str] | None = None) -> int:
    """``python -m globalcom2.demo.tiny_qwen OUT_DIR [--family F] [--patch-size P] [--max-side-tokens N]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random Qwen-family checkpoint (offline).")
    parser.add_argument("out_dir")
    parser.add_argument("--family", choices=tuple(QWEN_CLASSES), default="qwen2_5_vl")
    parser.add_argument("--patch-size", type=int, default=TINY_PATCH)
    parser.add_argument("--max-side-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    path = build_tiny_qwen(
        args.out_dir, args.family, patch_size=args.patch_size, max_side_tokens=args.max_side_tokens
    )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
