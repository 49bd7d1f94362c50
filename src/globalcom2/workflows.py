"""Small end-to-end helpers shared by the CLI and the demo: plans for an image, overlays, prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .apply import apply
from .core.plan import Plan


def default_prompt(processor: Any, question: str) -> str:
    """A single-image chat prompt: the processor's chat template if it has one, else the LLaVA-1.5 style."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    token = getattr(processor, "image_token", None) or "<image>"  # InternVL's placeholder is <IMG_CONTEXT>
    return f"USER: {token}\n{question} ASSISTANT:"


@torch.no_grad()
def plan_for_image(model: Any, processor: Any, image: Image.Image, **options: Any) -> Plan:
    """Run the vision side only (tower + GlobalCom² selection) and return the image's `Plan`."""
    with apply(model, processor, **options) as handle:
        return handle.adapter.plan_for_image(handle, image)


def render_plan(image: Image.Image, plan: Plan, model: Any, title: str, out_path: str | Path | None = None):
    """Figure-7-style overlay of one plan (see :func:`globalcom2.viz.overlay.render_overlay`)."""
    from .adapters import adapter_for
    from .viz.overlay import render_overlay

    adapter = adapter_for(model)
    if hasattr(adapter, "render_plan"):  # own drawing (native resolution: regions; Llama 4: padded canvas)
        return adapter.render_plan(model, image, plan, title, out_path)
    image, tile, best = adapter.overlay_geometry(model, image, plan)
    return render_overlay(image, plan, tile_size=tile, best_resolution=best, title=title, out_path=out_path)
