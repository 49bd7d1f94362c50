"""The tiny stand-in tokenizers are built from a fixed vocabulary: no training, nothing printed, and exactly the
tokenizer that ``tokenizers``' ``BpeTrainer`` used to learn on every run (same ids, merges and special tokens)."""

from __future__ import annotations

import json

import pytest

from globalcom2.demo.tiny_families import _INTERNVL_SPECIALS, _ONEVISION_SPECIALS
from globalcom2.demo.tiny_model import build_tokenizer
from globalcom2.demo.tiny_parts import build_family_tokenizer

# What build_family_tokenizer trained on before it was frozen (kept here as the reference it must still equal).
_CORPUS = [
    "USER: <image>\nWhat is shown in this image? ASSISTANT: A photo of a cat on a table.",
    "Describe the picture in detail. There is a person, a rocket, a cup of coffee and a flower.",
    "How many objects are there? Two. Three. Four. Yes. No. The answer is",
    "the a an of in on at to is are was were with without left right top bottom red green blue",
]
FAMILIES = {"llava_next": {"image_token": "<image>"}, "llava_onevision": _ONEVISION_SPECIALS,
            "internvl": _INTERNVL_SPECIALS}  # fmt: skip


def _trained(specials, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>", *specials.values()],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens=dict(specials), padding_side="left",
    )  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_fixed_tokenizer_equals_the_trained_one(family):
    specials = FAMILIES[family]
    fixed, trained = build_family_tokenizer(specials), _trained(specials)
    assert json.loads(fixed.backend_tokenizer.to_str()) == json.loads(trained.backend_tokenizer.to_str())
    assert len(fixed) == 320 and fixed.all_special_tokens == trained.all_special_tokens
    assert fixed.convert_tokens_to_ids(list(specials.values())) == trained.convert_tokens_to_ids(
        list(specials.values())
    )
    text = "USER: <image>\nWhat is shown? ASSISTANT: caf\u00e9, \u65e5\u672c"
    assert fixed(text)["input_ids"] == trained(text)["input_ids"]
    assert fixed.decode(fixed(text)["input_ids"]) == text


def test_building_prints_nothing_and_trains_nothing(capfd, monkeypatch):
    import tokenizers

    def no_training(*args, **kwargs):
        raise AssertionError("the stand-in tokenizer must not be trained")

    monkeypatch.setattr(tokenizers.trainers, "BpeTrainer", no_training)
    tok = build_tokenizer()
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert (
        tok.convert_tokens_to_ids("<image>") == 4 and tok.pad_token == "<pad>" and tok.padding_side == "left"
    )


def test_vocab_size_out_of_range_is_a_value_error():
    assert len(build_tokenizer(300)) == 300  # fewer merges
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(400)
