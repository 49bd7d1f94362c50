"""Tiny, randomly initialised Idefics3 and SmolVLM checkpoints built offline, and their DINOv2 stand-in variant.

Same recipe as :mod:`globalcom2.demo.tiny_families` (real transformers classes, random weights, a fixed BPE
tokenizer built in code, ``save_pretrained`` then ``from_pretrained``):

* **Idefics3** (``Idefics3ForConditionalGeneration`` + ``Idefics3Processor``): a random SigLIP-style tower
  (``Idefics3VisionTransformer``, no [CLS]), 64 px crops of 8 px patches, 2 x 2 pixel shuffle (16 tokens per crop),
  images split into up to 3 x 3 crops plus the global image last, a tiny Llama.
* **SmolVLM** (``SmolVLMForConditionalGeneration`` + ``SmolVLMProcessor``): the same with a 4 x 4 pixel shuffle
  (64 px crops of 4 px patches: 16 x 16 patches, 16 tokens per crop), as SmolVLM-256M/500M shuffle 4 x 4.
  ``SmolVLMProcessor`` needs ``num2words`` (the ``demo`` extra) and, in transformers 5.19-5.24, a video processor
  (torchvision): it is built without one (:func:`globalcom2.processors.build_processor_without_video`).
* ``vision="dinov2"``: the DINOv2 ViT-S/14 stand-in's weights in the stock ``Idefics3VisionTransformer`` class
  (:func:`standin_idefics3_vision_model`) at 378 px with a 3 x 3 shuffle: the geometry of SmolVLM(-Instruct, 2B)'s 384 px crops
  (27 x 27 patches of 14 px, 81 tokens per crop, up to 4 x 4 crops).

The tokenizer holds Idefics3's markers as single special tokens (``<fake_token_around_image>``, ``<global-img>``,
``<row_r_col_c>`` for r, c <= 6, ``<image>``, ``<end_of_utterance>``), as the released tokenizers do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..extras import optional_imports
from .tiny_parts import build_family_tokenizer, llm_config, save_random_checkpoint, tiny_vit_config

#: The special tokens of Idefics3 / SmolVLM tokenizers (attribute name -> token), markers included.
IDEFICS3_SPECIALS: dict[str, str] = {
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
    **{f"row_{r}_col_{c}_token": f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)},
}
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]


def standin_idefics3_vision_model(image_size: int = 378, dinov2: Any = None, *, model_class: Any = None):
    """The DINOv2 ViT-S/14 stand-in's weights in a stock ``Idefics3VisionTransformer`` (SigLIP layout) at
    ``image_size``.

    Both are pre-norm ViTs with learned absolute positions, qkv bias, LayerNorm eps 1e-6 and a final LayerNorm.
    DINOv2's LayerScale is folded into the output projections (``diag(lambda) W``, ``lambda * b``), its
    position table (already resized to the grid of ``image_size``) loses the [CLS] row, and its [CLS] token is
    dropped: SigLIP has none, so the tokens are DINOv2's layers applied to the patches alone (checked in the
    tests), not DINOv2's own features.
    """
    import torch
    from transformers import Idefics3VisionConfig, Idefics3VisionTransformer

    from .encoder import load_standin_vision_tower

    src = dinov2 if dinov2 is not None else load_standin_vision_tower(image_size)
    dc = src.config
    config = Idefics3VisionConfig(
        hidden_size=dc.hidden_size, intermediate_size=int(dc.hidden_size * dc.mlp_ratio),
        num_hidden_layers=dc.num_hidden_layers, num_attention_heads=dc.num_attention_heads,
        image_size=image_size, patch_size=dc.patch_size, hidden_act="gelu", layer_norm_eps=dc.layer_norm_eps,
    )  # fmt: skip
    s = src.state_dict()
    state = {
        "embeddings.patch_embedding.weight": s["embeddings.patch_embeddings.projection.weight"],
        "embeddings.patch_embedding.bias": s["embeddings.patch_embeddings.projection.bias"],
        "embeddings.position_embedding.weight": s["embeddings.position_embeddings"][0, 1:],
        "post_layernorm.weight": s["layernorm.weight"],
        "post_layernorm.bias": s["layernorm.bias"],
    }
    names = {
        "layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.q_proj": "attention.q_proj",
        "self_attn.k_proj": "attention.k_proj", "self_attn.v_proj": "attention.v_proj", "mlp.fc1": "mlp.fc1",
    }  # fmt: skip
    for i in range(dc.num_hidden_layers):
        old, new = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        for dst, src_name in names.items():
            for p in ("weight", "bias"):
                state[f"{new}{dst}.{p}"] = s[f"{old}{src_name}.{p}"]
        for dst, src_name, scale in (
            ("self_attn.out_proj", "attention.o_proj", "layer_scale1"),
            ("mlp.fc2", "mlp.fc2", "layer_scale2"),
        ):
            lam = s[f"{old}{scale}.lambda1"]
            state[f"{new}{dst}.weight"] = lam[:, None] * s[f"{old}{src_name}.weight"]
            state[f"{new}{dst}.bias"] = lam * s[f"{old}{src_name}.bias"]
    with torch.device("meta"):
        model = (model_class or Idefics3VisionTransformer)(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.set_attn_implementation("sdpa")
    return model.eval().requires_grad_(False)


def build_tiny_idefics3(
    out_dir: str | Path,
    *,
    smolvlm: bool = False,
    vision: str = "random",
    tile_size: int = 64,
    patch_size: int | None = None,
    scale_factor: int | None = None,
    max_crops_per_side: int = 3,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 2,
    seed: int = 0,
    vision_tower: Any = None,
) -> Path:
    """Write a tiny random Idefics3 (or SmolVLM) checkpoint + processor to ``out_dir`` and return the path.

    Args:
        smolvlm: build ``SmolVLMForConditionalGeneration`` + ``SmolVLMProcessor`` instead of Idefics3's.
        vision: ``"random"`` (2-layer random tower) or ``"dinov2"`` (the DINOv2 stand-in at ``tile_size`` px).
        tile_size: crop (and global image) side in pixels, the processor's ``max_image_size``.
        patch_size: ViT patch (default 8 for Idefics3, 4 for SmolVLM; 14 for the stand-in).
        scale_factor: pixel-shuffle factor (default 2 for Idefics3, 4 for SmolVLM; 3 for the stand-in).
        max_crops_per_side: images are resized to a longest edge of this many tiles before splitting.
        text_hidden, text_layers, text_heads: tiny Llama LLM.
        vision_tower: an already built stand-in ``Idefics3VisionTransformer`` to reuse (``vision="dinov2"``).
    """
    import transformers
    from transformers import Idefics3ImageProcessorPil, LlamaConfig

    from ..processors import build_processor_without_video

    prefix = "SmolVLM" if smolvlm else "Idefics3"
    tokenizer = build_family_tokenizer(IDEFICS3_SPECIALS)
    if vision == "random":
        patch = patch_size or (4 if smolvlm else 8)
        scale = scale_factor or (4 if smolvlm else 2)
        vision_config: Any = tiny_vit_config(
            getattr(transformers, f"{prefix}VisionConfig"), tile_size, patch, 2
        )
        mean, std = SIGLIP_MEAN, SIGLIP_STD
    elif vision == "dinov2":
        from .encoder import STANDIN_IMAGE_MEAN, STANDIN_IMAGE_STD

        if vision_tower is None:
            vision_tower = standin_idefics3_vision_model(tile_size)
        vision_config = vision_tower.config
        patch, scale = int(vision_config.patch_size), scale_factor or 3
        mean, std = list(STANDIN_IMAGE_MEAN), list(STANDIN_IMAGE_STD)
    else:
        raise ValueError(f"`vision` must be 'random' or 'dinov2', got {vision!r}")
    seq_len = (tile_size // patch // scale) ** 2
    text_config = llm_config(
        LlamaConfig, tokenizer, text_hidden, text_layers, text_heads, max_positions=16384
    )
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    image_processor = getattr(transformers, f"{prefix}ImageProcessorPil", Idefics3ImageProcessorPil)(
        do_image_splitting=True, max_image_size={"longest_edge": tile_size},
        size={"longest_edge": max_crops_per_side * tile_size}, image_mean=mean, image_std=std,
    )  # fmt: skip
    if smolvlm:
        with optional_imports("SmolVLM's processor"):
            import num2words  # noqa: F401  (SmolVLMProcessor refuses to build without it)
        processor = build_processor_without_video(
            transformers.SmolVLMProcessor, image_processor=image_processor, tokenizer=tokenizer,
            image_seq_len=seq_len,
        )  # fmt: skip
    else:
        processor = transformers.Idefics3Processor(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len
        )
    model_cls = getattr(transformers, f"{prefix}ForConditionalGeneration")
    return save_random_checkpoint(out_dir, model_cls, config, processor, seed=seed, vision_tower=vision_tower)


def build_tiny_smolvlm(out_dir: str | Path, **kwargs: Any) -> Path:
    """:func:`build_tiny_idefics3` with ``smolvlm=True``."""
    return build_tiny_idefics3(out_dir, smolvlm=True, **kwargs)
