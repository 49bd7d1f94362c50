"""The pooling baseline on the native-resolution families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5).

The image's ``H x W`` merged tokens are average-pooled to ``a x b`` tokens, ``a = max(1, floor(H*sqrt(R) + 1/2))``
(:func:`~globalcom2.methods.vision.pooled_side`, the rule of the tiled families' pooling), row ``y`` going to bin
``y*a // H`` and column ``x`` to ``x*b // W``. Nothing is discarded: every token is averaged into one pooled token.

**Positions.** A pooled token stands at the uncompressed M-RoPE position of its bin's centre token (row
``(first + last) // 2`` of the bin, likewise for columns), and the text after the image keeps its uncompressed
positions: the plan's ``crops_mask`` marks those centre tokens, so the adapter's position rule
(:func:`globalcom2.adapters.qwen.expand_kept_tokens`) serves pooling unchanged. Qwen3-VL's deepstack features are
pooled the same way.

The count, ``a * b`` per image, is a function of the merged grid and R, so the processor emits it before the forward.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from ..adapters.base import GlobalComHandle
from ..core.plan import Plan
from .vision import PoolingPlan, pooled_side


def pooling_bins(height: int, width: int, ratio: float) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """``(a, b, bin of every token (H*W,), centre tokens Bool (H, W))`` of the pooling rule (module docstring)."""
    a, b = pooled_side(height, ratio), pooled_side(width, ratio)
    rows, cols = (torch.arange(height) * a) // height, (torch.arange(width) * b) // width

    def centres(bins: torch.Tensor, n: int) -> torch.Tensor:
        first = torch.zeros(n, dtype=torch.long).scatter_reduce(
            0, bins, torch.arange(bins.numel()), "amin", include_self=False
        )
        last = torch.zeros(n, dtype=torch.long).scatter_reduce(
            0, bins, torch.arange(bins.numel()), "amax", include_self=False
        )
        return (first + last) // 2

    centre = torch.zeros(height, width, dtype=torch.bool)
    centre[centres(rows, a)[:, None], centres(cols, b)[None, :]] = True
    return a, b, (rows[:, None] * b + cols[None, :]).reshape(-1), centre


class NativePooling:
    """The pooling baseline, put in front of a native-resolution family adapter (:func:`native_pooling_class`,
    :func:`globalcom2.methods.pooling.pooling_class`)."""

    config: Any

    def num_image_tokens(self, height: int, width: int) -> int:
        """Pooled tokens ``a * b`` of one image of ``height x width`` merged tokens."""
        r = self.ratio_for_image(height, width)  # type: ignore[attr-defined]
        return pooled_side(height, r) * pooled_side(width, r)

    def ratio_for_image(self, height: int, width: int) -> float:
        if self.config.max_image_tokens is None:
            return float(self.config.ratio)
        from ..core.budget import largest_fitting_ratio

        return largest_fitting_ratio(
            lambda r: pooled_side(height, r) * pooled_side(width, r), self.config.max_image_tokens
        )

    def plan_images(
        self, features: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]]
    ) -> list[tuple[Plan, torch.Tensor]]:
        """One plan per image; the index is every token's pooled bin (``(H*W,)``), not a selection."""
        out: list[tuple[Plan, torch.Tensor]] = []
        for f, (h, w) in zip(features, grids, strict=True):
            ratio = self.ratio_for_image(h, w)
            a, b, bins, centre = pooling_bins(h, w, ratio)
            device = f.device
            plan = PoolingPlan(
                grid=(1, 1), thumbnail_mask=torch.zeros(0, 0, dtype=torch.bool, device=device),
                crops_mask=centre.to(device), crop_ratios=torch.tensor([a * b / (h * w)], device=device),
                num_tokens=a * b, num_tokens_full=h * w, valid_box=(0, h, 0, w),
                crop_keep_counts=torch.tensor([a * b], device=device),
                crop_valid_counts=torch.tensor([h * w], device=device), mode="budget",
                thumbnail_order=torch.zeros(0, dtype=torch.long, device=device), ratio=ratio,
                crops_cover=bins.reshape(h, w).to(device), pooled_shape=(a, b),
            )  # fmt: skip
            out.append((plan, bins.to(device)))
        return out

    def _select(
        self, handle: GlobalComHandle, features: tuple, deepstack: list | None, grids: list[tuple[int, int]]
    ) -> tuple[tuple, list | None]:
        planned = self.plan_images(list(features), grids)

        def pool(f: torch.Tensor, plan: Plan, bins: torch.Tensor) -> torch.Tensor:
            sums = f.new_zeros(plan.num_tokens, f.shape[-1], dtype=torch.float32).index_add_(
                0, bins, f.float()
            )
            counts = torch.bincount(bins, minlength=plan.num_tokens).clamp_min(1)
            return (sums / counts[:, None]).to(f.dtype)

        pooled = tuple(pool(f, p, i) for f, (p, i) in zip(features, planned, strict=True))
        if deepstack is not None:
            deepstack = [
                tuple(pool(f, p, i) for f, (p, i) in zip(layer, planned, strict=True)) for layer in deepstack
            ]
        handle.publish([plan for plan, _ in planned])
        return pooled, deepstack


@functools.cache
def native_pooling_class(family: type) -> type:
    """The pooling baseline's adapter class on a native-resolution ``family`` (one class per family)."""
    return type(f"Pooling{family.__name__}", (NativePooling, family), {})
