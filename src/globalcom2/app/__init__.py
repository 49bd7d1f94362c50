"""`globalcom2 explore`: a browser app to see what each method keeps, on any image, at any budget.

- :mod:`globalcom2.app.explore` holds everything but the page: loading the model once per family, turning the
  page's inputs into plans (the same :func:`globalcom2.evaluation.visual.method_plan` as
  ``globalcom2 visualize --methods``), the
  Figure-7 overlays (:func:`globalcom2.workflows.render_plan`, :func:`globalcom2.viz.overlay.render_grid`), the
  counts from :func:`globalcom2.viz.numbers.figure_summary` and the paper's prefill FLOPs
  (:func:`globalcom2.bench.flops.paper_prefill_flops`, Sec. 5.4). It imports no Gradio and is tested without a
  browser.
- :mod:`globalcom2.app.ui` is the Gradio page (the optional ``[app]`` extra); :mod:`globalcom2.app.cli` registers
  the subcommand.
"""

from __future__ import annotations
