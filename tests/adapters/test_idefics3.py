"""GlobalCom² on real (tiny, random) Idefics3ForConditionalGeneration and SmolVLMForConditionalGeneration.

Both families run every test (a module fixture per family); the family-generic checks (apply/remove bit-exact,
batches, threads, tie rule, error classes) are in test_families.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import globalcom2
from globalcom2.adapters import idefics3 as idefics3_module
from globalcom2.adapters.internvl import GRID_KEY, merge_pool
from tests.adapters.families import standin_tower_or_skip, visualize_standin_plan
from tests.adapters.plain_families import (
    capture_llm_inputs,
    check_tiles_plan,
    forward_and_capture,
    plain_cosine,
    plain_idefics3_image_text,
    plain_internvl_sequence,
    plain_pool,
    spy,
)
from tests.conftest import random_image

# (height, width): the long side is resized to 3 crops (192 px), so the grids are 1x3, 2x3, 3x3, 3x2, 3x1
SIZES = [
    (120, 200), (200, 120), (150, 150), (60, 190), (190, 60), (30, 500), (500, 30), (64, 64), (100, 130),
    (40, 41), (300, 290), (129, 64),
]  # fmt: skip
PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
ALLOCATIONS = ("softmax-sum", "softmax-max", "topk-count", "uniform")
BUILDERS = {"idefics3": "build_tiny_idefics3", "smolvlm": "build_tiny_smolvlm"}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def fam_dir(request, checkpoint):
    from globalcom2.demo import tiny_idefics3

    name = request.param
    return name, checkpoint(getattr(tiny_idefics3, BUILDERS[name]))  # shared with the family table


@pytest.fixture()
def fam(fam_dir):
    from globalcom2.loading import load_tiny_family

    name, path = fam_dir
    return (name, *load_tiny_family(path))


def _inputs(name, processor, images, prompts=None, **kwargs):
    """Processor call with one prompt per image (SmolVLM wants one list of images per prompt)."""
    prompts = prompts or [PROMPT] * len(images)
    if name == "smolvlm" and not isinstance(images[0], list):
        images = [[image] for image in images]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True, **kwargs)


def _geometry(model) -> tuple[int, int, int]:
    """(N tokens per crop, g merged tokens per side, shuffle factor)."""
    vc = model.config.vision_config
    s = int(model.config.scale_factor)
    g = vc.image_size // vc.patch_size // s
    return g * g, g, s


def _tiles(rows: int, cols: int) -> int:
    return 1 if rows * cols == 1 else rows * cols + 1


def _encode(model, inputs):
    return model.model.get_image_features(
        inputs["pixel_values"], inputs["pixel_attention_mask"], **{GRID_KEY: inputs[GRID_KEY]}
    ).pooler_output


# -- the counts ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1])
def test_processor_count_equals_features_for_many_sizes(fam, ratio):
    """Budget mode: the processor's placeholder count == the features == int(N*R) + int(R*n*N) (unsplit images:
    int(N*R)); the prompt shrinks by exactly the tokens saved (markers kept); Idefics3's serving count agrees."""
    name, model, processor = fam
    n, _, _ = _geometry(model)
    token = model.config.image_token_id
    images = [random_image(*s, seed=k) for k, s in enumerate(SIZES)]
    for split in (True, False):
        kwargs = {} if split else {"do_image_splitting": False}
        full = _inputs(name, processor, images, **kwargs)
        # Idefics3's serving count; not with per-call kwargs: transformers 5.19 keeps them for later calls
        serving = getattr(processor, "_get_num_multimodal_tokens", None) if split else None
        full_serving = serving(image_sizes=SIZES, **kwargs).num_image_tokens if serving else None
        with globalcom2.apply(model, processor, ratio=ratio) as gc:
            inputs = _inputs(name, processor, images, **kwargs)
            with torch.no_grad():
                feats = _encode(model, inputs)
            plans = list(gc.plans)
            served = (
                processor._get_num_multimodal_tokens(image_sizes=SIZES, **kwargs).num_image_tokens
                if serving
                else None
            )
        assert GRID_KEY not in full and len(plans) == len(SIZES)
        # one (kept, D) tensor per prompt (transformers < 5.20: one (all kept, 1, D) tensor)
        rows_per_image = [f.shape[0] for f in feats] if isinstance(feats, (list, tuple)) else None
        assert rows_per_image is not None or feats.shape[0] == sum(p.num_tokens for p in plans)
        counted = (inputs["input_ids"] == token).sum(1).tolist()
        full_counted = (full["input_ids"] == token).sum(1).tolist()
        saved = (full["attention_mask"].sum(1) - inputs["attention_mask"].sum(1)).tolist()
        for k, (rows, cols) in enumerate(inputs[GRID_KEY].tolist()):
            tiles = _tiles(rows, cols)
            expected = int(n * ratio) + (int(ratio * ((tiles - 1) * n)) if tiles > 1 else 0)
            plan = plans[k]
            assert counted[k] == plan.num_tokens == expected, SIZES[k]
            assert rows_per_image is None or rows_per_image[k] == expected
            assert full_counted[k] == plan.num_tokens_full == tiles * n, SIZES[k]
            assert saved[k] == plan.num_tokens_full - plan.num_tokens
            assert plan.grid == ((rows, cols) if tiles > 1 else (0, 0))
            assert split or tiles == 1
            if served is not None:
                assert full_serving[k] - served[k] == saved[k]


def test_merge_pool_groups_the_patches_pixel_shuffle_merges(fam):
    """The score of a merged token sums exactly the s x s patches HF's connector folds into it."""
    _, model, _ = fam
    _, g, s = _geometry(model)
    p = g * s
    index = torch.arange(p * p, dtype=torch.float64).reshape(1, p * p, 1)
    merged = model.model.connector.pixel_shuffle(index, s)[0]  # (g*g, s*s): the patch ids in each token
    members = merge_pool(torch.eye(p * p, dtype=torch.float64), s)  # (patch, token) membership
    for t in range(g * g):
        assert sorted(merged[t].long().tolist()) == members[:, t].nonzero().reshape(-1).tolist(), t


# -- scores, kept set and the LLM's sequence against the plain re-implementation ----------------------------------
def _capture_llm_inputs(model):
    """Pre-hooks recording what the inner model and the LLM receive (input ids, mask, embeddings)."""
    return capture_llm_inputs(model.model, model.model.text_model)


@pytest.mark.parametrize("mode, ratio", [("reference", 0.25), ("budget", 0.1), ("budget", 0.5)])
def test_kept_tokens_and_sequence_match_plain(fam, monkeypatch, mode, ratio):
    """Eq. 7 on the connector's input, its s x s pooling, the kept sets, the per-crop counts, the prompt the LLM
    reads (markers, runs, newlines) and the features at every placeholder equal a plain re-implementation, for
    every allocation and scoring. The selection is replayed from the pooled scores the library used (checked
    against the plain ones first), so that a one-ulp float32 difference cannot flip a near-tie."""
    name, model, processor = fam
    n, g, s = _geometry(model)
    token = model.config.image_token_id
    sizes = SIZES[:6] + [(64, 64)]
    images = [random_image(*hw, seed=k) for k, hw in enumerate(sizes)]
    used_patch = spy(monkeypatch, idefics3_module, "cosine_scores")
    used = spy(monkeypatch, idefics3_module, "merge_pool")
    checked_scores = False
    for allocation in ALLOCATIONS:
        for scoring in ("holistic", "local", "global"):
            for k, image in enumerate(images):
                split = k < len(images) - 1  # the last image goes in unsplit
                kwargs = {} if split else {"do_image_splitting": False}
                with globalcom2.apply(
                    model, processor, ratio=ratio, mode=mode, allocation=allocation, scoring=scoring
                ) as gc:
                    inputs = _inputs(name, processor, [image], **kwargs)
                    grid = [max(v, 1) for v in inputs[GRID_KEY][0].tolist()]
                    del used[:], used_patch[:]
                    seen = forward_and_capture(model, inputs, _capture_llm_inputs(model))
                    plan = gc.plans[0]
                pv = inputs["pixel_values"].reshape(-1, *inputs["pixel_values"].shape[2:])
                with torch.no_grad():
                    raw = (
                        type(model.model)
                        .get_image_features(model.model, inputs["pixel_values"])
                        .pooler_output
                    )
                    raw = torch.cat(list(raw)).reshape(-1, raw[0].shape[-1])  # (tiles * N, D), one image
                    if not checked_scores:  # Eq. 7 per patch on the tower's output, pooled per s x s group
                        tower_out = model.model.vision_model(pixel_values=pv).last_hidden_state
                        np.testing.assert_allclose(used_patch[0].numpy(), plain_cosine(tower_out), atol=2e-6)
                        np.testing.assert_allclose(
                            used[0].numpy(), plain_pool(used_patch[0].numpy(), s), rtol=1e-5, atol=1e-6
                        )
                        checked_scores = True
                scores = used[0].numpy()
                rows, cols = grid
                tiles = _tiles(rows, cols)
                where = f"{name} {sizes[k]} R={ratio} {mode} {allocation} {scoring}"
                order, keep, ks, k0 = check_tiles_plan(
                    plan, scores[-1], scores[:-1], (rows, cols), g, ratio, mode, allocation, scoring, where
                )
                seq = order if keep is None else plain_internvl_sequence(order, keep, (rows, cols), g)
                # The prompt the LLM reads: the processor's text with this image's runs at their plain lengths.
                text = PROMPT.replace(
                    "<image>", plain_idefics3_image_text((rows, cols) if tiles > 1 else (0, 0), ks, k0)
                )
                expected_ids = processor.tokenizer(text)["input_ids"]
                ids = seen["input_ids"][0][seen["attention_mask"][0].bool()].tolist()
                assert ids == expected_ids, where
                embeds = seen["inputs_embeds"][0][seen["input_ids"][0] == token]
                torch.testing.assert_close(embeds, raw[seq].to(embeds.dtype), msg=where)


