"""The vision-side baselines whose rule changes with the family, against plain re-implementations written from the
docs (Python loops over cells and tokens; nothing from ``globalcom2``'s pooling or PruMerge code).

- Pooling on every tiling family (docs/eval.md, "pooling" per family): InternVL's layout (InternVL, Idefics3, SmolVLM,
  Gemma 3, Aya Vision) averages each tile's ``g x g`` LLM tokens (after the pixel shuffle / the projector's pooling)
  to ``a x a``, ``a = max(1, floor(g*sqrt(R) + 1/2))``, tile after tile; LLaVA-OneVision averages the thumbnail to
  ``a0 x a0`` and every crop's unpadded block of the crop token grid to ``a_r x b_c``, one newline per pooled row.
  The rows the LLM receives and the processor's placeholder count equal the plain ones.
- PruMerge(+) on InternVL (docs/prumerge.md, "InternVL"): per tile, the [CLS] attention of the last layer (float64
  from the tower's weights) summed over each 2 x 2 pixel-shuffle group, IQR outliers (``numpy.percentile``), the
  PruMerge+ samples, and the merge over the k nearest tokens by the cosine of their groups' keys side by side, on
  the projector's input; tile after tile, each tile's kept tokens then its remainder token.
"""

from __future__ import annotations

import math

import pytest
import torch

from globalcom2.methods import apply_method
from tests.adapters.families import FAMILIES, family_fixtures, inputs_for
from tests.adapters.plain_families import _plain_norm, capture_llm_inputs, forward_and_capture
from tests.methods.plain_llm import text_model
from tests.methods.plain_prumerge import plain_shuffled_tiles

TILED = ("llava_onevision", "internvl", "idefics3", "smolvlm", "gemma3", "aya_vision")
family_dir, fam = family_fixtures(
    [f for f in FAMILIES if f.name in TILED], default=["llava_onevision", "internvl", "gemma3"]
)
RATIO = 0.25


def _side(n: int, ratio: float) -> int:
    return max(1, math.floor(n * math.sqrt(ratio) + 0.5)) if n > 0 else 0


def _projector(model):
    inner = model.model
    return getattr(inner, "multi_modal_projector", None) or inner.connector


def _tile_features(model, inputs) -> torch.Tensor:
    """The unpatched model's projected tokens of every tile ``(tiles, tokens, D)``, in the family's tile order."""
    seen = []
    hook = _projector(model).register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    out = torch.cat(seen)
    return out.reshape(out.shape[0], -1, out.shape[-1])  # Aya Vision's projector hands (tiles, m, m, D)


def _image_rows(model, processor, family, image, method, **options):
    """The rows of the image placeholders the LLM receives under ``method``, the plan and the placeholder count."""
    with apply_method(model, processor, method, ratio=RATIO, **options) as handle:
        inputs = inputs_for(family, processor, [image])
        capture = capture_llm_inputs(model.model, text_model(model))
        seen = forward_and_capture(model, inputs, capture)
        plan = handle.plans[0]
    image_id = int(model.config.image_token_id)
    where = seen["input_ids"][0] == image_id
    return seen["inputs_embeds"][0, where], plan, int((inputs["input_ids"][0] == image_id).sum())


