"""Token selection inside tiles (paper Eq. 5-6) and the order in which kept tokens reach the LLM.

All functions work on every crop of an image at once: scores ``(n, g*g)``, per-crop counts ``(n,)``.
"""

from __future__ import annotations

import torch

from .geometry import grid_to_tiles, tiles_to_grid

SCORINGS = ("holistic", "local", "global")


def _l2_normalise(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    x = torch.where(valid, x, torch.zeros_like(x))
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _wide(x: torch.Tensor) -> torch.Tensor:
    # float64 keeps distinct float32 scores distinct after normalisation, so top-k does not hinge on rounding
    # (MPS has no float64).
    return x.float() if x.device.type == "mps" else x.double()


def holistic_scores(
    local: torch.Tensor, global_: torch.Tensor, valid: torch.Tensor, *, scoring: str, alpha: float
) -> torch.Tensor:
    """Token scores inside each crop (paper Eq. 5), each source L2-normalised over the crop's valid tokens.

    Args:
        local: ``(n, g*g)`` each crop's own scores s^L.
        global_: ``(n, g*g)`` the thumbnail's resized sub-map s^G for each crop.
        valid: Bool ``(n, g*g)`` unpadded tokens.
        scoring: ``"holistic"`` (alpha * s^G + (1 - alpha) * s^L), ``"local"`` or ``"global"`` (Table 3).
        alpha: weight of the global score.

    Returns:
        ``(n, g*g)`` float64 (float32 on MPS); ``-inf`` on padded tokens.
    """
    if scoring == "holistic":
        s = alpha * _l2_normalise(_wide(global_), valid) + (1 - alpha) * _l2_normalise(_wide(local), valid)
    elif scoring == "local":
        s = _l2_normalise(_wide(local), valid)
    elif scoring == "global":
        s = _l2_normalise(_wide(global_), valid)
    else:
        raise ValueError(f"`scoring` must be one of {SCORINGS}, got {scoring!r}")
    return s.masked_fill(~valid, float("-inf"))


def descending_rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last dim when sorted descending (stable: ties keep index order)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ar = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)


def topk_mask(scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the ``k[j]`` highest scores of every row (paper Eq. 6), vectorised over rows."""
    keep = descending_rank(scores) < k.reshape(-1, *([1] * (scores.dim() - 1)))
    return keep if valid is None else keep & valid


def packed_slots(keep: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Official emission layout of a crop: kept token with valid-list index v is written at tile slot v.

    The official code indexes kept tokens within the crop's *valid-token list* (raster order of the unpadded
    block) and writes them at tile position (v // g, v % g), as if the valid block were packed top-left.

    Args:
        keep, valid: Bool ``(n, g*g)``.

    Returns:
        Long ``(n, g*g)``: at each slot the tile position of the token shown there, or -1 for an empty slot.
    """
    vidx = valid.long().cumsum(-1) - 1
    slots = torch.full_like(vidx, -1)
    src = torch.arange(keep.shape[-1], device=keep.device).expand_as(vidx)
    # Scatter kept tokens to their slots; non-kept entries go to a spare column that is cut off.
    target = torch.where(keep, vidx, torch.full_like(vidx, keep.shape[-1]))
    spare = torch.cat([slots, slots[:, :1]], dim=-1)
    return spare.scatter(-1, target, torch.where(keep, src, -1))[:, :-1]


def emission_index(
    *,
    thumb_order: torch.Tensor,
    crop_slots: torch.Tensor,
    rows: int,
    cols: int,
    newline_rows: torch.Tensor,
) -> torch.Tensor:
    """Indices into ``cat(features.flatten(0, 1), newline)`` giving the token sequence of one image.

    Features are ``(1 + n, g*g, D)`` (tile 0 = thumbnail); index ``(1 + n)*g*g`` is the newline embedding.

    Args:
        thumb_order: Long ``(k0,)`` thumbnail token indices in emission order.
        crop_slots: Long ``(n, g*g)`` tile position shown at each slot, -1 = empty (see :func:`packed_slots`;
            for raster order use the position itself where kept, -1 elsewhere).
        rows, cols: crop grid.
        newline_rows: Bool ``(rows*g,)``: grid rows followed by a newline token.

    Returns:
        Long ``(num_tokens,)``.
    """
    n, gg = crop_slots.shape
    g = int(round(gg**0.5))
    tile = torch.arange(1, n + 1, device=crop_slots.device)[:, None]
    flat = torch.where(crop_slots >= 0, tile * gg + crop_slots, -1)  # (n, g*g) feature row or -1
    grid = tiles_to_grid(flat.reshape(n, g, g), rows, cols)  # (rows*g, cols*g)
    newline = torch.where(newline_rows, (n + 1) * gg, -1)[:, None]
    seq = torch.cat([grid, newline], dim=1).reshape(-1)
    return torch.cat([thumb_order.to(seq), seq[seq >= 0]])


def raster_slots(keep: torch.Tensor) -> torch.Tensor:
    """Slots for true raster order: each kept token stays at its own tile position."""
    pos = torch.arange(keep.shape[-1], device=keep.device).expand_as(keep)
    return torch.where(keep, pos, -1)


__all__ = [
    "SCORINGS",
    "descending_rank",
    "emission_index",
    "grid_to_tiles",
    "holistic_scores",
    "packed_slots",
    "raster_slots",
    "topk_mask",
]
