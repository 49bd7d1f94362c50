"""The methods whose rule changes with the family, against plain re-implementations (nothing from ``globalcom2``'s
selection code: Python sorts with the tie rule written out, the LLM run layer by layer).

- FasterVLM on towers without [CLS] (OneVision's and SmolVLM's SigLIP): each tile keeps its top tokens by Eq. 7,
  s_i = -cos(x_i, mean of the tile's tokens), on the projector's / connector's input (SmolVLM: summed over each
  pixel-shuffle group, as the family scores).
- FastV and PDrop on families whose image spans hold markers (InternVL's ``<img>``/``</img>``, SmolVLM's
  ``<fake_token_around_image>``/``<row_r_col_c>``/``<global-img>``): only the image tokens are ranked and dropped,
  the markers stay; the logits equal a plain layer-by-layer run that drops the same tokens.

- FastV on M-RoPE families (Qwen-VL: each image token's rotary position has three axes): only the image-token
  positions are used (the family's token layout is not needed), and every kept token keeps its own multimodal
  rotary embedding, as a plain layer-by-layer run with the model's own (cos, sin) gives. On Qwen3.5 the score row
  takes each head's query out of the gated ``q_proj`` (query, then gate) with the partial rotary embedding, and the
  pruned sequence crosses a Gated DeltaNet layer.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from globalcom2.methods import apply_method
from globalcom2.methods.layout import plan_from_keep
from tests.adapters.families import FAMILIES, family_fixtures, inputs_for
from tests.methods.plain_llm import head_mean_rows, last_row_select, staged_forward, text_model, top_by_score

family_dir, fam = family_fixtures(
    [
        f
        for f in FAMILIES
        if f.name in ("llava_onevision", "internvl", "smolvlm", "qwen2_vl", "qwen2_5_vl", "qwen3_5")
    ],
    default=["llava_onevision", "internvl", "smolvlm", "qwen2_5_vl"],
)


def _run_positions(ids: torch.Tensor, image_id: int) -> list[int]:
    return (ids[0] == image_id).nonzero().reshape(-1).tolist()


@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_llm_methods_with_markers_equal_a_plain_run(fam, method):
    family, model, processor = fam
    if family.native:
        pytest.skip("M-RoPE: test_fastv_with_mrope_positions_equals_a_plain_run")
    image = family.images()[0]
    plain_inputs = inputs_for(family, processor, [image])
    ids = plain_inputs["input_ids"]
    image_id = int(model.config.image_token_id)
    run = _run_positions(ids, image_id)
    n = len(run)
    markers = [i for i, t in enumerate(ids[0].tolist()) if t != image_id and run[0] - 3 <= i <= run[-1] + 1]
    if family.name != "llava_onevision":
        assert markers, "this family's image span holds marker tokens"
    lm = text_model(model)
    if method == "fastv":
        ratio, options, boundaries, offset, compact = 0.5, {"layer": 1}, [1], 1, False
        counts = [int(n * ratio)]
    else:
        ratio, options, offset, compact = 0.75, {"stages": 2}, 0, True
        from globalcom2.methods.schedule import pdrop_schedule

        sched = pdrop_schedule(len(lm.layers), ratio, stages=2)
        boundaries, counts = list(sched.boundaries), [int(n * s) for s in sched.shares]

    select = last_row_select(functools.partial(head_mean_rows, lm), counts, offset)
    logits, kept_sets, _ = staged_forward(model, plain_inputs, boundaries, offset, select, compact=compact)
    survivors = set(kept_sets[-1])
    assert all(m in survivors for m in markers)  # the plain rule never drops a marker either
    with apply_method(model, processor, method, ratio=ratio, **options) as handle:
        inputs = inputs_for(family, processor, [image])  # after apply (tile grids); the prompt is unchanged
        assert torch.equal(inputs["input_ids"], ids)
        with torch.no_grad():
            ours = model(**inputs).logits
        plan = handle.plans[0]
        layout = handle.adapter.pruner.state.layouts[0]
    assert plan.num_tokens_full == n  # image tokens only: the markers are not in the run
    expected = plan_from_keep(layout, torch.tensor([p in survivors for p in run]))
    assert plan.num_tokens == expected.num_tokens == counts[-1]
    assert torch.equal(plan.thumbnail_mask, expected.thumbnail_mask)
    assert torch.equal(plan.crops_mask, expected.crops_mask)
    torch.testing.assert_close(ours, logits, atol=2e-4, rtol=2e-4)


def _eq7(x: torch.Tensor) -> torch.Tensor:
    """Eq. 7 of one tile's tokens ``(N, D)``: minus the cosine of each to their mean."""
    return -F.cosine_similarity(x.double(), x.double().mean(0, keepdim=True), dim=-1)


