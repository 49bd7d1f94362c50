"""FastV and GlobalCom² + FastV inside a real (tiny, random) LLaVA-NeXT LLM, against plain computations."""

from __future__ import annotations

import inspect
import threading

import pytest
import torch

import globalcom2
from globalcom2.core.allocation import allocate_ratios
from globalcom2.core.layout import thumbnail_region_map
from globalcom2.methods import apply_method
from globalcom2.methods.fastv import FastVAdapter, GlobalComFastVAdapter, group_topk_keep, layer_ratio
from globalcom2.methods.layout import image_token_layout
from tests.conftest import batch_inputs
from tests.methods.conftest import assert_llm_batch_equals_alone

K = 2


def _eager_scores(model_eager, inputs, layer):
    """Plain FastV score: head-mean softmax attention row of the last token in layer K-1 (eager attention)."""
    with torch.no_grad():
        out = model_eager(**inputs, output_attentions=True)
    return out.attentions[layer - 1][:, :, -1, :].mean(1)


def _plain_keep(scores, image_mask, ratio):
    """Top int(R * n) image positions per sample by score (independent of the library's group top-k)."""
    keep = ~image_mask.clone()
    for b in range(scores.shape[0]):
        pos = image_mask[b].nonzero().reshape(-1)
        k = int(pos.numel() * ratio)
        keep[b, pos[scores[b, pos].argsort(descending=True)[:k]]] = True
    return keep


def _plain_fastv_logits(model, inputs, keep_pos, layer=K):
    """Plain re-implementation: layers < K on all tokens, layers >= K on ``keep_pos`` only (one sample)."""
    lm = model.model.language_model
    ids = inputs["input_ids"]
    with torch.no_grad():
        feats = torch.cat(
            model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        )
        h = model.get_input_embeddings()(ids)
        h = h.masked_scatter((ids == model.config.image_token_id)[..., None], feats)
        s = ids.shape[1]
        cos, sin = lm.rotary_emb(h, torch.arange(s)[None])

        def causal(n):
            return torch.ones(n, n, dtype=torch.bool).tril()[None, None]

        mask = causal(s)
        full = h
        for i, dec in enumerate(lm.layers):
            if i == layer:
                full = h.clone()
                h, cos, sin = h[:, keep_pos], cos[:, keep_pos], sin[:, keep_pos]
                mask = causal(keep_pos.numel())
            h = dec(h, attention_mask=mask, position_embeddings=(cos, sin))
        full[:, keep_pos] = h
        return model.lm_head(lm.norm(full))


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_scores_equal_eager_attention_row(tiny4, tiny4_eager, layer):
    model, processor = tiny4
    inputs = batch_inputs(processor, [(100, 180), (150, 150)])
    assert model.config.text_config._attn_implementation == "sdpa"
    with apply_method(model, processor, "fastv", ratio=0.25, layer=layer) as gc:
        with torch.no_grad():
            model(**inputs)
        ours = gc.adapter.pruner.last_scores
        assert model.config.text_config._attn_implementation == "sdpa"  # never switched to eager
    plain = _eager_scores(tiny4_eager[0], inputs, layer)
    torch.testing.assert_close(ours, plain, atol=1e-6, rtol=1e-5)


def test_prunes_only_at_layer_k_and_keeps_documented_count(tiny4):
    model, processor = tiny4
    inputs = batch_inputs(processor, [(100, 180)])
    ids = inputs["input_ids"]
    n_img = int((ids == model.config.image_token_id).sum())
    seen = []
    # hooks on the attention modules see what the (patched) decoder layers hand them
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["hidden_states"].shape[1]), with_kwargs=True
        )
        for layer in model.model.language_model.layers
    ]
    try:
        for ratio in (0.5, 0.25, 0.1):
            seen.clear()
            with apply_method(model, processor, "fastv", ratio=ratio) as gc, torch.no_grad():
                out = model(**inputs)
            kept = int(n_img * ratio)
            s = ids.shape[1]
            assert seen == [s, s, s - n_img + kept, s - n_img + kept], ratio
            assert gc.plans[0].num_tokens == kept and gc.plans[0].num_tokens_full == n_img
            assert int(gc.plans[0].thumbnail_mask.sum() + gc.plans[0].crops_mask.sum()) <= kept
            assert out.logits.shape[1] == s  # forward keeps every position (dropped tokens exit early)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("ratio", [0.5, 0.1])
