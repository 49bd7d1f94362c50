"""Tiny, randomly initialised checkpoints of the further tiling families, built offline.

Same recipe as :mod:`globalcom2.demo.tiny_families` (real transformers classes, random weights, a fixed BPE
tokenizer built in code, ``save_pretrained`` then ``from_pretrained``):

* **Gemma 3** (``Gemma3ForConditionalGeneration`` + ``Gemma3Processor``): a random 2-layer SigLIP tower on 64 px
  images of 4 px patches (16 x 16 patches), the projector's 4 x 4 average pooling to 16 tokens per image (the
  released checkpoints: 896 px, 14 px patches, 64 x 64 patches pooled to 256), a tiny Gemma 3 LLM with its
  bidirectional image attention. Pan-and-scan is a call option (``do_pan_and_scan=True``, with
  ``pan_and_scan_min_crop_size=32`` at this scale); :data:`GEMMA3_PAN_AND_SCAN` holds the options the tests pass.
* **Aya Vision** (``AyaVisionForConditionalGeneration`` + ``AyaVisionProcessor``): a random SigLIP tower, InternVL's
  tiling, a 2 x 2 pixel shuffle, a tiny Cohere2 LLM.
* ``vision="dinov2"`` (both): the DINOv2 ViT-S/14 stand-in's weights in the stock ``SiglipVisionModel`` class
  (:func:`standin_siglip_vision_model`; [CLS] dropped, LayerScale folded, as for SmolVLM's stand-in): Gemma 3 at
  896 px (64 x 64 patches pooled to 256 tokens, the released geometry), Aya Vision at 364 px (26 x 26 patches,
  2 x 2 shuffle: 169 tokens per tile, Aya-Vision-8B's geometry).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .tiny_parts import build_family_tokenizer, llm_config, save_random_checkpoint, tiny_vit_config

GEMMA3_SPECIALS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}
#: The pan-and-scan call options of the tiny Gemma 3 (the processor's defaults are off and 256 px crops at least).
GEMMA3_PAN_AND_SCAN = {
    "do_pan_and_scan": True,
    "pan_and_scan_min_crop_size": 32,
    "pan_and_scan_max_num_crops": 4,
    "pan_and_scan_min_ratio_to_activate": 1.2,
}


def standin_siglip_vision_model(image_size: int) -> Any:
    """The DINOv2 stand-in's weights in a stock ``SiglipVisionModel`` (no head) at ``image_size`` px: the SigLIP-
    layout stand-in of :func:`~globalcom2.demo.tiny_idefics3.standin_idefics3_vision_model`, whose parameters are
    SigLIP's own names."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from .tiny_idefics3 import standin_idefics3_vision_model

    src = standin_idefics3_vision_model(image_size)
    c = src.config
    config = SiglipVisionConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, image_size=image_size, patch_size=c.patch_size,
        hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps, vision_use_head=False,
    )  # fmt: skip
    with torch.device("meta"):
        model = SiglipVisionModel(config)
    model.load_state_dict(src.state_dict(), strict=True, assign=True)
    model.set_attn_implementation("sdpa")
    return model.eval().requires_grad_(False)


def _vision(vision: str, tile_size: int, patch_size: int) -> tuple[Any, Any, list[float], list[float]]:
    """(tower to copy or None, vision config, image mean, image std) for ``vision`` = "random" or "dinov2"."""
    from transformers import SiglipVisionConfig

    if vision == "random":
        config = tiny_vit_config(SiglipVisionConfig, tile_size, patch_size, 2, vision_use_head=False)
        return None, config, [0.5] * 3, [0.5] * 3
    if vision == "dinov2":
        from .encoder import STANDIN_IMAGE_MEAN, STANDIN_IMAGE_STD

        tower = standin_siglip_vision_model(tile_size)
        return tower, tower.config, list(STANDIN_IMAGE_MEAN), list(STANDIN_IMAGE_STD)
    raise ValueError(f"`vision` must be 'random' or 'dinov2', got {vision!r}")


