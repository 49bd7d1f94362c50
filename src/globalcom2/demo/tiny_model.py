"""Tiny, randomly initialised LLaVA-NeXT checkpoints built offline (real transformers classes, real files).

Used by the tests and by the demo's end-to-end run. Nothing is downloaded: the tokenizer is a byte-level BPE
trained on the fly, the weights are random, and the checkpoint is written with ``save_pretrained`` so that it is
loaded back through the same ``from_pretrained`` path a real checkpoint takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_CORPUS = [
    "USER: <image>\nWhat is shown in this image? ASSISTANT: A photo of a cat on a table.",
    "Describe the picture in detail. There is a person, a rocket, a cup of coffee and a flower.",
    "How many objects are there? Two. Three. Four. Yes. No. The answer is",
    "the a an of in on at to is are was were with without left right top bottom red green blue",
]


def build_tokenizer(vocab_size: int = 320):
    """Byte-level BPE trained on a few sentences, wrapped as a ``PreTrainedTokenizerFast`` with ``<image>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    return fast


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
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    if vision == "clip":
        vision_config: Any = CLIPVisionConfig(
            image_size=tile_size, patch_size=patch_size, hidden_size=32, intermediate_size=64,
            num_hidden_layers=3, num_attention_heads=4, projection_dim=32,
        )  # fmt: skip
    elif vision == "dinov2":
        from .encoder import STANDIN_IMAGE_MEAN, STANDIN_IMAGE_STD, load_standin_vision_tower

        vision_tower = vision_tower if vision_tower is not None else load_standin_vision_tower(tile_size)
        vision_config = vision_tower.config
        patch_size = int(vision_config.patch_size)
        mean, std = list(STANDIN_IMAGE_MEAN), list(STANDIN_IMAGE_STD)
    else:
        raise ValueError(f"`vision` must be 'clip' or 'dinov2', got {vision!r}")
    text_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=text_heads,
        max_position_embeddings=8192, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    pinpoints = [[tile_size * a, tile_size * b] for a, b in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
    config = LlavaNextConfig(  # type: ignore[call-arg]
        vision_config=vision_config, text_config=text_config, image_grid_pinpoints=pinpoints,
        image_token_id=image_token_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    if vision_tower is not None:
        model.model.vision_tower.load_state_dict(vision_tower.state_dict())
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile_size}, crop_size={"height": tile_size, "width": tile_size},
        image_grid_pinpoints=pinpoints, image_mean=mean, image_std=std,
    )  # fmt: skip
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def load_tiny(path: str | Path, **kwargs: Any):
    """Load a checkpoint written by :func:`build_tiny_llava_next` (model in eval mode, processor)."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(path, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor
