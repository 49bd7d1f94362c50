"""PyramidDrop (Xing et al., CVPR 2025) inside a Hugging Face LLM.

PDrop splits the LLM into S stages (paper Sec. 3.2, default S = 4). At the end of each stage it ranks the image
tokens that are still there by the attention of the *last instruction token* (the prompt's last token at
inference) and keeps the top fraction: stage s keeps ``floor(n * share_s)`` of the image's n tokens (the public
code's ``int(N * ratio_s)``, counted from the unpruned n). The attention is computed as in the public code: at
the boundary K_s (the first layer of the next stage), layer K_s's own input norm, ``q``/``k`` projections and
rotary embedding on the hidden states entering it, softmax over the causal row, mean over heads; only that one row
is computed (:func:`~globalcom2.methods.pruner.last_token_attention`), so every layer keeps SDPA. As in the public
code, positions are renumbered after each drop (``positions="compact"``) and decode tokens are shifted by the
number of tokens dropped before them.

Where the stages fall and what each keeps comes from :func:`~globalcom2.methods.schedule.pdrop_schedule`: the
layer average of the image tokens equals R (the "equivalent token count" of the paper's comparisons); at
R = 0.46875 on a 32-layer LLM that is exactly the paper's default (drops after layers 8, 16, 24, lambda = 0.5).

Samples are ranked independently (the image tokens of each sample together, newlines included, as FastV here);
ties keep the earlier position (:func:`~globalcom2.core.select.topk_mask`). Every family
(:func:`~globalcom2.methods.pruner.llm_method_class`): only image tokens are ranked, markers stay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .pruner import LLMPruningAdapter, num_llm_layers
from .schedule import PDROP_LAMBDA, PDROP_STAGES, pdrop_schedule


class PDropAdapter(LLMPruningAdapter):
    """PyramidDrop on any family (module docstring).

    Args:
        model, processor, config: as every adapter (``config.ratio`` is R, the layer average).
        stages: S, the number of stages (S - 1 drops).
        lam: lambda, the paper's per-stage keep fraction (places the first drop; re-solved for R).
        layers: explicit drop layers K_1 < ... < K_{S-1} (only lambda is solved).
    """

    score_offset = 0  # stage s is ranked with layer K_s's attention, before it runs
    plan_mode = "pdrop"
    positions = "compact"
    display_name = "PDrop"

    def __init__(self, model: Any, processor: Any, config: Any, *, stages: int = PDROP_STAGES,
                 lam: float = PDROP_LAMBDA, layers: Sequence[int] | None = None) -> None:  # fmt: skip
        super().__init__(model, processor, config)
        num_layers = num_llm_layers(model)
        self.schedule = pdrop_schedule(num_layers, config.ratio, stages=stages, lam=lam, layers=layers)
        self.build_pruner()


__all__ = ["PDropAdapter"]