def test_forward_matches_plain_reimplementation(tiny4, tiny4_eager, ratio):
    model, processor = tiny4
    inputs = batch_inputs(processor, [(120, 200)], seeds=[7])
    image_mask = inputs["input_ids"] == model.config.image_token_id
    keep = _plain_keep(_eager_scores(tiny4_eager[0], inputs, K), image_mask, ratio)
    plain = _plain_fastv_logits(model, inputs, keep[0].nonzero().reshape(-1))
    with apply_method(model, processor, "fastv", ratio=ratio) as gc, torch.no_grad():
        ours = model(**inputs).logits
    kept_pos = keep[0] & image_mask[0]
    assert gc.plans[0].num_tokens == int(kept_pos.sum())
    torch.testing.assert_close(ours, plain, atol=2e-5, rtol=1e-4)
    # and it differs from the unpruned model, so the check has teeth
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits[:, -1], plain[:, -1], atol=1e-4)


def test_generate_follows_the_pruned_cache(tiny4, tiny4_eager):
    """Every decode step's logits equal the plain computation on prompt + generated tokens."""
    model, processor = tiny4
    ratio = 0.25
    inputs = batch_inputs(processor, [(120, 200)], seeds=[3])
    image_mask = inputs["input_ids"] == model.config.image_token_id
    keep = _plain_keep(_eager_scores(tiny4_eager[0], inputs, K), image_mask, ratio)[0]
    with apply_method(model, processor, "fastv", ratio=ratio), torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)  # fmt: skip
    s = inputs["input_ids"].shape[1]
    for t, step_scores in enumerate(gen.scores):
        ids = gen.sequences[:, : s + t]
        step_inputs = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        keep_pos = torch.cat([keep.nonzero().reshape(-1), torch.arange(s, s + t)])
        plain = _plain_fastv_logits(model, step_inputs, keep_pos)[:, -1]
        torch.testing.assert_close(step_scores, plain, atol=2e-5, rtol=1e-4, msg=f"step {t}")


def test_manual_decode_with_explicit_mask(tiny4, tiny4_eager):
    """Prefill without an attention mask, then decode steps that pass one: masks follow the pruned cache."""
    model, processor = tiny4
    inputs = batch_inputs(processor, [(120, 200)], seeds=[5])
    image_mask = inputs["input_ids"] == model.config.image_token_id
    keep = _plain_keep(_eager_scores(tiny4_eager[0], inputs, K), image_mask, 0.1)[0]
    ids = inputs["input_ids"]
    s = ids.shape[1]
    with apply_method(model, processor, "fastv", ratio=0.1), torch.no_grad():
        out = model(input_ids=ids, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                    use_cache=True)  # fmt: skip
        cache = getattr(out, "cache", None) or out.past_key_values
        key = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
        seq = ids
        for t in range(3):
            nxt = out.logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], dim=1)
            out = model(input_ids=nxt, attention_mask=torch.ones_like(seq), use_cache=True, **{key: cache})
            step_inputs = {**inputs, "input_ids": seq, "attention_mask": torch.ones_like(seq)}
            keep_pos = torch.cat([keep.nonzero().reshape(-1), torch.arange(s, s + t + 1)])
            plain = _plain_fastv_logits(model, step_inputs, keep_pos)[:, -1]
            torch.testing.assert_close(out.logits[:, -1], plain, atol=2e-5, rtol=1e-4, msg=f"step {t}")


def test_batch_equals_alone(tiny4):
    """Different image sizes keep different counts; the padded pruned batch gives each sample its own result."""
    model, processor = tiny4
    counts = assert_llm_batch_equals_alone(
        model, processor, "fastv", [(100, 180), (200, 64)], lambda p: p.num_tokens, ratio=0.25
    )
    assert counts[0] != counts[1]