def _group_sum(scores: torch.Tensor, side: int, factor: int) -> torch.Tensor:
    """Sum over each ``factor x factor`` block of a ``side x side`` raster (the pixel-shuffle groups), raster order."""
    grid = scores.reshape(side, side)
    out = [
        float(grid[y * factor : (y + 1) * factor, x * factor : (x + 1) * factor].sum())
        for y in range(side // factor)
        for x in range(side // factor)
    ]
    return torch.tensor(out, dtype=torch.float64)


def test_fastervlm_on_a_tower_without_cls_ranks_by_eq7(fam):
    family, model, processor = fam
    if family.name == "internvl" or family.native:
        pytest.skip("InternViT has a [CLS]: Eq. 1, covered by the tie-rule and budget tests")
    inner = model.model
    hook_on = inner.connector if family.name == "smolvlm" else inner.multi_modal_projector
    seen: list[torch.Tensor] = []
    hook = hook_on.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    image = family.images()[1]
    try:
        with apply_method(model, processor, "fastervlm", ratio=0.25) as handle:
            inputs = inputs_for(family, processor, [image])
            with torch.no_grad():
                model(**inputs)
            plan = handle.plans[0]
    finally:
        hook.remove()
    tiles = torch.cat(seen).reshape(-1, seen[0].shape[-2], seen[0].shape[-1])  # (tiles, patches, D)
    side = int(round(tiles.shape[1] ** 0.5))
    factor = side // plan.thumbnail_mask.shape[0]
    scores = [_group_sum(_eq7(t), side, factor) if factor > 1 else _eq7(t) for t in tiles]
    g = plan.thumbnail_mask.shape[0]
    rows, cols = plan.grid
    if family.name == "smolvlm":  # crops row-major, then the global image (the thumbnail) last
        thumb, crops = scores[-1], scores[:-1]
    else:  # anyres: the thumbnail first
        thumb, crops = scores[0], scores[1 : 1 + rows * cols]
    k0 = int(plan.thumbnail_mask.sum())
    assert set(plan.thumbnail_mask.reshape(-1).nonzero().reshape(-1).tolist()) == set(
        top_by_score(thumb.tolist(), list(range(g * g)), k0)
    )
    top, bottom, left, right = plan.valid_box
    for j, s in enumerate(crops):
        r, c = divmod(j, cols)
        block = plan.crops_mask[r * g : (r + 1) * g, c * g : (c + 1) * g].reshape(-1)
        valid = torch.zeros(rows * g, cols * g, dtype=torch.bool)
        valid[top:bottom, left:right] = True
        candidates = (
            valid[r * g : (r + 1) * g, c * g : (c + 1) * g].reshape(-1).nonzero().reshape(-1).tolist()
        )
        k = int(block.sum())
        assert k == int(plan.crop_keep_counts[j]) > 0
        assert set(block.nonzero().reshape(-1).tolist()) == set(top_by_score(s.tolist(), candidates, k)), j


@torch.no_grad()
def test_fastv_with_mrope_positions_equals_a_plain_run(fam):
    family, model, processor = fam
    if not family.native:
        pytest.skip("an M-RoPE family")
    lm = text_model(model)
    inputs = inputs_for(family, processor, [family.images()[0]])
    image_id = int(model.config.image_token_id)
    ids = inputs["input_ids"]
    run = _run_positions(ids, image_id)
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["rope"] = kwargs["position_embeddings"]
        seen["mask"] = kwargs.get("attention_mask")

    hook = lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    model(**inputs)
    hook.remove()
    cos, sin = seen["rope"]
    assert cos.shape[:2] == (1, ids.shape[1])  # one (multimodal) rotary embedding per prompt position
    k_layer, ratio = 1, 0.5
    h = seen["h"]
    s = ids.shape[1]
    entering = []  # the hidden states entering each layer
    for j, layer in enumerate(lm.layers):
        if j == k_layer:  # FastV: layer K-1's last-token row ranks the image tokens; positions kept
            row = head_mean_rows(lm, lm.layers[j - 1], entering[j - 1], None, [s - 1], cos_sin=(cos, sin))[0]
            kept_img = top_by_score(row.tolist(), run, int(len(run) * ratio))
            keep = sorted(kept_img + [i for i in range(s) if i not in run])
            full = h.clone()
            h, cos, sin = h[:, keep], cos[:, keep], sin[:, keep]
        entering.append(h)
        n = h.shape[1]
        # causal; a linear-attention layer (Qwen3.5's Gated DeltaNet) is causal by construction, no mask
        mask = (
            None if hasattr(layer, "linear_attn") else torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        )
        h = layer(h, attention_mask=mask, position_embeddings=(cos, sin))
    full[:, keep] = h
    logits = model.lm_head(lm.norm(full))
    with apply_method(model, processor, "fastv", ratio=ratio, layer=k_layer) as handle:
        ours = model(**inputs_for(family, processor, [family.images()[0]])).logits
        survivors = handle.adapter.pruner.state.survivors[0]
        plan = handle.plans[0]
    assert survivors.nonzero().reshape(-1).tolist() == keep
    # the plan: the kept tokens on the image's H x W merged grid, raster order (the run is the grid)
    assert plan.num_tokens_full == len(run) == plan.crops_mask.numel()
    assert plan.crops_mask.reshape(-1).tolist() == [p in keep for p in run]
    torch.testing.assert_close(ours, logits, atol=2e-4, rtol=2e-4)


def test_visualize_draws_an_llm_side_plan_on_a_native_family(fam):
    from globalcom2.evaluation.visual import method_plan

    family, model, processor = fam
    if not family.native:
        pytest.skip("an M-RoPE family")
    plan = method_plan(model, processor, family.images()[0], "fastv", 0.5, question="What is it?", layer=1)
    assert "_globalcom2_handle" not in model.__dict__  # removed on the way out
    assert plan.num_tokens == int(plan.crops_mask.sum()) == plan.num_tokens_full // 2
    assert int(plan.crop_keep_counts.sum()) == plan.num_tokens and plan.thumbnail_mask.sum() == 0


# -------------------------------------------------------------------------------- rules of one family's LLM


def _gemma_row(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q: int, window: int | None):
    """Head-mean softmax attention row of entry ``q`` over the entries of ``h`` (1, L, D) in a Gemma 3 layer, eager
    math head by head: per-head q/k norms, rotary, ``attn.scaling``, causal, and in a sliding layer only the last
    ``window`` entries up to ``q``."""
    from tests.methods.plain_llm import rotate_half

    attn = layer.self_attn
    x = layer.input_layernorm(h)[0].float()
    dh, nh = attn.head_dim, attn.q_proj.out_features // attn.head_dim
    nkv = attn.k_proj.out_features // dh
    rows = []
    for head in range(nh):
        kv = head // (nh // nkv)
        qh = attn.q_norm(x[q : q + 1] @ attn.q_proj.weight[head * dh : (head + 1) * dh].float().T)
        kh = attn.k_norm(x @ attn.k_proj.weight[kv * dh : (kv + 1) * dh].float().T)
        qh = qh * cos[0, q : q + 1] + rotate_half(qh) * sin[0, q : q + 1]
        kh = kh * cos[0] + rotate_half(kh) * sin[0]
        logits = (qh @ kh.T)[0] * attn.scaling
        seen = [k <= q and (window is None or k > q - window) for k in range(x.shape[0])]
        logits = logits.masked_fill(~torch.tensor(seen), float("-inf"))
        rows.append(logits.softmax(-1))
    return torch.stack(rows).mean(0)


def _gemma_mask(types: list[int], kind: str, window: int) -> torch.Tensor:
    """Gemma 3's mask over the current entries, written from its docs: a query sees the keys up to itself and every
    entry of its own image run (a maximal run of consecutive image entries); a sliding layer also only keys less
    than ``window`` entries before the query."""
    n = len(types)
    run, runs = -1, []
    for i, t in enumerate(types):
        run = (run + 1 if i == 0 or types[i - 1] != 1 else run) if t == 1 else run
        runs.append(run if t == 1 else None)
    allowed = [
        [(k <= q or (runs[q] is not None and runs[q] == runs[k])) and (kind != "sliding_attention" or k > q - window)
         for k in range(n)]
        for q in range(n)
    ]  # fmt: skip
    return torch.tensor(allowed)[None, None]


GEMMA_KINDS = ("sliding_attention", "full_attention", "sliding_attention")
GEMMA_WINDOW = 16


@pytest.mark.parametrize("method", ["fastv", "pdrop"])
@torch.no_grad()
def test_llm_methods_on_gemma3_keep_its_image_blocks_and_windows(checkpoint, method):
    """Gemma 3: image runs stay bidirectional blocks of the pruned sequence, sliding layers keep a window of
    ``sliding_window`` entries of the pruned sequence, each layer kind its own rotary base; FastV's and PDrop's
    rows are the layer's own (windowed) attention. Against a plain layer-by-layer run (3 layers: sliding, full,
    sliding; window 16, shorter than the pruned prompt)."""
    from globalcom2.demo.tiny_tiling import build_tiny_gemma3
    from globalcom2.methods.schedule import pdrop_schedule
    from tests.adapters.families import load
    from tests.methods.plain_llm import embed

    family = next(f for f in FAMILIES if f.name == "gemma3")
    model, processor = load(checkpoint(build_tiny_gemma3, text_layers=3, layer_types=GEMMA_KINDS,
                                       sliding_window=GEMMA_WINDOW))  # fmt: skip
    image = family.images()[0]
    inputs = inputs_for(family, processor, [image])
    ids, types0 = inputs["input_ids"][0], inputs["token_type_ids"][0].tolist()
    image_id = int(model.config.image_token_id)
    run = (ids == image_id).nonzero().reshape(-1).tolist()
    assert len(set(types0[i] for i in run)) == 1 and types0[run[0]] == 1
    lm = text_model(model)
    s = ids.shape[0]
    if method == "fastv":
        ratio, options, boundaries, counts, score_offset, compact = (
            0.5,
            {"layer": 1},
            [1],
            [len(run) // 2],
            1,
            False,
        )
    else:
        ratio, options, score_offset, compact = 0.75, {"stages": 2}, 0, True
        sched = pdrop_schedule(len(lm.layers), ratio, stages=2)
        boundaries, counts = list(sched.boundaries), [int(len(run) * sh) for sh in sched.shares]
    h = embed(model, inputs)
    origin = list(range(s))
    full = h.clone()
    kept_sets = []
    entering = []  # (h, cos, sin) entering each layer
    for j, layer in enumerate(lm.layers):
        kind = GEMMA_KINDS[j]
        window = GEMMA_WINDOW if kind == "sliding_attention" else None
        if j in boundaries:
            stage = boundaries.index(j)
            if score_offset:  # FastV: the last token's row in layer j - 1, as that layer saw it
                ph, pcos, psin, pwin = entering[j - 1]
                row = _gemma_row(lm.layers[j - 1], ph, pcos, psin, ph.shape[1] - 1, pwin)
            else:  # PDrop: the last token's row in layer j itself, on the sequence entering it (positions as before)
                positions = torch.arange(len(origin)) if compact else torch.tensor(origin)
                cos, sin = lm.rotary_emb(h, positions[None], kind)
                row = _gemma_row(layer, h, cos, sin, h.shape[1] - 1, window)
            images = [i for i, o in enumerate(origin) if o in run]
            kept = top_by_score(row.tolist(), images, counts[stage])
            keep = sorted(kept + [i for i, o in enumerate(origin) if o not in run])
            for i, o in enumerate(origin):
                if i not in keep:
                    full[0, o] = h[0, i]
            h, origin = h[:, keep], [origin[i] for i in keep]
            kept_sets.append(list(origin))
        positions = torch.arange(len(origin)) if compact else torch.tensor(origin)
        cos, sin = lm.rotary_emb(h, positions[None], kind)
        entering.append((h, cos, sin, window))
        mask = _gemma_mask([types0[o] for o in origin], kind, GEMMA_WINDOW)
        h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions[None])
    for i, o in enumerate(origin):
        full[0, o] = h[0, i]
    expected = model.lm_head(lm.norm(full))
    assert len(origin) > GEMMA_WINDOW  # the window matters after the drop
    with apply_method(model, processor, method, ratio=ratio, **options) as handle:
        ours = model(**inputs_for(family, processor, [image])).logits
        survivors = handle.adapter.pruner.state.survivors[0]
    assert survivors.nonzero().reshape(-1).tolist() == kept_sets[-1]
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=2e-4)


@torch.no_grad()
def test_fastv_on_qwen3_vl_trims_the_deepstack_features_to_the_kept_tokens(checkpoint):
    """Qwen3-VL's DeepStack adds one visual feature per image token after each of the LLM's first layers; after
    FastV's drop at layer 1 only the kept image tokens get theirs (their own rows), at their uncompressed M-RoPE
    positions. Against a plain layer-by-layer run (3 layers, deepstack after layers 0 and 1)."""
    from globalcom2.demo.tiny_qwen import build_tiny_qwen3_vl
    from tests.adapters.families import load

    family = next(f for f in FAMILIES if f.name == "qwen3_vl")
    model, processor = load(checkpoint(build_tiny_qwen3_vl, text_layers=3, deepstack_layers=2))
    lm = text_model(model)
    inputs = inputs_for(family, processor, [family.images()[0]])
    ids = inputs["input_ids"]
    run = _run_positions(ids, int(model.config.image_token_id))
    seen: dict = {"deepstack": []}

    def grab(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["rope"] = kwargs["position_embeddings"]

    def record(hidden_states, visual_pos_masks, visual_embeds):
        seen["deepstack"].append((visual_pos_masks[0].nonzero().reshape(-1).tolist(), visual_embeds))
        return original(hidden_states, visual_pos_masks, visual_embeds)

    original = lm._deepstack_process
    hook = lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    lm._deepstack_process = record
    try:
        model(**inputs)
    finally:
        hook.remove()
        del lm._deepstack_process
    assert len(seen["deepstack"]) == 2 and all(pos == run for pos, _ in seen["deepstack"])
    cos, sin = seen["rope"]
    h, s, ratio = seen["h"], ids.shape[1], 0.5
    origin = list(range(s))
    entering = []
    for j, layer in enumerate(lm.layers):
        if j == 1:  # FastV: layer 0's last-token row (after layer 0's deepstack add nothing changes the row)
            row = head_mean_rows(lm, lm.layers[0], entering[0], None, [s - 1], cos_sin=(cos, sin))[0]
            keep = sorted(
                top_by_score(row.tolist(), run, int(len(run) * ratio)) + [i for i in range(s) if i not in run]
            )
            full = h.clone()
            h, cos, sin, origin = h[:, keep], cos[:, keep], sin[:, keep], keep
        entering.append(h)
        n = h.shape[1]
        h = layer(
            h,
            attention_mask=torch.ones(n, n, dtype=torch.bool).tril()[None, None],
            position_embeddings=(cos, sin),
        )
        if j < len(seen["deepstack"]):  # each kept image token gets its own row of this layer's features
            embeds = seen["deepstack"][j][1]
            h = h.clone()
            for i, o in enumerate(origin):
                if o in run:
                    h[0, i] += embeds[run.index(o)]
    full[:, keep] = h
    expected = model.lm_head(lm.norm(full))
    with apply_method(model, processor, "fastv", ratio=ratio, layer=1) as handle:
        ours = model(**inputs_for(family, processor, [family.images()[0]])).logits
        survivors = handle.adapter.pruner.state.survivors[0]
    assert survivors.nonzero().reshape(-1).tolist() == keep
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=2e-4)


@torch.no_grad()
def test_globalcom2_fastv_on_a_native_family_gives_each_region_globalcom2s_count(fam):
    """GlobalCom² + FastV on Qwen-VL: the regions of docs/qwen.md (bands of at most 16 x 16 merged tokens) are the
    crops; each keeps GlobalCom²'s budget count (``globalcom2.apply``'s plan of the same image at the same R), and
    FastV's row (layer K - 1's last token) picks which of its tokens inside it."""
    import math

    import globalcom2

    family, model, processor = fam
    if not family.native:
        pytest.skip("an M-RoPE family")
    image, ratio = family.images()[0], 0.5
    with globalcom2.apply(model, processor, ratio=ratio) as gc:
        model(**inputs_for(family, processor, [image]))
        counts = gc.plans[0].crop_keep_counts.tolist()
        height, width = gc.plans[0].crops_mask.shape
    inputs = inputs_for(family, processor, [image])
    ids = inputs["input_ids"]
    run = _run_positions(ids, int(model.config.image_token_id))
    assert len(run) == height * width
    nr, nc = math.ceil(height / 16), math.ceil(width / 16)
    region = [
        ((y + 1) * nr - 1) // height * nc + ((x + 1) * nc - 1) // width
        for y in range(height)
        for x in range(width)
    ]
    assert len(counts) == nr * nc
    lm = text_model(model)
    seen = {}

    def grab(module, args, kwargs):
        seen["h"], seen["rope"] = (
            (args[0] if args else kwargs["hidden_states"]),
            kwargs["position_embeddings"],
        )

    hook = lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    model(**inputs)
    hook.remove()
    s = ids.shape[1]
    row = head_mean_rows(lm, lm.layers[0], seen["h"], None, [s - 1], cos_sin=seen["rope"])[0]
    kept = sorted(
        p
        for r, k in enumerate(counts)
        for p in top_by_score(row.tolist(), [run[i] for i, g in enumerate(region) if g == r], k)
    )
    with apply_method(model, processor, "globalcom2+fastv", ratio=ratio, layer=1) as handle:
        model(**inputs_for(family, processor, [image]))
        survivors = handle.adapter.pruner.state.survivors[0]
        plan = handle.plans[0]
    assert [p for p in run if survivors[p]] == kept
    assert plan.crop_keep_counts.tolist() == counts


def _image_runs(ids: torch.Tensor, image_id: int) -> list[list[int]]:
    """The maximal runs of consecutive image-token positions of a prompt ``(L,)``, in prompt order."""
    runs: list[list[int]] = []
    for p in (ids == image_id).nonzero().reshape(-1).tolist():
        if runs and runs[-1][-1] == p - 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


@pytest.mark.parametrize("method", ["fastv", "globalcom2+fastv"])
@torch.no_grad()
def test_llm_side_plans_on_gemma3_cover_the_original_image_and_every_crop(checkpoint, method):
    """Gemma 3's token layout with pan-and-scan (docs/families.md): the original image's run first (the thumbnail),
    then one run per crop in the processor's order, each behind its ``<start_of_image>``. FastV ranks the tokens of
    every run together; GlobalCom² + FastV gives each run GlobalCom²'s budget count (the original image: the
    thumbnail's) and FastV's row picks inside it. The plan is the survivors put back on their runs' cells (run 0:
    the g x g thumbnail, run j: crop j - 1's block of the padded crop grid), written out here."""
    import globalcom2
    from globalcom2.demo.tiny_tiling import build_tiny_gemma3
    from tests.adapters.families import load
    from tests.methods.plain_llm import embed

    family = next(f for f in FAMILIES if f.name == "gemma3")
    model, processor = load(checkpoint(build_tiny_gemma3))
    image, ratio = family.images()[0], 0.5  # 60 x 190: pan-and-scan cuts it into a 1 x n row of crops
    inputs = inputs_for(family, processor, [image])
    ids = inputs["input_ids"][0]
    runs = _image_runs(ids, int(model.config.image_token_id))
    assert len(runs) >= 3 and len({len(run) for run in runs}) == 1
    g = int(round(len(runs[0]) ** 0.5))
    lm = text_model(model)
    h, s = embed(model, inputs), ids.shape[0]
    kind = lm.config.layer_types[0]  # FastV at layer 1 ranks by layer 0's last-token row
    cos, sin = lm.rotary_emb(h, torch.arange(s)[None], kind)
    window = lm.config.sliding_window if kind == "sliding_attention" else None
    row = _gemma_row(lm.layers[0], h, cos, sin, s - 1, window).tolist()
    if method == "fastv":
        every = [p for run in runs for p in run]
        kept = top_by_score(row, every, int(len(every) * ratio))
    else:
        with globalcom2.apply(model, processor, ratio=ratio) as gc:
            model(**inputs_for(family, processor, [image]))
            vision = gc.plans[0]
        counts = [int(vision.thumbnail_mask.sum()), *vision.crop_keep_counts.tolist()]
        kept = sorted(p for run, k in zip(runs, counts, strict=True) for p in top_by_score(row, run, k))
    with apply_method(model, processor, method, ratio=ratio, layer=1) as handle:
        model(**inputs_for(family, processor, [image]))
        survivors = handle.adapter.pruner.state.survivors[0]
        plan = handle.plans[0]
    assert [p for run in runs for p in run if survivors[p]] == kept
    rows, cols = plan.grid
    assert rows * cols == len(runs) - 1 and rows == 1  # a landscape image: crops left to right
    thumbnail = torch.tensor([p in kept for p in runs[0]]).reshape(g, g)
    crops = torch.zeros(rows * g, cols * g, dtype=torch.bool)
    for j, run in enumerate(runs[1:]):
        r, c = divmod(j, cols)
        crops[r * g : (r + 1) * g, c * g : (c + 1) * g] = torch.tensor([p in kept for p in run]).reshape(g, g)
    assert torch.equal(plan.thumbnail_mask, thumbnail) and torch.equal(plan.crops_mask, crops)
    assert plan.num_tokens == len(kept) and plan.num_tokens_full == sum(len(run) for run in runs)
    assert plan.crop_keep_counts.tolist() == [sum(p in kept for p in run) for run in runs[1:]]


def test_method_plan_of_an_llm_side_method_on_gemma3_covers_its_crops(checkpoint):
    """``visualize``/``eval`` draw an LLM-side plan on Gemma 3 with the family's pan-and-scan on (its
    ``plan_processor_kwargs``, as GlobalCom²'s own plan): the original image and every crop, not one run."""
    from globalcom2.demo.tiny_tiling import build_tiny_gemma3
    from globalcom2.evaluation.visual import method_plan
    from tests.adapters.families import load
    from tests.conftest import random_image

    model, processor = load(checkpoint(build_tiny_gemma3))
    image = random_image(300, 1000)  # crops of at least pan-and-scan's default 256 px
    ours = method_plan(model, processor, image, "globalcom2", 0.5, question="What is it?")
    plan = method_plan(model, processor, image, "fastv", 0.5, question="What is it?", layer=1)
    rows, cols = plan.grid
    assert plan.grid == ours.grid and rows == 1 and cols >= 2
    assert plan.num_tokens_full == (1 + cols) * int(model.config.mm_tokens_per_image)
    assert (
        plan.num_tokens == plan.num_tokens_full // 2 == int(plan.thumbnail_mask.sum() + plan.crops_mask.sum())
    )
