"""Image placeholders in the prompt: the per-image check, and reference mode's resizing of placeholder runs.

HF scatters image features into the placeholder positions in row-major order and checks only the total. Here every
image's features must land on one run of placeholders of its own length, and a mismatch raises a
:class:`~globalcom2.adapters.errors.PlaceholderMismatchError` that says how to fix the inputs.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import GlobalComConfig
from ..core.plan import Plan
from .errors import PlaceholderMismatchError


def placeholder_positions(inner: Any, token_id: int, input_ids: Any, inputs_embeds: Any) -> torch.Tensor:
    """Bool ``(batch, seq)``: where the image placeholders are (HF's rule when only embeddings are given)."""
    if input_ids is not None:
        return input_ids == token_id
    token = inner.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
    return (inputs_embeds == token).all(-1)


def check_placeholders(
    is_img: torch.Tensor,
    num_features: int,
    plans: list[Plan],
    config: GlobalComConfig,
    run_counts: list[int] | None = None,
) -> None:
    """Raise a clear ValueError unless the prompts hold exactly one placeholder per image feature, image by image.

    Args:
        is_img: Bool ``(batch, seq)``: positions holding the image token.
        num_features: rows of the concatenated image features about to be scattered into those positions.
        plans: the plans of the pack that produced the features (their ``num_tokens`` are the per-image counts);
            if they do not add up to ``num_features`` (features from elsewhere) only the total is checked.
        config: for the message.
        run_counts: the length of every placeholder run, in prompt order, when an image has several runs
            (Idefics3: one per crop, between text markers); default: one run per image.

    HF fills placeholders in row-major order, so every image's features must land on one run of placeholders of
    its own length (adjacent images may share a run). A mismatch raises instead of scattering wrong tokens.
    """
    counts = [p.num_tokens for p in plans]
    per_image = sum(counts) == num_features
    n = int(is_img.sum())
    where = f"GlobalCom² (mode={config.mode!r}, {config.budget_label})"
    if n != num_features:
        full = sum(p.num_tokens_full for p in plans) if per_image else -1
        if n == full and config.mode == "budget":
            hint = (
                "they carry the uncompressed count, i.e. they were made by the processor before "
                "globalcom2.apply() (or by another processor object): call the processor again after apply(), "
                "and again after remove()"
            )
        elif n == full:
            hint = (
                "they carry the uncompressed count: in reference mode call the model's own forward/generate, "
                "which resize each image's placeholder run (not the inner LlavaNextModel)"
            )
        elif config.mode == "budget":
            hint = (
                "build the inputs with the processor patched by this apply() (call it again after apply() and "
                "after remove()), with one <image> in the text per image"
            )
        else:
            hint = (
                "build the inputs with the plain processor, with one <image> in the text per image, and call the "
                "model's own forward/generate"
            )
        raise PlaceholderMismatchError(
            f"{where}: the prompts hold {n} image tokens but the images give {num_features} features; {hint}"
        )
    if per_image and counts:
        check_runs(is_img, counts if run_counts is None else run_counts, where)


def check_runs(is_img: torch.Tensor, counts: list[int], where: str) -> None:
    """Every run of placeholders must end on an image boundary (row-major order), else ValueError."""
    nxt = torch.zeros_like(is_img)
    nxt[..., :-1] = is_img[..., 1:]
    ends = (is_img & ~nxt).reshape(-1)
    end_counts = is_img.reshape(-1).long().cumsum(0)[ends]  # image tokens seen up to each run's end
    bounds = torch.tensor(counts, device=end_counts.device).cumsum(0)
    if not bool(torch.isin(end_counts, bounds).all()):
        runs = torch.diff(end_counts, prepend=end_counts.new_zeros(1)).tolist()
        raise PlaceholderMismatchError(
            f"{where}: the placeholder runs in the prompts (lengths {runs}) do not line up with the images' "
            f"token counts {counts}; make the text and the pixel values in one processor call"
        )


def pad_token_id(model: Any, processor: Any) -> int:
    """The pad id the batch is re-padded with: the tokenizer's, else the model config's, else 0."""
    tok = getattr(processor, "tokenizer", None)
    # Looked up lazily, the text config before the top-level one: Idefics3 / SmolVLM configs warn on every read
    # of their deprecated top-level ``pad_token_id``.
    for owner in (tok, getattr(model.config, "text_config", None), model.config):
        cand = getattr(owner, "pad_token_id", None)
        if cand is not None:
            return int(cand)
    return 0


def shrink_placeholders(
    input_ids: torch.Tensor,
    *,
    image_token_id: int,
    full_counts: list[int],
    new_counts: list[int],
    pad_token_id: int,
    extra: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Resize every image's run of placeholders from its full count to its new count, then re-pad the batch.

    Usually the run shrinks; it grows when the reference count exceeds HF's (reference mode writes a newline after
    every padded row, HF only after unpadded ones: with R near 1 and a padded crop grid the official sequence is
    longer). Images are matched to placeholder runs in row-major order (as HF's ``masked_scatter`` does). Padding
    keeps the side the batch used (left if any row starts with attention_mask == 0).

    Returns:
        ``input_ids`` and the resized tensors of ``extra`` (attention_mask, labels, ...).
    """
    is_img = input_ids == image_token_id
    total_full = sum(full_counts)
    if int(is_img.sum()) != total_full:
        raise PlaceholderMismatchError(
            f"GlobalCom² (mode='reference'): the prompts hold {int(is_img.sum())} image tokens but these images "
            f"need {total_full} (their uncompressed count); in reference mode build the inputs with the plain "
            "processor (not one patched by a budget-mode apply()), with one <image> in the text per image"
        )
    check_runs(is_img, list(full_counts), "GlobalCom² (mode='reference')")
    device = input_ids.device
    full = torch.tensor(full_counts, device=device)
    new = torch.tensor(new_counts, device=device)
    image_of = torch.repeat_interleave(torch.arange(len(full_counts), device=device), full)
    starts = torch.cumsum(full, 0) - full
    within = torch.arange(total_full, device=device) - starts[image_of]
    # Copies of every token: 1, 0 for placeholders cut off, and the last placeholder of a run that grows repeats.
    reps_flat = (within < new[image_of]).long()
    grow = (new - full).clamp_min(0)[image_of]
    reps_flat = reps_flat + torch.where(within == full[image_of] - 1, grow, torch.zeros_like(grow))
    reps = torch.ones_like(input_ids, dtype=torch.long)
    reps[is_img] = reps_flat
    return _repeat_tokens({"input_ids": input_ids, **extra}, reps, pad_token_id=pad_token_id)


def _repeat_tokens(
    tensors: dict[str, torch.Tensor],
    reps: torch.Tensor,
    *,
    pad_token_id: int,
    inserted: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Repeat every token ``reps`` times (0 drops it) in each of ``tensors`` and re-pad the batch.

    Padding keeps the side the batch used (left if any row starts with attention_mask == 0). With ``inserted``,
    the copies after a token's first take the given value in the named tensors instead of repeating the token.
    """
    device = reps.device
    batch = reps.shape[0]
    attn = tensors.get("attention_mask")
    row_len = reps.sum(1)
    left = (attn[:, 0] == 0).any() if attn is not None else torch.zeros((), dtype=torch.bool, device=device)
    # The one host read: output size, batch width and padding side together.
    total, width, left_pad = (
        int(v) for v in torch.stack([row_len.sum(), row_len.max(), left.long()]).tolist()
    )
    flat = reps.reshape(-1)
    token = torch.repeat_interleave(torch.arange(flat.numel(), device=device), flat, output_size=total)
    row = token // reps.shape[1]
    first = torch.cumsum(flat, 0) - flat  # where each token's first copy lands in the concatenated rows
    row_start = torch.cumsum(row_len, 0) - row_len
    column = torch.arange(total, device=device) - row_start[row]
    if left_pad:
        column = column + (width - row_len)[row]
    is_copy = torch.arange(total, device=device) != first[token]  # every copy after a token's first
    out: dict[str, torch.Tensor] = {}
    fills = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100, "token_type_ids": 0}
    for key, tensor in tensors.items():  # a handful of tensors, each resized in one scatter
        values = tensor.reshape(-1)[token]
        if inserted is not None and key in inserted:
            values = values.masked_fill(is_copy, inserted[key])
        res = torch.full((batch, width), fills.get(key, 0), dtype=tensor.dtype, device=device)
        res[row, column] = values
        out[key] = res
    return out


def resize_marked_runs(
    input_ids: torch.Tensor,
    *,
    image_token_id: int,
    anchor_ids: torch.Tensor,
    old_counts: list[int],
    new_counts: list[int],
    pad_token_id: int,
    extra: dict[str, torch.Tensor],
    hint: str,
    inserted: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Give every placeholder run that follows a marker token a new length, then re-pad the batch.

    For layouts with one run per crop, each right after its own text marker (Idefics3: ``<row_r_col_c>`` and
    ``<global-img>``): the marker, not the run, locates the crop, so a run may be empty before or after. Runs
    are matched to ``old_counts``/``new_counts`` in row-major order; the markers and all other tokens are kept.

    Args:
        anchor_ids: Long ``(m,)`` ids of the marker tokens a run follows.
        old_counts: the length of every run in ``input_ids`` (checked), one per marker in prompt order.
        new_counts: the length every run gets.
        extra: attention_mask, labels, ...: resized alike (new placeholders: label -100, the marker's mask).
        hint: how to fix the inputs, for the error message.
        inserted: values new placeholders take in tensors of ``extra`` (default: the marker's).

    Returns:
        ``input_ids`` and the resized tensors of ``extra``.
    """
    is_img = input_ids == image_token_id
    anchor = torch.isin(input_ids, anchor_ids.to(input_ids.device))
    before = torch.zeros_like(is_img)
    before[:, 1:] = is_img[:, :-1] | anchor[:, :-1]
    stray = bool((is_img & ~before).any())  # a placeholder that follows no marker
    run_of = torch.cumsum(anchor.reshape(-1).long(), 0) - 1  # the marker each token follows, row-major
    found_counts = (
        [] if stray else torch.bincount(run_of[is_img.reshape(-1)], minlength=int(anchor.sum())).tolist()
    )
    if stray or found_counts != list(old_counts):
        raise PlaceholderMismatchError(
            f"GlobalCom²: the prompts' placeholder runs (lengths {found_counts}, one after each image marker) are "
            f"not the ones these images were processed with ({list(old_counts)}); {hint}"
        )
    reps = (~is_img).long()
    reps[anchor] += torch.tensor(new_counts, dtype=torch.long, device=input_ids.device)
    return _repeat_tokens(
        {"input_ids": input_ids, **extra}, reps, pad_token_id=pad_token_id,
        inserted={"labels": -100, **(inserted or {}), "input_ids": image_token_id},
    )  # fmt: skip


def rewrite_image_spans(
    input_ids: torch.Tensor,
    *,
    start_id: int,
    end_id: int,
    old_spans: list[torch.Tensor],
    new_spans: list[torch.Tensor],
    image_token_id: int,
    pad_token_id: int,
    extra: dict[str, torch.Tensor],
    hint: str,
) -> dict[str, torch.Tensor]:
    """Replace every image's span (``start_id`` ... ``end_id``, both included) by a new one, then re-pad the batch.

    For layouts whose crop markers are ordinary text (Aya Vision's ``TILE_k``): the markers cannot be told from
    the prompt's other tokens by their ids, but inside an image span every token is the layout's, so the adapter
    writes each span whole (its layout with the new run lengths; tokenised once per crop grid). Spans are matched
    to ``old_spans``/``new_spans`` in row-major order, and each must equal its old span (checked).

    Args:
        old_spans, new_spans: Long ``(L_i,)`` token ids of every image span, delimiters included.
        extra: attention_mask (1 in a new span), labels (-100 in a new span: image spans are never targets),
            token_type_ids (1 on placeholders), other tensors (the span's first value).
        hint: how to fix the inputs, for the error message.

    Returns:
        ``input_ids`` and the resized tensors of ``extra``.
    """
    device = input_ids.device
    starts = (input_ids == start_id).nonzero().tolist()  # one host read: (row, column) of every span start
    ends = (input_ids == end_id).nonzero().tolist()
    if len(starts) != len(old_spans) or len(ends) != len(old_spans):
        raise PlaceholderMismatchError(
            f"GlobalCom²: the prompts hold {len(starts)} image spans but these inputs have {len(old_spans)} images; "
            f"{hint}"
        )
    batch, width_in = input_ids.shape
    attn = extra.get("attention_mask")
    left = attn is not None and bool((attn[:, 0] == 0).any())
    # Each row's tokens without its padding: [lo, hi)
    lengths = attn.sum(1).tolist() if attn is not None else [width_in] * batch
    cursor = [width_in - int(n) if left else 0 for n in lengths]
    ends_at = [width_in if left else int(n) for n in lengths]
    pieces: list[list[dict[str, torch.Tensor]]] = [[] for _ in range(batch)]
    tensors = {"input_ids": input_ids, **extra}
    found = [input_ids[row, a : b + 1] for (row, a), (_, b) in zip(starts, ends, strict=True)]
    same_shape = all(
        row == row_end and f.numel() == o.numel()
        for (row, _), (row_end, _), f, o in zip(starts, ends, found, old_spans, strict=True)
    )
    # One comparison (one device read) for the whole batch.
    if not same_shape or not torch.equal(torch.cat(found), torch.cat(old_spans).to(device)):
        raise PlaceholderMismatchError(
            f"GlobalCom²: an image span of the prompts is not the one these images were processed with; {hint}"
        )
    for (row, a), (_, b), new in zip(starts, ends, new_spans, strict=True):
        new = new.to(device)
        pieces[row].append({k: t[row, cursor[row] : a] for k, t in tensors.items()})
        span: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            if key == "input_ids":
                span[key] = new
            elif key == "attention_mask":
                span[key] = torch.ones_like(new, dtype=t.dtype)
            elif key == "labels":
                span[key] = torch.full_like(new, -100, dtype=t.dtype)
            elif key == "token_type_ids":
                span[key] = (new == image_token_id).to(t.dtype)
            else:
                span[key] = t[row, a].expand(new.numel()).clone()
        pieces[row].append(span)
        cursor[row] = b + 1
    rows = []
    for row, parts in enumerate(pieces):
        parts.append({k: t[row, cursor[row] : ends_at[row]] for k, t in tensors.items()})
        rows.append({k: torch.cat([p[k] for p in parts]) for k in tensors})
    width = max(int(r["input_ids"].numel()) for r in rows)
    fills = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100, "token_type_ids": 0}
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        res = torch.full((len(rows), width), fills.get(key, 0), dtype=t.dtype, device=device)
        for i, r in enumerate(rows):
            n = r[key].numel()
            if left:
                res[i, width - n :] = r[key]
            else:
                res[i, :n] = r[key]
        out[key] = res
    return out