def _pool_block(block: torch.Tensor, a: int, b: int) -> list[torch.Tensor]:
    """``(h, w, D)`` averaged to ``a x b`` cells (cell (y, x) -> bin (y*a // h, x*b // w)), raster order, cell by
    cell."""
    h, w = block.shape[:2]
    sums = [[torch.zeros(block.shape[-1], dtype=torch.float64) for _ in range(b)] for _ in range(a)]
    counts = [[0] * b for _ in range(a)]
    for y in range(h):
        for x in range(w):
            sums[y * a // h][x * b // w] += block[y, x].double()
            counts[y * a // h][x * b // w] += 1
    return [sums[i][j] / counts[i][j] for i in range(a) for j in range(b)]


def _plain_valid_box(height: int, width: int, grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
    """HF's unpad rule (docs/design.md): the image's area of the padded crop grid."""
    if width / height > grid_w / grid_h:
        pad = (grid_h - int(round(height * grid_w / width, 7))) // 2
        return pad, grid_h - pad, 0, grid_w
    pad = (grid_w - int(round(width * grid_h / height, 7))) // 2
    return 0, grid_h, pad, grid_w - pad


def _plain_onevision(model, tiles, plan, size) -> list[torch.Tensor]:
    g = int(round(tiles.shape[1] ** 0.5))
    rows, cols = plan.grid
    thumb = _pool_block(tiles[0].reshape(g, g, -1), _side(g, RATIO), _side(g, RATIO))
    canvas = tiles[1 : 1 + rows * cols].reshape(rows, cols, g, g, -1).permute(0, 2, 1, 3, 4)
    canvas = canvas.reshape(rows * g, cols * g, -1)
    top, bottom, left, right = _plain_valid_box(size[0], size[1], rows * g, cols * g)
    row_spans = [(max(r * g, top), min((r + 1) * g, bottom)) for r in range(rows)]
    col_spans = [(max(c * g, left), min((c + 1) * g, right)) for c in range(cols)]
    pooled_rows: list[list[torch.Tensor]] = []
    for y0, y1 in row_spans:
        if y1 <= y0:
            continue
        a = _side(y1 - y0, RATIO)
        line: list[list[torch.Tensor]] = [[] for _ in range(a)]
        for x0, x1 in col_spans:
            if x1 <= x0:
                continue
            b = _side(x1 - x0, RATIO)
            cells = _pool_block(canvas[y0:y1, x0:x1], a, b)
            for i in range(a):
                line[i] += cells[i * b : (i + 1) * b]
        pooled_rows += line
    newline = model.model.image_newline.double()
    return thumb + [t for row in pooled_rows for t in [*row, newline]]


def test_pooling_rows_and_count_equal_the_plain_rule(fam):
    family, model, processor = fam
    image = family.images()[0].resize((family.tie_size[1], family.tie_size[0]))  # OneVision: not down-sampled
    tiles = _tile_features(model, inputs_for(family, processor, [image]))
    rows, plan, count = _image_rows(model, processor, family, image, "pooling")
    if family.name == "llava_onevision":
        expected = _plain_onevision(model, tiles, plan, (image.height, image.width))
    else:
        g = int(round(tiles.shape[1] ** 0.5))
        a = _side(g, RATIO)
        expected = [c for tile in tiles for c in _pool_block(tile.reshape(g, g, -1), a, a)]
        assert plan.num_tokens == tiles.shape[0] * a * a
    assert count == plan.num_tokens == len(expected) == rows.shape[0]  # the processor emitted the plain count
    torch.testing.assert_close(rows.double(), torch.stack(expected), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------- PruMerge on InternVL


@torch.no_grad()
def _plain_internvl_tower(model, inputs):
    """float64 [CLS] attention ("full": one attention over the whole width) of every patch, the keys and the
    projector's input of every tile, from the tower's weights."""
    tower = model.model.vision_tower
    captured = {}

    def layer_input(module, args, kwargs):
        captured.setdefault("h", (args[0] if args else kwargs["hidden_states"]).detach())

    def projector_input(module, args):
        captured.setdefault("y", args[0].detach())

    hooks = [
        tower.encoder.layer[-1].register_forward_pre_hook(layer_input, with_kwargs=True),
        _projector(model).register_forward_pre_hook(projector_input),
    ]
    try:
        model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    layer = tower.encoder.layer[-1]
    att = layer.attention
    x = _plain_norm(captured["h"].double(), layer.layernorm_before)

    def proj(lin, v):
        out = v @ lin.weight.double().T
        return out + lin.bias.double() if lin.bias is not None else out

    q, k = proj(att.q_proj, x[:, :1]), proj(att.k_proj, x)
    if not isinstance(att.q_norm, torch.nn.Identity):
        q, k = _plain_norm(q, att.q_norm), _plain_norm(k, att.k_norm)
    a = torch.softmax(torch.einsum("td,tsd->ts", q[:, 0], k) / math.sqrt(q.shape[-1]), dim=-1)
    return a[:, 1:], k[:, 1:], captured["y"].double()


@pytest.mark.parametrize("method", ["prumerge", "prumerge+"])
def test_internvl_prumerge_equals_the_plain_rule(fam, method):
    family, model, processor = fam
    if family.name != "internvl":
        pytest.skip("PruMerge runs on the families with a [CLS] tower: InternVL here")
    with torch.no_grad():  # a sharper [CLS] attention: tiles with several outliers (the tiny tower's is flat)
        model.model.vision_tower.encoder.layer[-1].attention.q_proj.weight.mul_(12.0)
    plus = method == "prumerge+"
    image = family.images()[0]
    attention, keys, y = _plain_internvl_tower(model, inputs_for(family, processor, [image]))
    proj = _projector(model)
    tiles = plain_shuffled_tiles(attention, keys, y, 2, plus)
    with torch.no_grad():
        expected = [proj(r.float()[None])[0].double() for _, _, rows in tiles for r in rows]
    kept_sets, outliers = [keep for keep, _, _ in tiles], [m for _, m, _ in tiles]
    rows, plan, _ = _image_rows(model, processor, family, image, method)
    n = plan.num_crops
    g = plan.thumbnail_mask.shape[0]
    ours = [
        set(
            plan.crops_mask[r * g : (r + 1) * g, c * g : (c + 1) * g]
            .reshape(-1)
            .nonzero()
            .reshape(-1)
            .tolist()
        )
        for r in range(plan.grid[0])
        for c in range(plan.grid[1])
    ] + [
        set(plan.thumbnail_mask.reshape(-1).nonzero().reshape(-1).tolist())
    ]  # InternVL's order: thumbnail last
    assert ours == kept_sets
    assert plan.outlier_counts.tolist() == [outliers[n], *outliers[:n]]  # the record: thumbnail first
    assert max(outliers) >= 3  # the rule was exercised beyond the one-token fallback
    assert plan.num_tokens == len(expected) == rows.shape[0]
    torch.testing.assert_close(rows.double(), torch.stack(expected), atol=1e-5, rtol=1e-4)