# -- the model end to end -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["budget", "reference"])
def test_generate_forward_with_labels_and_pipeline(fam, mode):
    from transformers import pipeline

    name, model, processor = fam
    with globalcom2.apply(model, processor, ratio=0.25, mode=mode) as gc:
        inputs = _inputs(name, processor, [random_image(120, 200)])
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 4
        assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])  # the caller's prompt
        labels = inputs["input_ids"].clone()
        labels[labels == model.config.image_token_id] = -100
        res = model(**inputs, labels=labels)
        assert torch.isfinite(res.loss)
        assert gc.plans[0].num_tokens < gc.plans[0].num_tokens_full
        pipe = pipeline("image-text-to-text", model=model, processor=processor)
        got = pipe(images=random_image(90, 200, seed=2), text=PROMPT, max_new_tokens=3, do_sample=False)
        assert isinstance(got, list) and "generated_text" in got[0]
        assert gc.plans[0].grid == (2, 3) and gc.plans[0].num_tokens < gc.plans[0].num_tokens_full


@pytest.mark.parametrize("mode", ["budget", "reference"])
def test_multi_image_prompts_and_beam_search(fam, mode):
    """A prompt with two images of different grids next to a one-image prompt: every image has its own plan and
    count, and the batch (with beam search) gives what each prompt gives alone."""
    name, model, processor = fam
    n, _, _ = _geometry(model)
    two = "USER: <image> and <image>\nCompare them. ASSISTANT:"
    images = [[random_image(120, 200), random_image(190, 60, seed=1)], [random_image(150, 150, seed=2)]]
    prompts = [two, PROMPT]
    token = model.config.image_token_id
    with globalcom2.apply(model, processor, ratio=0.25, mode=mode) as gc:
        if name == "smolvlm":
            batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        else:
            batch = processor(images=images[0] + images[1], text=prompts, return_tensors="pt", padding=True)
        assert batch[GRID_KEY].tolist() == [[2, 3], [3, 1], [3, 3]]
        out = model.generate(**batch, max_new_tokens=4, num_beams=2, do_sample=False)
        plans = list(gc.plans)
        assert [p.grid for p in plans] == [(2, 3), (3, 1), (3, 3)]
        if mode == "budget":
            assert (batch["input_ids"] == token).sum(1).tolist() == [
                plans[0].num_tokens + plans[1].num_tokens,
                plans[2].num_tokens,
            ]
            assert plans[0].num_tokens == int(n * 0.25) + int(0.25 * 6 * n)
        for k, (imgs, prompt) in enumerate(zip(images, prompts, strict=True)):
            single = processor(
                images=imgs if name != "smolvlm" else [imgs], text=[prompt], return_tensors="pt"
            )
            o = model.generate(**single, max_new_tokens=4, num_beams=2, do_sample=False)
            assert (
                o[0, single["input_ids"].shape[1] :].tolist()
                == out[k, batch["input_ids"].shape[1] :].tolist()
            )


def test_pre_encoded_features_with_budget_prompts_are_refused_not_mislabelled(fam):
    """Budget prompts carry a provisional per-crop split; only the model's own forward/generate move the markers
    to the scores' split. Scattering pre-encoded features into the processor's prompt directly is refused."""
    name, model, processor = fam
    image = random_image(120, 200)
    with globalcom2.apply(model, processor, ratio=0.5, tau=1e-3) as gc:  # a sharp softmax: an uneven split
        inputs = _inputs(name, processor, [image])
        with torch.no_grad():
            feats = model.model.get_image_features(
                inputs["pixel_values"], inputs["pixel_attention_mask"], **{GRID_KEY: inputs[GRID_KEY]},
                return_dict=True,
            )  # fmt: skip
            plan = gc.plans[0]
            assert plan.crop_keep_counts.tolist() != gc.adapter.emitted_runs((2, 3))[:-1]  # an uneven split
            with pytest.raises(globalcom2.PlaceholderMismatchError, match="do not line up"):
                model.model(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    mm_encoder_outputs={"image": feats},
                )  # fmt: skip
            model(**inputs)  # the model's own forward realigns the markers


