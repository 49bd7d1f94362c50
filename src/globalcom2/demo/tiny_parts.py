"""The pieces every offline tiny-checkpoint builder shares (:mod:`~globalcom2.demo.tiny_model`,
:mod:`~globalcom2.demo.tiny_families` and the bench's in-memory model): a fixed byte-level BPE tokenizer, the
tiny LLM and ViT configs, the DINOv2 stand-in tower, and the seeded build-and-save step.

Each builder keeps only what is particular to its family: the vision choices, the multimodal config and the
processor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..extras import optional_imports

#: The merges of the tiny byte-level BPE, in merge order: what ``tokenizers``' ``BpeTrainer`` (vocab 320, the
#: byte-level alphabet) learns from a few sentences about photos, frozen here so that building a tokenizer trains
#: nothing and prints nothing. A family with more special tokens uses a prefix (vocab stays 320).
_MERGES = (
    "Ġ a", "r e", "Ġ i", "t h", "Ġ o", "t o", "Ġ T", "Ġ w", "Ġi s", "e r", "e re", "m a", "o w", "Ġ c", "Ġ p",
    "Ġ th", "Ġa n", "Ġi n", "Ġo f", "ĠT h", "a t", "b l", "c t", "e s", "e t", "g e", "i th", "o u", "r i", "Ġ A",
    "Ġ to", "Ġa re", "re e", "Ġo n", "Ġw ith", "ma ge", "A N", "D es", "E R", "F ou", "H ow", "I S", "N o", "S S",
    "S ER", "T AN", "U SER", "W h", "Y es", "a i", "a s", "a bl", "b e", "b j", "b o", "c k", "c ri", "d et", "e e",
)  # fmt: skip
_BASE_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_family_tokenizer(specials: Mapping[str, str], vocab_size: int = 320):
    """A tiny byte-level BPE with the family's special tokens as named extra specials, built from a fixed
    vocabulary (nothing is trained, nothing is printed; the same ids on every run).

    Ids: ``<unk> <s> </s> <pad>``, then ``specials`` in order, then the 256 byte-level symbols, then merged tokens
    up to ``vocab_size`` (at most ``4 + len(specials) + 256 + 59``).
    """
    from transformers import PreTrainedTokenizerFast

    with optional_imports("the stand-in model's tokenizer"):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    names = [*_BASE_SPECIALS, *specials.values()]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    n_merges = vocab_size - len(names) - len(alphabet)
    if not 0 <= n_merges <= len(_MERGES):
        raise ValueError(
            f"vocab_size must be in [{len(names) + len(alphabet)}, {len(names) + len(alphabet) + len(_MERGES)}] "
            f"for {len(names)} special tokens, got {vocab_size}"
        )
    merges = [(a, b) for a, b in (m.split(" ") for m in _MERGES[:n_merges])]
    tokens = names + alphabet + ["".join(m) for m in merges]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(names)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens=dict(specials), padding_side="left",
    )  # fmt: skip


def llm_config(
    config_cls: Any,
    tokenizer: Any,
    hidden: int,
    layers: int,
    heads: int,
    *,
    max_positions: int,
    intermediate: int | None = None,
    kv_heads: int | None = None,
    **extra: Any,
) -> Any:
    """A decoder-only LLM config (``LlamaConfig``, ``Qwen2Config``, ...) sized to ``tokenizer`` and its specials.

    ``intermediate`` defaults to ``2 * hidden`` and ``kv_heads`` to ``heads``; ``extra`` goes to ``config_cls``.
    """
    return config_cls(
        vocab_size=len(tokenizer), hidden_size=hidden,
        intermediate_size=intermediate if intermediate is not None else 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads if kv_heads is not None else heads,
        max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra,
    )  # fmt: skip


def tiny_vit_config(config_cls: Any, tile_size: int, patch_size: int, layers: int, **extra: Any) -> Any:
    """A random ViT config (CLIP, SigLIP, InternViT, ...): width 32, MLP 64, 4 heads, ``layers`` layers."""
    return config_cls(
        image_size=tile_size, patch_size=patch_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=layers, num_attention_heads=4, **extra,
    )  # fmt: skip


def standin_vision(
    tile_size: int, vision_tower: Any = None, load: Callable[[int], Any] | None = None
) -> tuple[Any, Any, int, list[float], list[float]]:
    """The DINOv2 stand-in tower at ``tile_size`` px: ``(tower, its config, patch size, image mean, image std)``.

    ``vision_tower`` is reused when given, else ``load(tile_size)`` builds it (default:
    :func:`~globalcom2.demo.encoder.load_standin_vision_tower`).
    """
    from .encoder import STANDIN_IMAGE_MEAN, STANDIN_IMAGE_STD, load_standin_vision_tower

    if vision_tower is None:
        vision_tower = (load or load_standin_vision_tower)(tile_size)
    config = vision_tower.config
    patch = config.patch_size
    patch_size = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
    return vision_tower, config, patch_size, list(STANDIN_IMAGE_MEAN), list(STANDIN_IMAGE_STD)


def save_random_checkpoint(
    out_dir: str | Path, model_cls: Any, config: Any, processor: Any, *, seed: int, vision_tower: Any = None
) -> Path:
    """Build ``model_cls(config)`` with random weights under ``seed`` (the vision tower's weights copied from
    ``vision_tower`` when given), then write it and ``processor`` to ``out_dir`` with ``save_pretrained``."""
    import torch

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # HF initialises a few weight matrices to zero (Gemma 3's projector, InternViT's [CLS] and position embeddings):
    # left so, the LLM would get constant (zero) image features, and a test comparing the rows it reads would pass
    # whichever tokens were kept. Random weights everywhere (a stand-in tower's real weights are loaded after).
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not bool(param.any()):
                param.normal_(0.0, 0.02)
    if vision_tower is not None:
        inner = model.model
        tower = getattr(inner, "vision_tower", None) or inner.vision_model  # Idefics3 / SmolVLM: vision_model
        tower.load_state_dict(vision_tower.state_dict())
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