def build_tiny_gemma3(
    out_dir: str | Path,
    *,
    vision: str = "random",
    tile_size: int = 64,
    patch_size: int = 4,
    tokens_per_image: int = 16,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 2,
    sliding_window: int = 64,
    layer_types: tuple[str, ...] | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny random Gemma 3 checkpoint + processor to ``out_dir`` and return the path.

    Args:
        vision: ``"random"`` (2-layer SigLIP) or ``"dinov2"`` (the stand-in; ``tile_size`` 896, patch 14).
        tile_size, patch_size: image side and SigLIP patch in pixels (the tower's grid is their quotient).
        tokens_per_image: ``mm_tokens_per_image``, a square whose side divides the patch grid (the pooling).
        text_hidden, text_layers, text_heads: tiny Gemma 3 LLM (head_dim 32).
        sliding_window, layer_types: its local layers' window and the kind of every layer (default Gemma 3's:
            five ``"sliding_attention"`` layers, then one ``"full_attention"``).
    """
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
    )

    tokenizer = build_family_tokenizer(GEMMA3_SPECIALS)
    tower, vision_config, mean, std = _vision(vision, tile_size, patch_size)
    text_config = llm_config(
        Gemma3TextConfig, tokenizer, text_hidden, text_layers, text_heads, max_positions=16384, head_dim=32,
        sliding_window=sliding_window, layer_types=None if layer_types is None else list(layer_types),
    )  # fmt: skip
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in GEMMA3_SPECIALS.items()}
    config = Gemma3Config(
        vision_config=vision_config, text_config=text_config, mm_tokens_per_image=tokens_per_image,
        boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"], image_token_index=ids["image_token"],
    )  # fmt: skip
    image_processor = Gemma3ImageProcessorPil(
        size={"height": tile_size, "width": tile_size}, image_mean=mean, image_std=std
    )
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=tokens_per_image
    )
    return save_random_checkpoint(
        out_dir, Gemma3ForConditionalGeneration, config, processor, seed=seed, vision_tower=tower
    )


def _cohere2_parts(
    specials: dict[str, str],
    vision: str,
    tile_size: int,
    patch_size: int,
    hidden: int,
    layers: int,
    heads: int,
) -> tuple[Any, Any, Any, list[float], list[float], Any]:
    """What the Aya Vision and Cohere2 Vision builders share: ``(tokenizer, tower or None, vision config, image mean,
    image std, tiny Cohere2 LLM config)`` (sliding-window layers of 64, as the released LLMs interleave them)."""
    from transformers import Cohere2Config

    tokenizer = build_family_tokenizer(specials)
    tower, vision_config, mean, std = _vision(vision, tile_size, patch_size)
    text_config = llm_config(
        Cohere2Config, tokenizer, hidden, layers, heads, max_positions=16384, sliding_window=64
    )
    return tokenizer, tower, vision_config, mean, std, text_config


#: Aya Vision's special tokens (the tile markers ``TILE_k`` / ``TILE_GLOBAL`` are plain text, as in the released
#: tokenizer's prompts).
AYA_SPECIALS = {
    "image_token": "<image>",
    "start_of_img_token": "<|START_OF_IMG|>",
    "end_of_img_token": "<|END_OF_IMG|>",
    "img_patch_token": "<|IMG_PATCH|>",
    "img_line_break_token": "<|IMG_LINE_BREAK|>",
}


def build_tiny_aya_vision(
    out_dir: str | Path,
    *,
    vision: str = "random",
    tile_size: int = 64,
    patch_size: int = 8,
    downsample_factor: int = 2,
    max_patches: int = 6,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Write a tiny random Aya Vision checkpoint + processor to ``out_dir`` and return the path.

    A random 2-layer SigLIP tower (no [CLS], strategy ``"full"``) on ``tile_size`` px tiles, Aya's pixel shuffle
    by ``downsample_factor`` (16 tokens per tile here; Aya-Vision-8B: 364 px / 14 px patches, 2 x 2: 169), InternVL's
    tiling (``GotOcr2ImageProcessorPil``: up to ``max_patches`` crops plus the thumbnail last), a tiny Cohere2 LLM.
    ``vision="dinov2"``: the stand-in tower (``tile_size`` 364, patch 14).
    """
    from transformers import (
        AyaVisionConfig,
        AyaVisionForConditionalGeneration,
        AyaVisionProcessor,
        GotOcr2ImageProcessorPil,
    )

    tokenizer, tower, vision_config, mean, std, text_config = _cohere2_parts(
        AYA_SPECIALS, vision, tile_size, patch_size, text_hidden, text_layers, text_heads
    )
    config = AyaVisionConfig(
        vision_config=vision_config, text_config=text_config, downsample_factor=downsample_factor,
        image_token_index=tokenizer.convert_tokens_to_ids("<|IMG_PATCH|>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=False,
    )  # fmt: skip
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": tile_size, "width": tile_size}, crop_to_patches=True, min_patches=1,
        max_patches=max_patches, image_mean=mean, image_std=std,
    )  # fmt: skip
    processor = AyaVisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        downsample_factor=downsample_factor, img_size=tile_size,
    )  # fmt: skip
    return save_random_checkpoint(
        out_dir, AyaVisionForConditionalGeneration, config, processor, seed=seed, vision_tower=tower
    )


#: Llama 4's special tokens (``<|image|>`` is what prompts hold; the processor writes the rest).
LLAMA4_SPECIALS = {
    "image_token": "<|image|>",
    "start_of_image_token": "<|image_start|>",
    "end_of_image_token": "<|image_end|>",
    "patch_token": "<|patch|>",
    "tile_x_separator_token": "<|tile_x_separator|>",
    "tile_y_separator_token": "<|tile_y_separator|>",
}