def test_remove_restores_outputs(tiny4):
    model, processor = tiny4
    inputs = batch_inputs(processor, [(100, 180)])
    with torch.no_grad():
        before = model(**inputs).logits
        gc = apply_method(model, processor, "fastv", ratio=0.1)
        assert not torch.allclose(model(**inputs).logits, before)
        gc.remove()
        gc.remove()
        assert torch.equal(model(**inputs).logits, before)
    with pytest.raises(ValueError, match="already applied"):
        with apply_method(model, processor, "fastv", ratio=0.1):
            globalcom2.apply(model, processor, ratio=0.1)


def test_globalcom2_fastv_uses_globalcom2_budgets(tiny4):
    """Per-crop counts and r_j come from GlobalCom²'s allocation; FastV's scores choose inside each region."""
    model, processor = tiny4
    ratio = 0.25
    size = (120, 200)
    inputs = batch_inputs(processor, [size])
    with globalcom2.apply(model, processor, ratio=ratio) as gc, torch.no_grad():
        model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        ref = gc.plans[0]
    with apply_method(model, processor, "globalcom2+fastv", ratio=ratio) as gc, torch.no_grad():
        model(**inputs)
        plan = gc.plans[0]
        scores = gc.adapter.pruner.last_scores[0]
        lay = image_token_layout(gc.adapter.geometry(size))
    # r_j: the same as an independent allocation from the plain [CLS] thumbnail logits
    tower = model.model.vision_tower
    layer = (
        tower.vision_model.encoder.layers[-1] if hasattr(tower, "vision_model") else tower.encoder.layers[-1]
    )
    pv = inputs["pixel_values"][0, : 1 + ref.num_crops]
    with torch.no_grad():
        hidden = tower(pv, output_hidden_states=True).hidden_states[-2]
        x = layer.layer_norm1(hidden)
        heads = model.config.vision_config.num_attention_heads
        q = layer.self_attn.q_proj(x[:1, :1]).view(1, heads, -1)
        k = layer.self_attn.k_proj(x[:1, 1:]).view(1, -1, heads, q.shape[-1])
        thumb = torch.einsum("bhd,bnhd->bhn", q, k).mean(1)[0] * q.shape[-1] ** -0.5
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    r_plain = allocate_ratios(thumb, thumbnail_region_map(g, *ref.grid), ref.num_crops, ratio=ratio)
    torch.testing.assert_close(plan.crop_ratios, r_plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plan.crop_ratios, ref.crop_ratios)
    assert plan.crop_keep_counts.tolist() == ref.crop_keep_counts.tolist()
    assert int(plan.thumbnail_mask.sum()) == int(ref.thumbnail_mask.sum())
    assert plan.num_tokens == ref.num_tokens  # newlines kept: exactly GlobalCom²'s budget count
    # inside every crop the kept tokens are that crop's top-k_j by FastV score
    img_scores = scores[inputs["input_ids"][0] == model.config.image_token_id]
    kept_cells = plan.crops_mask.reshape(-1)
    for j in range(ref.num_crops):
        sel = lay.region == j + 1
        k = int(ref.crop_keep_counts[j])
        top = lay.cell[sel][img_scores[sel].argsort(descending=True)[:k]]
        assert set(top.tolist()) == set(kept_cells.nonzero().reshape(-1)[torch.isin(
            kept_cells.nonzero().reshape(-1), lay.cell[sel])].tolist()), j  # fmt: skip
    assert not torch.equal(plan.crops_mask, ref.crops_mask)  # FastV chose differently from GlobalCom²


def test_generate_runs_for_globalcom2_fastv(tiny4):
    model, processor = tiny4
    inputs = batch_inputs(processor, [(100, 180), (150, 150)])
    with apply_method(model, processor, "globalcom2+fastv", ratio=0.1) as gc, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3 and len(gc.plans) == 2


def test_group_topk_keep_and_options():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.8], [0.2, 0.1, 0.7, 0.6, 0.0]])
    groups = torch.tensor([[-1, 0, 0, 1, 1], [2, 2, 2, -1, 2]])
    keep = group_topk_keep(scores, groups, torch.tensor([1, 2, 2]))
    assert keep.tolist() == [[True, True, False, True, True], [True, False, True, True, False]]
    # the tie rule of globalcom2.core.select: among equal scores the earlier position wins
    ties = torch.tensor([[0.5, 0.5, 0.5, 0.9, 0.5, 0.5]])
    keep = group_topk_keep(ties, torch.tensor([[1, 0, 1, 0, 0, 1]]), torch.tensor([2, 1]))
    assert keep.tolist() == [[True, True, False, True, False, False]]
    assert not group_topk_keep(ties, torch.zeros(1, 6, dtype=torch.long), torch.tensor([0])).any()
    assert layer_ratio(0.25, 2, 32, equivalent=False) == 0.25
    assert layer_ratio(0.1, 2, 32, equivalent=True) == pytest.approx((3.2 - 2) / 30)
    with pytest.raises(ValueError, match="equivalent"):
        layer_ratio(0.05, 2, 32, equivalent=True)


