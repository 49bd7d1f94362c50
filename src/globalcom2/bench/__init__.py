"""Efficiency of GlobalCom² (paper Sec. 5.4, Table 4): analytic FLOPs / KV cache and measured time and memory.

- :mod:`.flops`: the paper's prefill-FLOPs formula and one derived from any HF config (vision tower, projector,
  LLM with text tokens), KV-cache bytes.
- :mod:`.measure`: vision encode, selection, LLM prefill, peak memory and throughput on random-weight models at
  real widths, uncompressed vs each R, in one process (``run_bench``).
- :mod:`.memory`: peak tensor memory of a call on CPU (profiler) and CUDA (allocator statistics).
- :mod:`.report`, :mod:`.plot`: terminal tables, Markdown, PNG. :mod:`.cli`: ``globalcom2 bench``.
"""

from .flops import (
    FlopsBreakdown,
    ModelDims,
    dims_from_config,
    kv_cache_bytes,
    llava_next_7b_config,
    paper_prefill_flops,
    prefill_flops,
)

__all__ = [
    "FlopsBreakdown",
    "ModelDims",
    "dims_from_config",
    "kv_cache_bytes",
    "llava_next_7b_config",
    "paper_prefill_flops",
    "prefill_flops",
]
