"""The explorer's page (Gradio, the optional ``[app]`` extra): inputs on the left, the result on the right.

Every session gets its own outputs (Gradio returns an event's outputs to the browser that sent it); the model is
shared and :class:`~globalcom2.app.explore.Explorer` serialises its use. A bad input or a bug becomes a message at
the top of the result column, and the server keeps serving. Element ids (``gc-*``) are what the browser test uses.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .explore import OPTION_NAMES, ExploreError, Explorer, ExploreRequest, internal_error, plan_json

__all__ = ["build_app", "launch"]

#: Gradio refuses larger uploads before they reach the app (Pillow's own bomb guard is ~179 Mpx).
MAX_UPLOAD = "64mb"
_BUDGETS = ("ratio R", "max image tokens T")
_INTRO = (
    "# GlobalCom² explorer\n"
    "Pick a shipped photo or upload an image, choose methods and a budget, press **Compress**: each panel shows the "
    "thumbnail and the crops, kept tokens in colour, discarded ones greyed, r_j and kept/N_j per crop (the same "
    "figures as `globalcom2 visualize`). The tables and the plan JSON state the same numbers."
)


@functools.cache
def _downloads() -> str:
    """One folder for this process's plan files (one sub-folder per request, so sessions never share a file);
    removed at exit. Gradio serves its own copy of each."""
    folder = tempfile.mkdtemp(prefix="globalcom2_explore_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _standin_note(explorer: Explorer) -> str:
    if not explorer.standin:
        return f"Model: `{explorer.model_name}`."
    return (
        "Model: the offline **stand-in** (a real DINOv2 ViT-S/14 vision tower in place of the family's own, a tiny "
        "random LLM): token scores and counts are real, the LLM-side methods' choices show the mechanism only."
    )


def _compress(explorer: Explorer, photo: str | None, upload: Any, family: str, methods: list[str],
              budget: str, ratio: float | None, tokens: float | None, question: str,
              *option_values: Any, progress: Any = None) -> tuple[str, Any, str, str | None]:  # fmt: skip
    """One press of Compress: ``(message, picture, tables, plan JSON path)``; a failure fills the message only."""
    from ..demo.photos import load_photo
    from .explore import load_upload

    try:
        if upload:
            path = upload if isinstance(upload, str) else getattr(upload, "name", str(upload))
            image, name = load_upload(path), Path(path).name
        elif photo:
            image, name = load_photo(photo), f"photo:{photo}"
        else:
            raise ExploreError("pick a shipped photo or upload an image")
        by_tokens = budget == _BUDGETS[1]
        if by_tokens and (tokens is None or float(tokens) != int(float(tokens))):
            raise ExploreError(f"max image tokens T must be a positive integer, got {tokens}")
        request = ExploreRequest(
            methods=tuple(methods or ()),
            ratio=None if by_tokens else (None if ratio is None else float(ratio)),
            max_image_tokens=int(float(tokens)) if by_tokens and tokens is not None else None,
            options=dict(zip(OPTION_NAMES, option_values, strict=True)),
            family=family,
            question=question or "What is shown in this image?",
        )
        report = None if progress is None else (lambda f, what: progress(f, desc=what))
        result = explorer.run(image, name, request, progress=report)
    except (ExploreError, ValueError, TypeError, OSError) as err:
        return f"**Error:** {str(err).splitlines()[0] if str(err) else type(err).__name__}", None, "", None
    except Exception as err:  # a bug: say so in the page, keep serving
        return f"**Error:** {internal_error(err)}", None, "", None
    out = (
        Path(tempfile.mkdtemp(dir=_downloads())) / f"globalcom2_plan_{Path(name.replace(':', '_')).stem}.json"
    )
    out.write_text(plan_json(result))
    message = f"{name} ({image.width}x{image.height}), {len(result.records)} method(s)."
    if result.notes:
        message += "\n\n" + "\n".join(f"- note: {n}" for n in result.notes)
    return message, result.picture, result.markdown, str(out)


def build_app(explorer: Explorer) -> Any:
    """The Gradio ``Blocks`` of the explorer (not launched)."""
    import gradio as gr

    from ..config import ALLOCATIONS, IMPORTANCES, MODES, SCORE_KINDS, SCORINGS
    from ..demo.photos import PHOTOS
    from ..methods import METHODS

    # delete_cache: Gradio's copies of uploads and plan files older than an hour go, checked hourly
    with gr.Blocks(title="GlobalCom² explorer", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(_INTRO + "\n\n" + _standin_note(explorer))
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                photo = gr.Dropdown(
                    list(PHOTOS), value="astronaut", label="shipped photo", elem_id="gc-photo"
                )
                upload = gr.File(label="or upload an image (used instead of the photo)", type="filepath",
                                 elem_id="gc-upload")  # fmt: skip
                families = explorer.families()
                family = gr.Dropdown(list(families), value=explorer.default_family if explorer.standin else families[0],
                                     label="family",
                                     interactive=explorer.standin, elem_id="gc-family")  # fmt: skip
                methods = gr.CheckboxGroup(list(METHODS), value=["globalcom2"], label="methods (one panel each)",
                                           elem_id="gc-methods")  # fmt: skip
                budget = gr.Radio(list(_BUDGETS), value=_BUDGETS[0], label="budget", elem_id="gc-budget")
                ratio = gr.Slider(0.01, 1.0, value=0.25, step=0.01, label="R (retention ratio)",
                                  elem_id="gc-ratio")  # fmt: skip
                tokens = gr.Number(value=288, label="T (max image tokens per image)", elem_id="gc-tokens")
                with gr.Accordion("GlobalCom² options", open=False):
                    options = [
                        gr.Dropdown(list(MODES), value="budget", label="mode", elem_id="gc-mode"),
                        gr.Dropdown(
                            list(ALLOCATIONS),
                            value="softmax-sum",
                            label="allocation (Table 2)",
                            elem_id="gc-allocation",
                        ),  # fmt: skip
                        gr.Dropdown(
                            list(SCORINGS), value="holistic", label="scoring (Table 3)", elem_id="gc-scoring"
                        ),  # fmt: skip
                        gr.Dropdown(list(SCORE_KINDS), value="logits", label="score", elem_id="gc-score"),
                        gr.Dropdown(
                            list(IMPORTANCES), value="auto", label="importance", elem_id="gc-importance"
                        ),
                        gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="alpha (Eq. 5)", elem_id="gc-alpha"),
                        gr.Number(value=10.0, label="tau (Eq. 3)", elem_id="gc-tau"),
                    ]
                question = gr.Textbox("What is shown in this image?", label="question (LLM-side methods)",
                                      elem_id="gc-question")  # fmt: skip
                run = gr.Button("Compress", variant="primary", elem_id="gc-run")
            with gr.Column(scale=3):
                message = gr.Markdown(elem_id="gc-message")
                picture = gr.Image(type="pil", format="png", label="kept tokens", show_label=False, interactive=False,
                                   elem_id="gc-picture")  # fmt: skip
                tables = gr.Markdown(elem_id="gc-counts")
                plan_file = gr.File(label="plan JSON", interactive=False, elem_id="gc-plan")

        tracker = gr.Progress()  # Gradio fills in a per-event tracker where a handler's default is one

        def compress(photo_, upload_, family_, methods_, budget_, ratio_, tokens_, question_, *rest,
                     progress=tracker):  # fmt: skip
            return _compress(explorer, photo_, upload_, family_, methods_, budget_, ratio_, tokens_, question_,
                             *rest, progress=progress)  # fmt: skip

        run.click(
            compress,
            inputs=[photo, upload, family, methods, budget, ratio, tokens, question, *options],
            outputs=[message, picture, tables, plan_file],
        )
    return app


def launch(
    explorer: Explorer, *, host: str = "127.0.0.1", port: int | None = None, block: bool = True
) -> Any:
    """Build and serve the page on ``host:port`` (loopback unless told otherwise); returns the Blocks."""
    app = build_app(explorer)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True,
               footer_links=[], max_file_size=MAX_UPLOAD)  # fmt: skip
    return app
