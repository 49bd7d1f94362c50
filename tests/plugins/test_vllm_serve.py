"""GlobalCom² behind a real ``vllm serve`` (OpenAI-compatible server), queried with the ``openai`` client.

For each family (tiny checkpoints, see vllm_checkpoints.py) and each budget (``ratio=0.25`` and
``max_image_tokens=T``), one server runs as a subprocess on 127.0.0.1 (a free port), started exactly as
docs/engines.md says (``vllm serve DIR --hf-overrides ...`` with ``VLLM_CPU_KVCACHE_SPACE`` on this CPU build) and
stopped by its pid at the end of its tests. Every server is checked for:

- ``usage.prompt_tokens`` of base64 PNG images of several sizes against the formula (text tokens + the image's
  budget-mode count from the library's geometry and count functions);
- 16 concurrent mixed-size requests (threads) giving the same answers as the same requests sent one by one;
- bad input (malformed base64, bytes that are not an image, a 4000x4000 image): an HTTP 4xx or a correct answer, and
  the server still answering a good request correctly afterwards.

With ``GLOBALCOM2_SERVE_REPORT=DIR`` the measured counts are written to ``DIR/serve_counts.{json,md}`` (the table
in docs/engines.md). Needs vLLM and ``openai`` (``bash scripts/setup_engines.sh vllm VENV``); skipped without them.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import random_image

if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("openai") is None:
    pytest.skip(
        "vLLM and openai are not installed (bash scripts/setup_engines.sh vllm VENV)", allow_module_level=True
    )

import openai  # noqa: E402

from tests.plugins.vllm_checkpoints import FAMILIES, image_tokens, lazy_checkpoints  # noqa: E402

pytestmark = pytest.mark.slow

VLLM = Path(sys.executable).parent / "vllm"
STARTUP_TIMEOUT_S = 900  # two shared CPU cores: three vLLM processes import and profile
REQUEST_TIMEOUT_S = 300
TEXT = "What is shown in this image?"
MAX_TOKENS = 6
BUDGETS = {"ratio": {"ratio": 0.25}, "tokens": None}  # None: the family's max_image_tokens
_REPORT: dict[str, Any] = {}


def _options(family: Any, budget: str) -> dict:
    return BUDGETS[budget] or {"max_image_tokens": family.max_image_tokens}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One ``vllm serve`` subprocess in its own session; :meth:`stop` ends it by its pid (its group on timeout)."""

    def __init__(self, model_dir: Path, hf_overrides: dict, log: Path) -> None:
        self.port = _free_port()
        self.log = log
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
        env.pop("GLOBALCOM2_VLLM", None)
        cmd = [str(VLLM), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096", "--seed", "0",
               "--hf-overrides", json.dumps(hf_overrides)]  # fmt: skip
        self.cmd = cmd
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2)
        raise TimeoutError(f"vllm serve did not answer /health within {STARTUP_TIMEOUT_S}s:\n{self.tail()}")

    def tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # the API server shuts its engine and worker processes down
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session we started, nothing else
                self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return lazy_checkpoints(tmp_path_factory, "serve")


@pytest.fixture(
    scope="module", params=[(f, b) for f in FAMILIES for b in BUDGETS], ids=lambda p: f"{p[0]}-{p[1]}"
)
def served(request, checkpoints, tmp_path_factory):
    """(family, budget name, options, vLLM dir, openai client) of a running server; one server at a time."""
    name, budget = request.param
    family = FAMILIES[name]
    _, vllm_dir = checkpoints(name)
    options = _options(family, budget)
    log = tmp_path_factory.mktemp("serve_logs") / f"{name}-{budget}.log"
    server = Server(vllm_dir, {"architectures": [family.architecture], "globalcom2": options}, log)
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S,
                               max_retries=0)  # fmt: skip
        _REPORT.setdefault(name, {})[budget] = {
            "options": options,
            "serve_command": _command_text(server.cmd),
        }
        yield family, budget, options, vllm_dir, client
    finally:
        server.stop()


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    out = os.environ.get("GLOBALCOM2_SERVE_REPORT")
    if out and _REPORT:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "serve_counts.json").write_text(json.dumps(_REPORT, indent=1))
        (Path(out) / "serve_counts.md").write_text(_markdown(_REPORT))


def _command_text(cmd: list[str]) -> str:
    args = [a if not a.startswith("{") else f"'{a}'" for a in cmd[1:]]
    return "VLLM_CPU_KVCACHE_SPACE=1 vllm " + " ".join(Path(a).name if a.startswith("/") else a for a in args)


def _markdown(report: dict) -> str:
    lines = []
    for name, fam in report.items():
        t = fam.get("tokens", {}).get("options", {}).get("max_image_tokens")
        commands = [f"`{fam[b]['serve_command']}`" for b in BUDGETS if b in fam]
        lines += [f"### {name}", "", *commands, "",
                  f"| image (h x w) | uncompressed (formula) | R = 0.25: prompt_tokens (formula) | T = {t}: prompt_tokens "
                  "(formula) | image tokens: full / R = 0.25 / T |", "|---|---|---|---|---|"]  # fmt: skip
        rows = {tuple(r["size"]): r for r in fam.get("ratio", {}).get("counts", [])}
        rows_t = {tuple(r["size"]): r for r in fam.get("tokens", {}).get("counts", [])}
        for size in rows or rows_t:
            r, rt = rows.get(size, {}), rows_t.get(size, {})
            base = r or rt
            lines.append(
                f"| {size[0]} x {size[1]} | {base['text_tokens'] + base['image_full']} | "
                f"{r.get('prompt_tokens')} ({r.get('expected')}) | {rt.get('prompt_tokens')} ({rt.get('expected')}) | "
                f"{base['image_full']} / {r.get('image_tokens')} / {rt.get('image_tokens')} |"
            )
        for budget in ("ratio", "tokens"):
            extra = fam.get(budget, {})
            if "concurrency" in extra:
                lines.append(f"\n{budget}: {extra['concurrency']}; bad input: {extra.get('bad_input')}")
        lines.append("")
    return "\n".join(lines) + "\n"


