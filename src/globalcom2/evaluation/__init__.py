"""Evaluation harness: every method x R and the paper's ablations on real photos with the DINOv2 stand-in.

`globalcom2 eval` (:mod:`globalcom2.evaluation.cli`) reports fidelity metrics (:mod:`.metrics`) that can be measured
without an LLM; they are not accuracy. See docs/eval.md.
"""

from .metrics import Reference, build_reference, plan_metrics

__all__ = ["Reference", "build_reference", "plan_metrics"]