def test_tiles_without_grids_are_refused(fam):
    """More tiles than the grids account for (e.g. video frames mixed in): refused, not guessed."""
    name, model, processor = fam
    with globalcom2.apply(model, processor, ratio=0.25):
        inputs = _inputs(name, processor, [random_image(120, 200)])
        extra = torch.cat([inputs["pixel_values"], inputs["pixel_values"][:, :1]], dim=1)
        with pytest.raises(NotImplementedError, match="mixes videos and images"):
            model.model.get_image_features(extra, **{GRID_KEY: inputs[GRID_KEY]})


def test_bad_inputs_leave_the_model_unpatched(fam, tiny):
    name, model, processor = fam
    _, next_processor = tiny
    with pytest.raises(TypeError, match="processor must be a"):
        globalcom2.apply(model, next_processor, ratio=0.5)
    for mode in ("budget", "reference"):
        with pytest.raises(
            ValueError, match=f"mode='{mode}' needs the processor: the model never sees the crop"
        ):
            globalcom2.apply(model, None, ratio=0.5, mode=mode)
    with pytest.raises(ValueError, match="has none"):
        globalcom2.apply(model, processor, ratio=0.5, importance="cls")  # SigLIP: no [CLS]
    processor.image_seq_len += 1
    with pytest.raises(globalcom2.IncompatibleProcessorError, match="image_seq_len"):
        globalcom2.apply(model, processor, ratio=0.5)
    processor.image_seq_len -= 1
    assert not {"get_image_features", "inputs_merger", "get_placeholder_mask", "forward"} & set(
        model.model.__dict__
    )
    assert not {"_process_images", "replace_image_token"} & set(processor.__dict__)
    globalcom2.apply(model, processor, ratio=0.5).remove()


def test_workflows_plan_and_overlay(fam):
    from globalcom2.workflows import default_prompt, plan_for_image, render_plan

    name, model, processor = fam
    image = random_image(120, 200)
    plan = plan_for_image(model, processor, image, ratio=0.25)
    assert plan.grid == (2, 3) and plan.num_tokens < plan.num_tokens_full
    pic = render_plan(image, plan, model, f"tiny {name}")
    assert pic.width > 200
    assert "<image>" in default_prompt(processor, "What?")


# -- the command line (real subprocesses) and the stand-in --------------------------------------------------------
def test_cli_ask_on_a_tiny_checkpoint(fam_dir, tmp_path):
    """Loads through AutoModelForImageTextToText and the processor fallback (SmolVLM: no torchvision)."""
    from tests.test_cli import run_cli

    name, path = fam_dir
    photo = tmp_path / "photo.png"
    random_image(120, 200, seed=3).save(photo)
    res = run_cli("ask", "--model", str(path), "--image", str(photo), "--ratio", "0.25", "--max-new-tokens", "3",
                  "--json", "What is shown?")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout)
    assert data["grid"] == [2, 3] and data["image_tokens"] == 4 + 24 < data["image_tokens_full"] == 7 * 16


@pytest.mark.slow
def test_dinov2_standin_in_the_idefics3_tower_is_dinov2_on_the_patches():
    """The stand-in's weights in Idefics3VisionTransformer (LayerScale folded, no [CLS]) compute DINOv2's own
    layers on the patch tokens alone."""
    from globalcom2.demo.tiny_idefics3 import standin_idefics3_vision_model

    dinov2 = standin_tower_or_skip(378)
    tower = standin_idefics3_vision_model(378, dinov2=dinov2)
    x = torch.randn(2, 3, 378, 378, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb = dinov2.embeddings.patch_embeddings(x) + dinov2.embeddings.position_embeddings[:, 1:]
        for layer in dinov2.encoder.layer:
            emb = layer(emb)[0] if isinstance(layer(emb), tuple) else layer(emb)
        expected = dinov2.layernorm(emb)
        got = tower(x).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_cli_visualize_smolvlm_standin(tmp_path):
    """`visualize --model standin --family smolvlm`: the DINOv2 stand-in in SmolVLM's geometry, a real photo."""
    plan = visualize_standin_plan("smolvlm", tmp_path / "kept.png")
    assert plan["grid"] == [3, 4] and plan["num_tokens_full"] == 13 * 81
    assert plan["num_tokens"] == int(81 * 0.25) + int(0.25 * 12 * 81)
