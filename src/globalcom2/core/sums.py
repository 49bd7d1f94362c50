"""Order-free sums of scores (paper Eq. 2 region sums, Eq. 3 softmax denominator, Eq. 4 mean, Eq. 5 L2 norms).

A float sum depends on the order of its additions, and the order is the kernel's: it changes with the length of
the reduction (so with the padding of a batch), with the machine's vector width and on a GPU with the timing of
atomic adds. Here every value is first put on the integer grid ``2^(e - 40)`` where ``2^e`` bounds the largest
magnitude of its row (truncating toward zero: at most ``2^-40`` of that magnitude is lost per value), the integers are
added (exact, so in any order), and the total is rounded once to the values' dtype. The result depends on the
values only: the same bits alone or in a batch, with any padding, on every machine and device. A row of up to
2^22 values cannot overflow int64. (MPS has no float64: there a plain float sum is taken.)
"""

from __future__ import annotations

import torch

_SUM_BITS = 40


def _on_grid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, e)``: int64 ``q = trunc(x * 2^(40 - e))`` with ``2^e`` > max |x| of each row (last dim); ``e`` as
    float64 (integer-valued, so exact)."""
    wide = x.double()
    # the infinity norm is max |x| (exact), one operation instead of abs + amax
    _, exponent = torch.frexp(torch.linalg.vector_norm(wide, float("inf"), dim=-1, keepdim=True))
    exponent = exponent.double()
    return torch.ldexp(wide, _SUM_BITS - exponent).long(), exponent


def _back(q: torch.Tensor, exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.ldexp(q.double(), exponent - _SUM_BITS).to(dtype)


def exact_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim on the integer grid of each row (module docstring); shape ``(..., 1)``."""
    if x.device.type == "mps" or x.shape[-1] == 0:
        return x.sum(-1, keepdim=True)
    q, exponent = _on_grid(x)
    return _back(q.sum(-1, keepdim=True), exponent, x.dtype)


def exact_segment_sum(x: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """``out[..., s] = sum of x[..., i] with segment[..., i] == s``, on the integer grid of each row.

    Args:
        x: ``(..., L)`` values.
        segment: Long ``(..., L)`` (broadcast to ``x``), each in ``[0, num_segments)``.
        num_segments: S.

    Returns:
        ``(..., S)`` in ``x``'s dtype (0 where no value falls).
    """
    rows = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    idx = segment.to(x.device).expand_as(x).reshape(rows.shape)
    shape = (rows.shape[0], num_segments)
    if x.device.type == "mps":
        out = torch.zeros(shape, dtype=x.dtype, device=x.device).scatter_add_(-1, idx, rows)
        return out.reshape(*x.shape[:-1], num_segments)
    q, exponent = _on_grid(rows)
    # integer additions: exact, so the scatter's order of additions does not matter
    total = torch.zeros(shape, dtype=torch.long, device=x.device).scatter_add_(-1, idx, q)
    return _back(total, exponent, x.dtype).reshape(*x.shape[:-1], num_segments)