def build_tiny_llama4(
    out_dir: str | Path,
    *,
    tile_size: int = 64,
    patch_size: int = 8,
    max_patches: int = 6,
    vision_layers: int = 2,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 2,
    seed: int = 0,
    **text_options: Any,
) -> Path:
    """Write a tiny random Llama 4 checkpoint + processor to ``out_dir`` and return the path.

    A random ``Llama4VisionModel`` (width 32, 4 heads, its class embedding appended last, 2-D RoPE) on ``tile_size``
    px tiles of ``patch_size`` px patches, pixel shuffle 0.5 (16 tokens per tile here; Llama-4-Scout: 336 px / 14 px
    patches: 144), up to ``max_patches`` tiles plus the global tile, a tiny Llama 4 text model (one MoE layer of 2
    experts). The image processor is :func:`~globalcom2.processors.llama4_image_processor_pil_class` (the stock one
    needs torchvision). ``text_options`` go to ``Llama4TextConfig`` (e.g. ``attention_chunk_size``,
    ``no_rope_layer_interval``, ``floor_scale``): by Llama 4's rule every ``no_rope_layer_interval``-th text layer (4th)
    is a NoPE layer with full attention and a query temperature, the others rotate q and k and attend within chunks of
    ``attention_chunk_size`` tokens (8192); the default 2 layers are both chunked layers whose chunk spans every prompt
    of the tests.
    """
    from transformers import (
        Llama4Config,
        Llama4ForConditionalGeneration,
        Llama4Processor,
        Llama4TextConfig,
        Llama4VisionConfig,
    )

    from ..processors import llama4_image_processor_pil_class

    tokenizer = build_family_tokenizer(LLAMA4_SPECIALS)
    vision_config = Llama4VisionConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=vision_layers, num_attention_heads=4,
        image_size=tile_size, patch_size=patch_size, vision_output_dim=64, projector_input_dim=64,
        projector_output_dim=64, pixel_shuffle_ratio=0.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    text_config = llm_config(
        Llama4TextConfig, tokenizer, text_hidden, text_layers, text_heads, max_positions=16384, head_dim=32,
        intermediate_size_mlp=2 * text_hidden, num_local_experts=2, interleave_moe_layer_step=2,
        **text_options,
    )  # fmt: skip
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in LLAMA4_SPECIALS.items()}
    config = Llama4Config(
        vision_config=vision_config, text_config=text_config, image_token_index=ids["patch_token"],
        boi_token_index=ids["start_of_image_token"], eoi_token_index=ids["end_of_image_token"],
        tie_word_embeddings=False,
    )  # fmt: skip
    image_processor = llama4_image_processor_pil_class()(
        size={"height": tile_size, "width": tile_size}, max_patches=max_patches
    )
    specials: dict[str, Any] = dict(LLAMA4_SPECIALS)
    processor = Llama4Processor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size, **specials
    )
    return save_random_checkpoint(out_dir, Llama4ForConditionalGeneration, config, processor, seed=seed)


#: Cohere2 Vision's special tokens (read by its processor from the tokenizer).
COHERE2_SPECIALS = {
    "image_token": "<|IMG_PATCH|>",
    "boi_token": "<|START_OF_IMG|>",
    "eoi_token": "<|END_OF_IMG|>",
    "img_line_break_token": "<|IMG_LINE_BREAK|>",
}


def build_tiny_cohere2_vision(
    out_dir: str | Path,
    *,
    vision: str = "random",
    tile_size: int = 64,
    patch_size: int = 8,
    downsample_factor: int = 2,
    max_patches: int = 6,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Write a tiny random Cohere2 Vision checkpoint + processor to ``out_dir`` and return the path.

    A random 2-layer SigLIP tower on ``tile_size`` px tiles, the projector's pixel shuffle by ``downsample_factor``
    (16 tokens per tile here; Command-A-Vision: 512 px / 16 px patches, 2 x 2: 256), Cohere2 Vision's own tile grid
    (up to ``max_patches`` tiles plus the thumbnail last; :func:`~globalcom2.processors.cohere2_vision_image_processor_pil_class`,
    the stock image processor needing torchvision), a tiny Cohere2 LLM. ``vision="dinov2"``: the stand-in tower
    (``tile_size`` 448, patch 14: 32 x 32 patches, Command-A-Vision's grid).
    """
    from transformers import (
        Cohere2VisionConfig,
        Cohere2VisionForConditionalGeneration,
        Cohere2VisionProcessor,
    )

    from ..processors import cohere2_vision_image_processor_pil_class

    tokenizer, tower, vision_config, mean, std, text_config = _cohere2_parts(
        COHERE2_SPECIALS, vision, tile_size, patch_size, text_hidden, text_layers, text_heads
    )
    config = Cohere2VisionConfig(
        vision_config=vision_config, text_config=text_config, downsample_factor=downsample_factor,
        image_token_id=tokenizer.convert_tokens_to_ids(COHERE2_SPECIALS["image_token"]),
        alignment_intermediate_size=128, tie_word_embeddings=False,
    )  # fmt: skip
    tokens_per_side = tile_size // patch_size // downsample_factor
    image_processor = cohere2_vision_image_processor_pil_class()(
        size={"height": tile_size, "width": tile_size}, max_patches=max_patches, patch_size=tokens_per_side,
        image_mean=mean, image_std=std,
    )  # fmt: skip
    processor = Cohere2VisionProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return save_random_checkpoint(
        out_dir, Cohere2VisionForConditionalGeneration, config, processor, seed=seed, vision_tower=tower
    )
