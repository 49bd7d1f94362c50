"""An independent, plainly written re-implementation of docs/design.md §3 (the official GlobalCom² behaviour).

Written with Python loops and numpy only (no globalcom2 imports, no torch interpolation), to check the
vectorised library code against. Slow on purpose; never used by the library.
"""

from __future__ import annotations

import math

import numpy as np


def unpad_box(h: int, w: int, ch: int, cw: int) -> tuple[int, int, int, int]:
    if w / h > cw / ch:
        new_h = int(round(h * (cw / w), 7))
        p = (ch - new_h) // 2
        return p, ch - p, 0, cw
    new_w = int(round(w * (ch / h), 7))
    p = (cw - new_w) // 2
    return 0, ch, p, cw - p


def bilinear64(src, out_h: int, out_w: int) -> np.ndarray:
    """align_corners=False bilinear resize written out with Python floats (IEEE float64), one cell at a time.

    The documented rule: src = max((i + 0.5) * n_in / n_out - 0.5, 0), i0 = floor(src), i1 = min(i0 + 1, n_in - 1),
    w1 = src - i0 when i1 > i0 else 0 (a clamped sample takes its source value exactly), w0 = 1 - w1; the four
    neighbours are combined along x first, then along y.
    """
    src = np.asarray(src, dtype=np.float64)
    in_h, in_w = src.shape

    def axis(i: int, n_in: int, n_out: int) -> tuple[int, int, float, float]:
        s = max((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = min(int(math.floor(s)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        w1 = s - i0 if i1 > i0 else 0.0
        return i0, i1, 1.0 - w1, w1

    out = np.zeros((out_h, out_w), dtype=np.float64)
    for y in range(out_h):
        y0, y1, wy0, wy1 = axis(y, in_h, out_h)
        for x in range(out_w):
            x0, x1, wx0, wx1 = axis(x, in_w, out_w)
            top = wx0 * float(src[y0, x0]) + wx1 * float(src[y0, x1])
            bot = wx0 * float(src[y1, x0]) + wx1 * float(src[y1, x1])
            out[y, x] = wy0 * top + wy1 * bot
    return out


def stable_top(scores: list[float], k: int) -> list[int]:
    """Indices of the k largest scores; ties go to the lower index."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order[:k]


def plain_reference(
    thumb, crops, grid, size, ratio, allocation="softmax-sum", scoring="holistic", alpha=0.5, tau=10.0
):
    """docs/design.md §3 steps 2-8. thumb: (g*g,), crops: (n, g*g) float32 arrays; size = (H, W).

    Returns (thumb_mask (g, g), crops_mask (rows*g, cols*g), r (n,), thumb_order, counts).
    """
    rows, cols = grid
    n = rows * cols
    gg = len(thumb)
    g = int(round(math.sqrt(gg)))
    thumb = np.asarray(thumb, dtype=np.float32)
    # 2. thumbnail
    k0 = int(gg * ratio)
    thumb_order = stable_top(list(thumb), k0)
    thumb_mask = np.zeros(gg, dtype=bool)
    thumb_mask[thumb_order] = True
    # 3. crop richness over thumbnail regions
    ph, pw = max(g // rows, 1), max(g // cols, 1)
    region_cells = [[] for _ in range(n)]
    for i in range(g):
        for j in range(g):
            region_cells[min(i // ph, rows - 1) * cols + min(j // pw, cols - 1)].append(thumb[i * g + j])
    # 4. allocation
    if allocation == "uniform":
        r = np.full(n, ratio, dtype=np.float64)  # uniform keeps exactly int(N_j * R)
    else:
        if allocation == "softmax-sum":
            s = np.array([np.float32(sum(np.float64(v) for v in c)) for c in region_cells], dtype=np.float32)
            e = np.exp((s - s.max()) / np.float32(tau)).astype(np.float32)
            sigma = e / (e.sum() + np.float32(1e-8))
        elif allocation == "softmax-max":
            s = np.array([max(c) for c in region_cells], dtype=np.float32)
            e = np.exp((s - s.max()) / np.float32(tau)).astype(np.float32)
            sigma = e / (e.sum() + np.float32(1e-8))
        elif allocation == "topk-count":
            counts = np.zeros(n, dtype=np.float32)
            for idx in thumb_order:
                i, j = divmod(idx, g)
                counts[min(i // ph, rows - 1) * cols + min(j // pw, cols - 1)] += 1
            sigma = counts / max(counts.sum(), 1.0)
        else:
            raise ValueError(allocation)
        r = np.minimum(np.float32(ratio) * (1 + sigma - sigma.mean()), 1.0).astype(np.float32)
    # 5. unpadding
    ch, cw = rows * g, cols * g
    top, bottom, left, right = unpad_box(size[0], size[1], ch, cw)
    # 6. global sub-maps: resize to the valid box (the documented float64 bilinear; the official code calls
    # F.interpolate, whose rounding differs between CPUs), cut crop by crop with accumulated offsets
    resized = (
        bilinear64(thumb.reshape(g, g), bottom - top, right - left) if bottom > top and right > left else None
    )
    crops_mask = np.zeros((ch, cw), dtype=bool)
    counts_out = []
    row_off = 0
    for cr in range(rows):
        col_off = 0
        block_h = max(0, min(bottom, (cr + 1) * g) - max(top, cr * g))
        for cc in range(cols):
            j = cr * cols + cc
            r0, r1 = max(top, cr * g), min(bottom, (cr + 1) * g)
            c0, c1 = max(left, cc * g), min(right, (cc + 1) * g)
            h_j, w_j = max(r1 - r0, 0), max(c1 - c0, 0)
            positions = [(y, x) for y in range(r0, r1) for x in range(c0, c1)]  # raster order in the grid
            local = np.array(
                [crops[j][(y - cr * g) * g + (x - cc * g)] for y, x in positions], dtype=np.float64
            )
            if resized is not None and positions:
                glob = resized[row_off : row_off + h_j, col_off : col_off + w_j].reshape(-1)
            else:
                glob = np.zeros(0, dtype=np.float64)
            col_off += w_j

            def l2(v):
                v = v.astype(np.float64)
                return v / max(float(np.sqrt((v**2).sum())), 1e-12)

            if scoring == "holistic":
                score = alpha * l2(glob) + (1 - alpha) * l2(local)
            elif scoring == "local":
                score = l2(local)
            else:
                score = l2(glob)
            k = int(len(positions) * float(r[j]))
            counts_out.append(k)
            for v in stable_top(list(score), k):
                crops_mask[positions[v]] = True
        row_off += block_h
    return thumb_mask.reshape(g, g), crops_mask, r, thumb_order, counts_out


def plain_sequence(thumb_order, crops_mask, grid, box, g, mode):
    """Positions in HF's packed sequence, in the order the LLM sees the kept tokens, built plainly.

    HF's packed sequence is the g*g thumbnail tokens, then the valid box's h rows of w crop tokens, each row followed
    by a newline, and one more newline appended at the end. reference: kept tokens of crop j written at slot v
    (= index in the crop's valid list) of its tile, the padded grid read in raster order with a newline after every
    padded row (every newline is the same embedding: the appended one is used). budget: kept tokens in raster
    order, each valid row's own newline.
    """
    rows, cols = grid
    gg = g * g
    top, bottom, left, right = box
    w = right - left

    def pos(y: int, x: int) -> int:
        return gg + (y - top) * (w + 1) + (x - left)

    seq = [int(i) for i in thumb_order]
    if mode == "budget":
        for y in range(top, bottom):
            for x in range(left, right):
                if crops_mask[y][x]:
                    seq.append(pos(y, x))
            seq.append(pos(y, right))
        return seq
    slot = [[-1] * (cols * g) for _ in range(rows * g)]
    for cr in range(rows):
        for cc in range(cols):
            positions = [
                (y, x)
                for y in range(max(top, cr * g), min(bottom, (cr + 1) * g))
                for x in range(max(left, cc * g), min(right, (cc + 1) * g))
            ]
            for v, (y, x) in enumerate(positions):
                if crops_mask[y][x]:
                    slot[cr * g + v // g][cc * g + v % g] = pos(y, x)
    for row in slot:
        seq += [s for s in row if s >= 0]
        seq.append(gg + (bottom - top) * (w + 1))
    return seq


def plain_cls_logits(hidden, layer_norm, q_proj, k_proj, num_heads, softmax=False):
    """Head-mean [CLS]-row attention of one CLIP layer, one head at a time (no shared code with the library)."""
    import torch

    with torch.no_grad():
        x = torch.nn.functional.layer_norm(
            hidden.double(),
            hidden.shape[-1:],
            layer_norm.weight.double(),
            layer_norm.bias.double(),
            layer_norm.eps,
        )
        q = x[:, 0] @ q_proj.weight.double().T + q_proj.bias.double()
        k = x @ k_proj.weight.double().T + k_proj.bias.double()
        dh = q.shape[-1] // num_heads
        heads = []
        for h in range(num_heads):
            qh, kh = q[:, h * dh : (h + 1) * dh], k[:, :, h * dh : (h + 1) * dh]
            logits = torch.einsum("td,tsd->ts", qh, kh) / math.sqrt(dh)
            heads.append(logits.softmax(-1) if softmax else logits)
        return (sum(heads) / num_heads)[:, 1:].float()