# -- requests ------------------------------------------------------------------------------------------------------
def _png_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(client: Any, url: str) -> Any:
    model = client.models.list().data[0].id
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": TEXT}]}],
        max_tokens=MAX_TOKENS, temperature=0.0, logprobs=True, top_logprobs=3, seed=0,
    )  # fmt: skip


def _answer(response: Any) -> dict:
    """What must not depend on batching: text, token count and the top log-probabilities of each step."""
    steps = response.choices[0].logprobs.content
    return {
        "text": response.choices[0].message.content,
        "prompt_tokens": response.usage.prompt_tokens,
        "logprobs": [[round(t.logprob, 3) for t in s.top_logprobs] for s in steps],
        "tokens": [[t.token for t in s.top_logprobs] for s in steps],
    }


def _text_tokens(family: Any, model_dir: Path) -> int:
    """Prompt tokens besides the image's: the chat template around ``<placeholder>\\n{TEXT}`` minus the placeholder
    (vLLM puts the model's placeholder before the text for string-content templates)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": f"{family.image_token}\n{TEXT}"}],
        add_generation_prompt=True,
        tokenize=True,
    )
    ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
    return len(ids) - 1


def _expected(family: Any, model_dir: Path, options: dict, height: int, width: int) -> int:
    return _text_tokens(family, model_dir) + image_tokens(family, model_dir, height, width, options)


# -- the tests -------------------------------------------------------------------------------------------------------
def test_prompt_tokens_match_the_formula(served):
    family, budget, options, model_dir, client = served
    text = _text_tokens(family, model_dir)
    counts = []
    for i, (h, w) in enumerate(family.sizes):
        got = _ask(client, _png_url(random_image(h, w, seed=i))).usage.prompt_tokens
        image = image_tokens(family, model_dir, h, w, options)
        full = image_tokens(family, model_dir, h, w, None)
        counts.append({"size": [h, w], "prompt_tokens": got, "expected": text + image, "text_tokens": text,
                       "image_tokens": image, "image_full": full})  # fmt: skip
        assert got == text + image, (h, w, got, text, image)
    _REPORT[family.name][budget]["counts"] = counts
    images = [c["image_tokens"] for c in counts]
    fulls = [c["image_full"] for c in counts]
    if budget == "ratio":
        assert all(i < 0.4 * f for i, f in zip(images, fulls, strict=True))
    else:
        t = options["max_image_tokens"]
        assert all(i <= t for i in images)
        assert images[0] == fulls[0] <= t  # an image already under T is left whole
        assert all(i < f for i, f in zip(images[1:], fulls[1:], strict=True))


def test_concurrent_requests_equal_sequential_ones(served):
    family, budget, options, model_dir, client = served
    sizes = [family.sizes[i % len(family.sizes)] for i in range(16)]
    urls = [_png_url(random_image(h, w, seed=100 + i)) for i, (h, w) in enumerate(sizes)]
    sequential = [_answer(_ask(client, u)) for u in urls]
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = [_answer(r) for r in pool.map(lambda u: _ask(client, u), urls)]
    seconds = time.monotonic() - start
    for i, (a, b) in enumerate(zip(sequential, concurrent, strict=True)):
        assert a["text"] == b["text"] and a["prompt_tokens"] == b["prompt_tokens"], (i, a, b)
        assert a["tokens"][0] == b["tokens"][0], (i, a, b)
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=2e-3, err_msg=str(i))
        assert a["prompt_tokens"] == _expected(family, model_dir, options, *sizes[i])
    # The answers depend on the image, so equal answers are not a matter of course.
    assert len({json.dumps(a["logprobs"]) for a in sequential}) > 1
    _REPORT[family.name][budget]["concurrency"] = (
        f"16 concurrent mixed-size requests equal to sequential ones ({seconds:.1f} s)"
    )


def test_bad_input_gets_4xx_or_a_correct_answer_and_the_server_keeps_serving(served):
    family, budget, options, model_dir, client = served
    good = _png_url(random_image(*family.sizes[1], seed=1))
    before = _answer(_ask(client, good))
    small = np.random.default_rng(0).integers(0, 255, (250, 250, 3), dtype=np.uint8)
    from PIL import Image

    huge = Image.fromarray(small).resize((4000, 4000), Image.NEAREST)  # blocky: a small PNG of 4000x4000 px
    bad = {
        "malformed base64": "data:image/png;base64,!!not*base64@@",
        "not an image": "data:image/png;base64,"
        + base64.b64encode(b"these bytes are no image at all").decode(),
        "4000x4000": _png_url(huge),
    }
    results = {}
    for what, url in bad.items():
        try:
            response = _ask(client, url)
        except openai.APIStatusError as err:
            assert 400 <= err.status_code < 500, (what, err.status_code, err.message)
            results[what] = f"HTTP {err.status_code}"
        else:  # served: then it must be the right answer for that image
            assert what == "4000x4000", (what, response)
            assert response.usage.prompt_tokens == _expected(family, model_dir, options, 4000, 4000)
            results[what] = f"answered, prompt_tokens {response.usage.prompt_tokens} = formula"
    assert _answer(_ask(client, good)) == before  # still serving, and still the same answer
    _REPORT[family.name][budget]["bad_input"] = results
