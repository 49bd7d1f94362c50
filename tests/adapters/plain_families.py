"""Plain re-implementations for the OneVision and InternVL tests (loops and numpy; no globalcom2 imports).

Slow on purpose. They check the library's vectorised code; bilinear resizes are the documented float64 formula
written out with Python floats (:func:`tests.core.reference_plain.bilinear64`), which the library's
``bilinear_resize`` computes bit for bit, so kept-token masks can be compared exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tests.core.reference_plain import bilinear64, plain_reference, stable_top, unpad_box

MAX_TILES = 9  # anyres_max_9


def spy(monkeypatch, module, name: str) -> list[torch.Tensor]:
    """Record every output of ``module.name`` (the scores the library really used)."""
    calls: list[torch.Tensor] = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out.detach().clone())
        return out

    monkeypatch.setattr(module, name, wrapper)
    return calls


def plain_cosine(selected: torch.Tensor) -> np.ndarray:
    """Paper Eq. 7 written out: s_i = -cos(x_i, mean of the tile's tokens), one tile and one token at a time."""
    x = selected.double().numpy()
    out = np.zeros(x.shape[:2])
    for t in range(x.shape[0]):
        mean = x[t].mean(axis=0)
        for i in range(x.shape[1]):
            out[t, i] = -float(x[t, i] @ mean) / (np.linalg.norm(x[t, i]) * np.linalg.norm(mean))
    return out.astype(np.float32)


def plain_onevision(thumb, crops, grid, size, g, ratio, allocation, scoring, counts=None, alpha=0.5):
    """GlobalCom² on OneVision's LLM token grid, written out plainly (no globalcom2 code).

    The thumbnail and r_j come from the plain NeXT reference (they do not depend on the crop geometry). The crop
    grid is unpadded, and if larger than 1.1² x 9 tiles' worth bilinearly resized to (int(h // s), int(w // s));
    every final token belongs to the crop of the patch nearest to its sample point; the thumbnail map is resized to
    the same grid; per crop both are L2-normalised and mixed; the top k_j survive.

    Returns:
        (thumb_mask, thumb_order, r, keep (H, W), per-crop counts).
    """
    rows, cols = grid
    t_mask, _, r, t_order, _ = plain_reference(thumb, crops, grid, size, ratio, allocation, scoring, alpha)
    top, bottom, left, right = unpad_box(size[0], size[1], rows * g, cols * g)
    hv, wv = bottom - top, right - left
    s = math.sqrt(hv * wv / (MAX_TILES * g * g))
    height, width = (int(hv // s), int(wv // s)) if s > 1.1 else (hv, wv)
    padded = np.zeros((rows * g, cols * g), dtype=np.float32)
    for j in range(rows * cols):
        cr, cc = divmod(j, cols)
        padded[cr * g : (cr + 1) * g, cc * g : (cc + 1) * g] = np.asarray(crops[j]).reshape(g, g)
    valid = padded[top:bottom, left:right]
    local = valid.astype(np.float64) if (height, width) == (hv, wv) else bilinear64(valid, height, width)
    glob = bilinear64(np.asarray(thumb, dtype=np.float32).reshape(g, g), height, width)
    members: list[list[tuple[int, int]]] = [[] for _ in range(rows * cols)]
    for y in range(height):
        cr = (top + math.floor((y + 0.5) * hv / height)) // g
        for x in range(width):
            cc = (left + math.floor((x + 0.5) * wv / width)) // g
            members[cr * cols + cc].append((y, x))

    def l2(v):
        v = np.asarray(v, dtype=np.float64)
        return v / max(float(np.sqrt((v**2).sum())), 1e-12)

    keep = np.zeros((height, width), dtype=bool)
    ks = []
    for j, pos in enumerate(members):
        loc = l2([local[y, x] for y, x in pos])
        glo = l2([glob[y, x] for y, x in pos])
        score = {"holistic": alpha * glo + (1 - alpha) * loc, "local": loc, "global": glo}[scoring]
        if counts is not None:
            k = int(counts[j])
        elif allocation == "uniform":
            k = int(len(pos) * ratio)
        else:
            k = int(len(pos) * float(r[j]))
        ks.append(k)
        for v in stable_top(list(score), k):
            keep[pos[v]] = True
    return t_mask, t_order, r, keep, ks


def plain_onevision_sequence(t_order, keep, g):
    """Rows of HF's packed sequence in LLM order: thumbnail tokens, then every grid row's kept tokens + newline."""
    height, width = keep.shape
    seq = [int(i) for i in t_order]
    for y in range(height):
        seq += [g * g + y * (width + 1) + x for x in range(width) if keep[y, x]]
        seq.append(g * g + y * (width + 1) + width)
    return seq


def _plain_norm(x: torch.Tensor, module) -> torch.Tensor:
    """LayerNorm or RMSNorm (InternViT uses either), written out in float64."""
    w = module.weight.double()
    if hasattr(module, "variance_epsilon"):  # RMSNorm
        return x * torch.rsqrt((x**2).mean(-1, keepdim=True) + module.variance_epsilon) * w
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + module.eps) * w + module.bias.double()


def plain_internvit_cls_logits(hidden: torch.Tensor, layer, num_heads: int) -> torch.Tensor:
    """Head-mean [CLS]-row logits of one InternViT layer (pre-norm, q/k projections, optional q/k RMS norms).

    Args:
        hidden: ``(T, 1 + P, D)`` input of the layer.

    Returns:
        ``(T, P)`` float32.
    """
    att = layer.attention
    with torch.no_grad():
        x = _plain_norm(hidden.double(), layer.layernorm_before)

        def proj(lin, v):
            out = v @ lin.weight.double().T
            return out + lin.bias.double() if lin.bias is not None else out

        q = proj(att.q_proj, x[:, :1])
        k = proj(att.k_proj, x)
        if not isinstance(att.q_norm, torch.nn.Identity):
            q, k = _plain_norm(q, att.q_norm), _plain_norm(k, att.k_norm)
        dh = q.shape[-1] // num_heads
        total = 0
        for h in range(num_heads):
            qh, kh = q[:, 0, h * dh : (h + 1) * dh], k[:, :, h * dh : (h + 1) * dh]
            total = total + torch.einsum("td,tsd->ts", qh, kh) / math.sqrt(dh)
        return (total / num_heads)[:, 1:].float()


def plain_pool_2x2(scores: np.ndarray) -> np.ndarray:
    """Sum each 2 x 2 group of a (T, p*p) raster score map into a (T, (p/2)**2) map, one cell at a time."""
    t, pp = scores.shape
    p = int(round(math.sqrt(pp)))
    m = p // 2
    out = np.zeros((t, m * m), dtype=np.float64)
    for i in range(t):
        for y in range(p):
            for x in range(p):
                out[i, (y // 2) * m + x // 2] += scores[i, y * p + x]
    return out.astype(np.float32)


def plain_internvl_sequence(t_order, keep, grid, g):
    """Rows of an image's tile features in LLM order: each crop's kept tokens (tile raster), then the thumbnail."""
    rows, cols = grid
    n = rows * cols
    seq = []
    for j in range(n):
        cr, cc = divmod(j, cols)
        for y in range(g):
            for x in range(g):
                if keep[cr * g + y, cc * g + x]:
                    seq.append(j * g * g + y * g + x)
    return seq + [n * g * g + int(i) for i in t_order]


def plain_pool(scores: np.ndarray, factor: int) -> np.ndarray:
    """Sum each ``factor x factor`` group of a (T, p*p) raster score map into (T, (p/factor)**2), cell by cell
    (the patches Idefics3's ``pixel_shuffle`` folds into one token)."""
    t, pp = scores.shape
    p = int(round(math.sqrt(pp)))
    m = p // factor
    out = np.zeros((t, m * m), dtype=np.float64)
    for i in range(t):
        for y in range(p):
            for x in range(p):
                out[i, (y // factor) * m + x // factor] += scores[i, y * p + x]
    return out.astype(np.float32)


def plain_idefics3_image_text(grid, crop_counts, thumb_count, image_token="<image>") -> str:
    """One image's expansion in an Idefics3 / SmolVLM prompt with the given run lengths, written out from HF's
    documented layout: per crop ``<fake_token_around_image><row_r_col_c>`` and its run, a newline after each crop
    row, then a newline and the framed global image; an unsplit image is the framed global image alone."""
    fake, glob = "<fake_token_around_image>", "<global-img>"
    rows, cols = grid
    text = ""
    if rows and cols:
        for r in range(rows):
            for c in range(cols):
                text += f"{fake}<row_{r + 1}_col_{c + 1}>" + image_token * int(crop_counts[r * cols + c])
            text += "\n"
        text += "\n"
    return text + f"{fake}{glob}" + image_token * int(thumb_count) + fake


def check_tiles_plan(plan, thumb, crops, grid, g, ratio, mode, allocation, scoring, where):
    """Check a plan of full g x g crops plus a thumbnail (InternVL's geometry; Idefics3, Gemma 3, ...) against the
    plain rule: a lone tile keeps its own top int(N*R); otherwise :func:`plain_onevision` on the crop grid.

    Returns:
        (thumbnail rows in LLM order, crop keep mask (rows*g, cols*g) or None, per-crop counts, thumbnail count).
    """
    rows, cols = grid
    n = g * g
    if rows * cols <= 1:
        top = stable_top(list(thumb), int(n * ratio))
        assert plan.grid == (0, 0), where
        assert sorted(top) == plan.thumbnail_mask.reshape(-1).nonzero().reshape(-1).tolist(), where
        return (top if mode == "reference" else sorted(top)), None, [], len(top)
    given = plan.crop_keep_counts.tolist() if mode == "budget" else None
    t_mask, t_order, r, keep, ks = plain_onevision(
        thumb, crops, (rows, cols), (rows * g, cols * g), g, ratio, allocation, scoring, counts=given
    )
    np.testing.assert_allclose(plan.crop_ratios.numpy(), r, rtol=1e-5, err_msg=where)
    assert np.array_equal(plan.thumbnail_mask.numpy(), t_mask.reshape(g, g)), where
    assert np.array_equal(plan.crops_mask.numpy(), keep), where
    assert plan.crop_keep_counts.tolist() == ks, where
    if mode == "budget":
        assert sum(ks) == int(ratio * rows * cols * n), where
    order = t_order if mode == "reference" else np.flatnonzero(t_mask)
    return [int(i) for i in order], keep, ks, int(t_mask.sum())


def forward_and_capture(model, inputs, capture):
    """One no-grad forward of ``model`` on ``inputs`` with the ``(seen, hooks)`` of :func:`capture_llm_inputs`; the
    hooks are removed whatever happens. Returns ``seen``."""
    seen, hooks = capture
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def capture_llm_inputs(inner, llm, keys=("input_ids", "attention_mask")):
    """Pre-hooks recording what ``inner`` receives (``keys``) and the ``inputs_embeds`` the LLM ``llm`` receives, on
    the first call; returns ``(seen, hooks)`` (remove the hooks when done)."""
    seen: dict = {}

    def record_inner(module, args, kwargs):
        for key in keys:
            seen.setdefault(key, kwargs.get(key))

    def record_llm(module, args, kwargs):
        seen.setdefault("inputs_embeds", kwargs.get("inputs_embeds"))

    return seen, [
        inner.register_forward_pre_hook(record_inner, with_kwargs=True),
        llm.register_forward_pre_hook(record_llm, with_kwargs=True),
    ]


def plain_llama4_image_text(grid, crop_counts, thumb_count) -> str:
    """One image's span in a Llama 4 prompt with the given run lengths, from HF's documented layout: for a split
    image each tile row's runs joined by ``<|tile_x_separator|>`` and closed by ``<|tile_y_separator|>``, then
    ``<|image|>`` and the global tile's run; a lone tile is ``<|image|>`` and its run."""
    patch = "<|patch|>"
    rows, cols = grid
    text = "<|image_start|>"
    if rows * cols > 1:
        for r in range(rows):
            text += "<|tile_x_separator|>".join(patch * int(crop_counts[r * cols + c]) for c in range(cols))
            text += "<|tile_y_separator|>"
    return text + "<|image|>" + patch * int(thumb_count) + "<|image_end|>"


@torch.no_grad()
def plain_llama4_qk(
    hidden: torch.Tensor, layer, freqs: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k of a Llama 4 vision layer as it attends with them, in float64: the pre-norm, the q/k projections and
    the 2-D rotary embedding (each consecutive pair of a head's channels turned by its position's angle; ``freqs``
    the layer's table of unit complex numbers, the [CLS] row unrotated).

    Args:
        hidden: ``(T, P + 1, D)`` input of the layer (patches, then [CLS]).

    Returns:
        ``(q, k)``, each ``(T, P + 1, D)`` (heads side by side).
    """
    att = layer.self_attn
    x = _plain_norm(hidden.double(), layer.input_layernorm)
    q = x @ att.q_proj.weight.double().T + att.q_proj.bias.double()
    k = x @ att.k_proj.weight.double().T + att.k_proj.bias.double()
    t, s, width = q.shape
    dh = width // num_heads
    angle = torch.angle(freqs.reshape(s, -1)).double()  # (S, dh / 2)
    cos, sin = torch.cos(angle), torch.sin(angle)

    def rotate(v):
        v = v.reshape(t, s, num_heads, dh // 2, 2)
        a, b = v[..., 0], v[..., 1]
        c, d = cos[None, :, None, :], sin[None, :, None, :]
        return torch.stack([a * c - b * d, a * d + b * c], dim=-1).reshape(t, s, width)

    return rotate(q), rotate(k)


def plain_llama4_cls_logits(hidden: torch.Tensor, layer, freqs: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Paper Eq. 1 on Llama 4's vision encoder, written out in float64 (:func:`plain_llama4_qk`): the head-mean
    logits of the **last** position ([CLS], appended after the patches) against every patch key.

    Args:
        hidden: ``(T, P + 1, D)`` input of the last layer (patches, then [CLS]).

    Returns:
        ``(T, P)`` float32.
    """
    with torch.no_grad():
        q, k = plain_llama4_qk(hidden, layer, freqs, num_heads)
        dh = q.shape[-1] // num_heads
        total = 0
        for h in range(num_heads):
            qh, kh = q[:, -1, h * dh : (h + 1) * dh], k[:, :-1, h * dh : (h + 1) * dh]
            total = total + torch.einsum("td,tsd->ts", qh, kh) / math.sqrt(dh)
        return (total / num_heads).float()


def plain_cohere2_image_text(crop_counts, thumb_count) -> str:
    """One image's span in a Cohere2 Vision prompt with the given run lengths (HF's documented layout): every tile's
    run followed by ``<|IMG_LINE_BREAK|>``, crops first, the thumbnail last, inside the image markers."""
    runs = [*crop_counts, thumb_count] if len(crop_counts) else [thumb_count]
    body = "".join("<|IMG_PATCH|>" * int(c) + "<|IMG_LINE_BREAK|>" for c in runs)
    return "<|START_OF_IMG|>" + body + "<|END_OF_IMG|>"
