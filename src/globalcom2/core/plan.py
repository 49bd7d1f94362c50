"""The `Plan` record: which visual tokens of one image survive compression (paper Eq. 6), in every family.

Masks are the canonical record; visualisation, tests and the emission order are derived from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _empty_long() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long)


@dataclass
class Plan:
    """Kept-token record of one image; every family fills in the same fields.

    Attributes:
        grid: ``(rows, cols)`` of local crops (``(0, 0)`` for an image encoded as a single tile).
        thumbnail_mask: Bool ``(g, g)``; True = kept thumbnail (global view) token.
        crops_mask: Bool ``(rows*g, cols*g)``: the crops drawn in image layout on the family's per-tile grid
            (patches, or merged tokens where the family merges them); padded cells are False.
        crop_ratios: ``(rows*cols,)`` retention ratio r_j per crop, row-major (paper Eq. 4).
        num_tokens: image tokens handed to the LLM, layout tokens (newlines) included.
        num_tokens_full: the same count without compression.
        valid_box: ``(top, bottom, left, right)`` of the unpadded area of the crop grid.
        crop_keep_counts: Long ``(rows*cols,)`` tokens kept per crop.
        crop_valid_counts: Long ``(rows*cols,)`` valid (unpadded) tokens N_j per crop.
        mode: ``"budget"`` or ``"reference"``.
        thumbnail_order: kept thumbnail token indices (flattened ``g*g``) in the order they are emitted.
        token_mask: family extra: Bool ``(H, W)`` kept crop tokens on the grid the LLM receives, when that grid
            is not ``crops_mask``'s (a family that down-samples large crop grids); None otherwise.
        token_grid: family extra: ``(H, W)`` of ``token_mask``; None otherwise.
        ratio: the retention ratio R this image was compressed at: the configured one, or its own under
            ``max_image_tokens`` (1.0: left whole); None where a method has no single R (LLM-side pruning).
        layer_tokens: LLM-side methods: the image tokens of this image that each LLM layer sees (length L; the
            masks record the tokens that reach the last layer); None for pre-LLM methods.
    """

    grid: tuple[int, int]
    thumbnail_mask: torch.Tensor
    crops_mask: torch.Tensor
    crop_ratios: torch.Tensor
    num_tokens: int
    num_tokens_full: int
    valid_box: tuple[int, int, int, int] = (0, 0, 0, 0)
    crop_keep_counts: torch.Tensor = field(default_factory=_empty_long)
    crop_valid_counts: torch.Tensor = field(default_factory=_empty_long)
    mode: str = "budget"
    thumbnail_order: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    token_grid: tuple[int, int] | None = None
    ratio: float | None = None
    layer_tokens: tuple[int, ...] | None = None

    @property
    def patches_per_side(self) -> int:
        return int(self.thumbnail_mask.shape[0])

    @property
    def num_crops(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def keep_ratio(self) -> float:
        """Share of the uncompressed image tokens that reach the LLM."""
        return self.num_tokens / max(self.num_tokens_full, 1)

    def summary(self) -> dict:
        """JSON-friendly summary (counts and per-crop ratios)."""
        crops = self.token_mask if self.token_mask is not None else self.crops_mask
        out = {
            "grid": list(self.grid),
            "mode": self.mode,
            "num_tokens": self.num_tokens,
            "num_tokens_full": self.num_tokens_full,
            "keep_ratio": round(self.keep_ratio, 4),
            "thumbnail_kept": int(self.thumbnail_mask.sum()),
            "crops_kept": int(crops.sum()),
            "crop_ratios": [round(float(r), 4) for r in self.crop_ratios],
            "crop_keep_counts": [int(c) for c in self.crop_keep_counts],
            "crop_valid_counts": [int(c) for c in self.crop_valid_counts],
        }
        if self.token_grid is not None:
            out["token_grid"] = list(self.token_grid)
        if self.ratio is not None:
            out["ratio"] = self.ratio
        if self.layer_tokens is not None:
            out["layer_tokens"] = list(self.layer_tokens)
            out["mean_layer_tokens"] = round(sum(self.layer_tokens) / max(len(self.layer_tokens), 1), 4)
        return out
