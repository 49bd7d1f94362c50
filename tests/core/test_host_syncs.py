"""The selection path does not wait for the device per image, and the budget split is exact on every machine.

Host synchronisations are counted on the CPU by wrapping, for the duration of one test, every ``Tensor`` method
that must read a tensor's values on the host (``item``, ``tolist``, ``__bool__``, ``__int__``, ``__float__``,
``__index__``, ``nonzero``, boolean-mask indexing) and keeping the calls made from globalcom2's own code: on a GPU
each is a device synchronisation.
"""

from __future__ import annotations

import random

import pytest
import torch

import globalcom2
from globalcom2.core.budget import split_budget
from tests.conftest import count_host_reads, random_image
from tests.core.test_reference_equivalence import exact_split

PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"


def _encode(model, processor, images):
    inputs = processor(images=images, text=[PROMPT] * len(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])


@pytest.mark.parametrize("mode", ["budget", "reference"])
def test_host_reads_per_batched_encode_do_not_grow_with_the_batch(tiny, monkeypatch, mode):
    """Budget mode: one host read per batch (its ``image_sizes``, which the geometry needs), whatever the number
    of images; reference mode adds one read of the data-dependent counts (int(N_j * r_j) summed) of all images.
    And the selection itself runs once per batch, not once per image."""
    model, processor = tiny
    sizes = [(100, 180), (61, 183), (150, 150)]  # three different geometries (padding, 1x3, 2x2)
    images = [random_image(*s, seed=k) for k, s in enumerate(sizes)]
    with globalcom2.apply(model, processor, ratio=0.25, mode=mode):
        _encode(
            model, processor, images
        )  # warm-up: each geometry's host-side layout is built once and cached
        batched = []
        select_batch = globalcom2.core.select.select_batch

        def counted(*args, **kwargs):
            batched.append(args[0].shape[0])
            return select_batch(*args, **kwargs)

        monkeypatch.setattr(globalcom2.core.select, "select_batch", counted)
        per_batch = []
        for batch in (images[:1], images):
            with count_host_reads() as calls:
                _encode(model, processor, batch)
            per_batch.append(list(calls))
    assert batched == [1, 3]  # one vectorised selection per encode, over all its images
    sizes_read = ("tolist", "globalcom2.adapters.anyres.select_packed")
    counts_read = ("tolist", "globalcom2.core.select.kept_crop_tokens")
    for got in per_batch:
        assert got == ([sizes_read] if mode == "budget" else [sizes_read, counts_read]), got


# -- the exact budget split ------------------------------------------------------------------------------------------
# Found by a search against the float64 water-filling this replaced: each gave a count other than the exact one.
ADVERSARIAL = [
    (4, [3.6356780529022217, 25.44974637031555], [1, 7]),
    (9, [8.946496844291687, 10.735796689987183, 3.5785987973213196, 0.8946496844291687], [10, 10, 5, 1]),
    (4, [5.5517929792404175, 2.220717191696167, 5.5517929792404175], [5, 2, 10]),
]


@pytest.mark.parametrize("total, weights, capacity", ADVERSARIAL)
def test_split_budget_is_exact_on_adversarial_weights(total, weights, capacity):
    got = split_budget(total, torch.tensor(weights, dtype=torch.float64), torch.tensor(capacity))
    assert got.tolist() == exact_split(total, weights, capacity)


def test_split_budget_equals_rational_arithmetic_everywhere():
    """Random and tie-rich weights (integer multiples of one float32, so fractional parts tie exactly), zero weights,
    empty crops, every total: the counts equal the exact rational split; a batch of splits equals each alone."""
    rng = random.Random(0)
    cases = []
    for it in range(1500):
        n = rng.randint(1, 9)
        cap = [rng.choice([0, 1, 2, 3, 7, 24, 240, 576]) for _ in range(n)]
        if it % 2:
            x = float(torch.tensor(rng.random() * 0.5 + 0.01, dtype=torch.float32))
            w = [float(torch.tensor(x * rng.randint(0, 6), dtype=torch.float32)) * c for c in cap]
        else:
            w = [float(torch.tensor(rng.random(), dtype=torch.float32)) * c for c in cap]
        total = rng.randint(0, sum(cap))
        got = split_budget(total, torch.tensor(w, dtype=torch.float64), torch.tensor(cap))
        assert got.tolist() == exact_split(total, w, cap), (total, w, cap)
        cases.append((total, w, cap))
    n = 6
    batch = [c for c in cases if len(c[2]) == n][:20]
    totals = torch.tensor([t for t, _, _ in batch])
    weights = torch.tensor([w for _, w, _ in batch], dtype=torch.float64)
    caps = torch.tensor([c for _, _, c in batch])
    assert split_budget(totals, weights, caps).tolist() == [exact_split(*c) for c in batch]


def test_split_budget_is_exact_near_its_integer_bounds():
    """Totals and capacities up to the documented bound (sum < 2^31), integer weights (on the integer grid, so the
    rational split is the reference) unrelated to the capacities (crops get capped): the limb products and
    remainders do not overflow, and the counts equal the exact rational split. A single crop takes the total."""
    rng = random.Random(2)
    for _ in range(300):
        n = rng.randint(1, 8)
        cap = [rng.choice([0, rng.randint(0, (2**31 - 1) // n)]) for _ in range(n)]
        w = [float(rng.choice([0, 1, rng.randint(0, 2**20), rng.randint(0, 2**40)])) for _ in range(n)]
        total = rng.choice([0, sum(cap), rng.randint(0, sum(cap))])
        got = split_budget(total, torch.tensor(w, dtype=torch.float64), torch.tensor(cap))
        assert got.tolist() == exact_split(total, w, cap), (total, w, cap)


def test_the_counter_sees_masked_indexing_and_leaves_torch_as_it_was():
    """Boolean-mask indexing from globalcom2 code is counted, and afterwards 0-d tensors are still not sequences
    (patching ``Tensor.__getitem__`` on the class would leave them so for the rest of the process)."""
    scope = {"__name__": "globalcom2.example", "torch": torch}
    exec("def pick(x):\n    return x[x > 0]\n", scope)
    with count_host_reads() as calls:
        scope["pick"](torch.arange(-2, 3))
    assert calls == [("bool-index", "globalcom2.example.pick")]
    assert torch.tensor([torch.tensor(1), torch.tensor(2)]).tolist() == [1, 2]
