"""A tiny LLaVA-NeXT with a 4-layer LLM (FastV needs layers on both sides of K = 2)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny4_dir(checkpoint):
    from globalcom2.demo.tiny_model import build_tiny_llava_next

    return checkpoint(build_tiny_llava_next, text_layers=4, seed=1)


@pytest.fixture()
def tiny4(tiny4_dir):
    from globalcom2.demo.tiny_model import load_tiny

    return load_tiny(tiny4_dir)


@pytest.fixture()
def tiny4_eager(tiny4_dir):
    from globalcom2.demo.tiny_model import load_tiny

    return load_tiny(tiny4_dir, attn_implementation="eager")


def assert_llm_batch_equals_alone(model, processor, method, sizes, record, **options):
    """A padded batch under ``method`` gives each sample its result alone (last logits, 4 greedy tokens and
    ``record(plan)``); ``remove()`` restores the batch's logits bit for bit. Returns the batch's records."""
    import torch

    from globalcom2.methods import apply_method
    from tests.conftest import PROMPT, batch_inputs, random_image

    batch = batch_inputs(processor, sizes)
    with torch.no_grad():
        before = model(**batch).logits
    with apply_method(model, processor, method, **options) as gc, torch.no_grad():
        out_b = model(**batch).logits[:, -1]
        gen_b = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, -4:]
        records = [record(p) for p in gc.plans]
        for i, size in enumerate(sizes):
            alone = processor(images=[random_image(*size, seed=i)], text=[PROMPT], return_tensors="pt")
            torch.testing.assert_close(model(**alone).logits[:, -1], out_b[i : i + 1], atol=2e-5, rtol=1e-4)
            assert torch.equal(
                model.generate(**alone, max_new_tokens=4, do_sample=False)[:, -4:], gen_b[i : i + 1]
            )
            assert record(gc.plans[0]) == records[i]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)  # remove() restored the model bit for bit
    return records
