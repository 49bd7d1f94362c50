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
        adapter = getattr(handle, "adapter", None)
        planner = getattr(adapter, "plan_for_image", None)  # families whose model needs more than pixels
        if planner is not None:
            return planner(handle, image)
        inputs = processor.image_processor(images=[image], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(model.device, model.dtype)
        model.model.get_image_features(pixel_values, inputs["image_sizes"].to(model.device))
        return handle.plans[0]


def best_resolution(plan: Plan, tile_size: int) -> tuple[int, int]:
    rows, cols = plan.grid
    return rows * tile_size, cols * tile_size


def render_plan(image: Image.Image, plan: Plan, model: Any, title: str, out_path: str | Path | None = None):
    """Figure-7-style overlay of one plan (see :func:`globalcom2.viz.overlay.render_overlay`)."""
    from .adapters import adapter_for
    from .viz.overlay import render_overlay

    geometry = getattr(adapter_for(model), "overlay_geometry", None)  # e.g. InternVL stretches, never pads
    if geometry is not None:
        image, tile, best = geometry(model, image, plan)
    else:
        tile = int(model.config.vision_config.image_size)
        best = best_resolution(plan, tile)
    return render_overlay(
        image,
        plan,
        tile_size=tile,
        best_resolution=best,
        title=title,
        out_path=out_path,
    )