def test_bad_options(tiny4):
    model, processor = tiny4
    with pytest.raises(ValueError, match="`layer` must be in"):
        apply_method(model, processor, "fastv", ratio=0.25, layer=4)
    with pytest.raises(TypeError, match="unknown option"):
        apply_method(model, processor, "fastv", ratio=0.25, alpha=0.3)
    with pytest.raises(ValueError, match="`method` must be one of"):
        apply_method(model, processor, "fastvv", ratio=0.25)
    assert getattr(model, "_globalcom2_handle", None) is None
    with apply_method(
        model, None, "fastv", ratio=0.25
    ) as gc:  # the LLM-side methods leave the processor alone
        assert gc.processor is None and gc.method_options == {"ratio": 0.25, "layer": 2, "equivalent": False}
    with pytest.raises(ValueError, match="needs the processor"):
        apply_method(model, None, "fastervlm", ratio=0.25)
    assert getattr(model, "_globalcom2_handle", None) is None


@pytest.mark.parametrize("method", ["fastv", "globalcom2+fastv"])
def test_threads_share_one_patched_model(tiny4, method):
    """3 threads x 2 greedy generate calls on one patched model equal the same calls run one at a time."""
    model, processor = tiny4
    sizes = [(100, 180), (150, 150), (200, 64), (120, 200), (64, 64), (180, 100)]
    jobs = [batch_inputs(processor, [size], seeds=[10 + i]) for i, size in enumerate(sizes)]
    with apply_method(model, processor, method, ratio=0.25) as gc, torch.no_grad():
        assert isinstance(
            gc.adapter, {"fastv": FastVAdapter, "globalcom2+fastv": GlobalComFastVAdapter}[method]
        )

        def run(i):
            out = model.generate(**jobs[i], max_new_tokens=5, do_sample=False)
            plan = gc.plans[0]  # this thread's own last forward
            return out, (plan.num_tokens, plan.thumbnail_mask.clone(), plan.crops_mask.clone())

        alone = [run(i) for i in range(len(jobs))]
        together: list = [None] * len(jobs)
        errors: list = []
        start = threading.Barrier(3)

        def worker(t):
            try:
                start.wait()
                for i in (t, t + 3):
                    together[i] = run(i)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert not errors, errors
    for i, ((out_a, plan_a), (out_t, plan_t)) in enumerate(zip(alone, together, strict=True)):
        assert torch.equal(out_a, out_t), i  # bit-identical greedy tokens
        assert (
            plan_a[0] == plan_t[0] and torch.equal(plan_a[1], plan_t[1]) and torch.equal(plan_a[2], plan_t[2])
        )
    assert len({o[0].shape[1] for o in alone}) > 1  # the prompts really differ in length


def test_globalcom2_fastv_needs_the_vision_pass(tiny4):
    """Precomputed features skip GlobalCom²'s scoring: a clear error instead of stale per-crop counts."""
    model, processor = tiny4
    inputs = batch_inputs(processor, [(100, 180)])
    with torch.no_grad():
        feats = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], return_dict=True
        )
    text = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with apply_method(model, processor, "globalcom2+fastv", ratio=0.25), torch.no_grad():
        model(**inputs)  # a vision pass first: its plans must not be reused below
        with pytest.raises(RuntimeError, match="not scored by the vision tower"):
            model(**text, mm_encoder_outputs={"image": feats})
    with apply_method(model, processor, "fastv", ratio=0.25) as gc, torch.no_grad():
        model(**text, mm_encoder_outputs={"image": feats})  # FastV alone only needs the sizes
        assert gc.plans[0].num_tokens == int(gc.plans[0].num_tokens_full * 0.25)
