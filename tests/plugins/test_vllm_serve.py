"""GlobalCom² behind a real ``vllm serve`` (OpenAI-compatible server), queried with the ``openai`` client.

For each family (tiny checkpoints, see vllm_checkpoints.py) one server runs as a subprocess on 127.0.0.1 (a free
port), started exactly as docs/engines.md says (``vllm serve DIR --trust-request-mm-kwargs --hf-overrides ...`` with
the server default ``ratio=0.25``, prefix caching on, ``VLLM_CPU_KVCACHE_SPACE`` on this CPU build) and stopped by its pid at the end of
its tests. Per-request budgets go in ``extra_body={"mm_processor_kwargs": {...}}``. Every server is checked for:

- ``usage.prompt_tokens`` of base64 PNG images of several sizes against the formula (text tokens + the image's
  budget-mode count from the library's geometry and count functions), under the server default ``ratio=0.25``, a
  per-request ``max_image_tokens=T`` and a per-request ``ratio=1`` (uncompressed: vLLM's own count);
- 16 concurrent mixed-size requests with mixed per-request budgets (threads) giving the same answers as the same
  requests sent one by one;
- cache safety: the same image with budgets A, B, A, B, sent one by one and then all at once, gets each budget's
  ``prompt_tokens`` and the greedy tokens (and log-probabilities) of a fresh engine without any cache for that budget
  (``vllm_runner.py --requests``), while the server's prefix cache does get hits;
- a prompt with two images of different sizes under a per-request budget: each image gets its own count and its own
  plan, and the answer is the fresh engine's;
- bad per-request values: HTTP 400 with a one-line reason, and the server still answering correctly afterwards;
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import random_image, sweep

if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("openai") is None:
    pytest.skip(
        "vLLM and openai are not installed (bash scripts/setup_engines.sh vllm VENV)", allow_module_level=True
    )

import openai  # noqa: E402

from tests.plugins.vllm_checkpoints import FAMILIES, image_tokens, lazy_checkpoints  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "tests" / "plugins" / "vllm_runner.py"
VLLM = Path(sys.executable).parent / "vllm"
STARTUP_TIMEOUT_S = 900  # two shared CPU cores: three vLLM processes import and profile
REQUEST_TIMEOUT_S = 300
TEXT = "What is shown in this image?"
MAX_TOKENS = 6
CPU_KV_BLOCK = 128  # vLLM's CPU build's KV-cache block size (prefix-cache hits are whole blocks)
SERVER_OPTIONS = {"ratio": 0.25}  # the server default (--hf-overrides)
BUDGETS = ("ratio", "tokens")  # the server default R = 0.25; T per request (the family's max_image_tokens)
_REPORT: dict[str, Any] = {}


def _per_request(family: Any, budget: str) -> dict:
    """The request's ``mm_processor_kwargs`` for a budget name (empty: the server default)."""
    return {} if budget == "ratio" else {"max_image_tokens": family.max_image_tokens}


def _options(family: Any, budget: str) -> dict:
    """The options in force for a budget name (for the formula)."""
    return _per_request(family, budget) or SERVER_OPTIONS


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
               "--enable-prefix-caching", "--trust-request-mm-kwargs",
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


#: One server per family in the default tier; Qwen2-VL (the same diff as Qwen2.5-VL) with --full.
SERVED_FAMILIES = sweep(list(FAMILIES), default=[name for name in FAMILIES if name != "qwen2_vl"])


@pytest.fixture(scope="module", params=SERVED_FAMILIES)
def served(request, checkpoints, tmp_path_factory):
    """(family, vLLM dir, openai client, server base URL) of a running server; one server at a time."""
    name = request.param
    family = FAMILIES[name]
    _, vllm_dir = checkpoints(name)
    log = tmp_path_factory.mktemp("serve_logs") / f"{name}.log"
    server = Server(vllm_dir, {"architectures": [family.architecture], "globalcom2": SERVER_OPTIONS}, log)
    try:
        server.wait_ready()
        expected = os.environ.get("GLOBALCOM2_EXPECT_VLLM")  # the vLLM 0.33 step of scripts/test_engines.sh
        if expected:
            with urllib.request.urlopen(f"{server.base_url}/version", timeout=30) as r:
                assert json.loads(r.read())["version"].startswith(expected)
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S,
                               max_retries=0)  # fmt: skip
        _REPORT[name] = {
            budget: {"options": _options(family, budget), "per_request": _per_request(family, budget)}
            for budget in BUDGETS
        }
        _REPORT[name]["serve_command"] = _command_text(server.cmd)
        yield family, vllm_dir, client, server.base_url
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
        t = fam["tokens"]["per_request"]["max_image_tokens"]
        lines += [f"### {name}", "", f"`{fam['serve_command']}`", "",
                  f"| image (h x w) | uncompressed: prompt_tokens (formula) | R = 0.25 (server): prompt_tokens (formula) "
                  f"| T = {t} (request): prompt_tokens (formula) | image tokens: full / R = 0.25 / T |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in fam.get("counts", []):
            lines.append(
                f"| {r['size'][0]} x {r['size'][1]} | {r['full']['prompt_tokens']} ({r['full']['expected']}) | "
                f"{r['ratio']['prompt_tokens']} ({r['ratio']['expected']}) | {r['tokens']['prompt_tokens']} "
                f"({r['tokens']['expected']}) | {r['image_full']} / {r['ratio']['image_tokens']} / "
                f"{r['tokens']['image_tokens']} |"
            )
        for key in ("concurrency", "cache", "multi_image", "bad_options", "bad_input"):
            if key in fam:
                lines.append(f"\n{key.replace('_', ' ')}: {fam[key]}")
        lines.append("")
    return "\n".join(lines) + "\n"


# -- requests ------------------------------------------------------------------------------------------------------
def _png_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(client: Any, urls: str | list[str], mm_kwargs: dict | None = None) -> Any:
    """One chat request: the images, then TEXT; ``mm_kwargs`` go in ``extra_body["mm_processor_kwargs"]``."""
    model = client.models.list().data[0].id
    urls = [urls] if isinstance(urls, str) else urls
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [
        {"type": "text", "text": TEXT}
    ]
    extra: dict = {"return_token_ids": True}
    if mm_kwargs:
        extra["mm_processor_kwargs"] = mm_kwargs
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=MAX_TOKENS, temperature=0.0,
        logprobs=True, top_logprobs=3, seed=0, extra_body=extra,
    )  # fmt: skip


def _answer(response: Any) -> dict:
    """What must not depend on batching or caching: text, token ids, prompt length, top log-probabilities."""
    choice = response.choices[0]
    steps = choice.logprobs.content
    return {
        "text": choice.message.content,
        "token_ids": list(choice.model_extra["token_ids"]),
        "prompt_tokens": response.usage.prompt_tokens,
        "logprobs": [[round(t.logprob, 3) for t in s.top_logprobs] for s in steps],
        "tokens": [[t.token for t in s.top_logprobs] for s in steps],
    }


def _chat_prompt(family: Any, model_dir: Path, num_images: int) -> str:
    """The prompt vLLM renders for ``num_images`` images + TEXT (string-content template: the placeholders first,
    joined with the text by newlines)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    content = "\n".join([family.image_token] * num_images + [TEXT])
    return tok.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def _text_tokens(family: Any, model_dir: Path, num_images: int = 1) -> int:
    """Prompt tokens besides the images': the rendered chat prompt minus its placeholders."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(_chat_prompt(family, model_dir, num_images))["input_ids"]
    return len(ids) - num_images


def _expected(family: Any, model_dir: Path, options: dict, *sizes: tuple[int, int]) -> int:
    if family.single_tile and len(sizes) > 1:
        return _gemma3_expected(family, model_dir, options, sizes)
    return _text_tokens(family, model_dir, len(sizes)) + sum(
        image_tokens(family, model_dir, h, w, options) for h, w in sizes
    )


def _gemma3_expected(family: Any, model_dir: Path, options: dict, sizes: Any) -> int:
    """Gemma 3 with several images: the chat prompt with each ``<start_of_image>`` expanded as Gemma's processor
    expands it (``"\n\n<start_of_image>"``, the run at the formula's count, ``"<end_of_image>\n\n"``), tokenised
    whole: Gemma's tokenizer merges the newlines between two images into one token, as vLLM does."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    tok, n = processor.tokenizer, int(processor.image_seq_length)
    layout = image_tokens(family, model_dir, *sizes[0], None) - n
    parts = _chat_prompt(family, model_dir, len(sizes)).split(tok.boi_token)
    text = parts[0]
    for (h, w), part in zip(sizes, parts[1:], strict=True):
        run = image_tokens(family, model_dir, h, w, options) - layout
        text += processor.full_image_sequence.replace(tok.image_token * n, tok.image_token * run) + part
    return len(tok(text)["input_ids"])


def _prefix_cache_hits(base_url: str) -> float:
    """The server's ``vllm:prefix_cache_hits`` counter (tokens served from the prefix cache)."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:prefix_cache_hits_total") or line.startswith("vllm:prefix_cache_hits{")
    )


# -- the fresh-engine reference (no prefix cache, no processor cache) --------------------------------------------------
CACHE_IMAGE = 3  # index into family.sizes: an image that every budget compresses differently
MULTI = ((1, 11), (4, 12))  # (size index, seed) of the two images of the multi-image prompt


def _budget_pairs(family: Any) -> tuple[dict, dict]:
    """Budgets A and B of the cache test (per request): a ratio and a token budget."""
    return {"ratio": 0.5}, {"max_image_tokens": family.max_image_tokens}


@pytest.fixture(scope="module")
def reference(checkpoints, tmp_path_factory):
    """Family name -> the fresh engine's answers: [budget A, budget B, multi-image under B] (vllm_runner.py)."""
    done: dict[str, list[dict]] = {}

    def get(name: str) -> list[dict]:
        if name not in done:
            family = FAMILIES[name]
            _, model_dir = checkpoints(name)
            h, w = family.sizes[CACHE_IMAGE]
            a, b = _budget_pairs(family)
            multi = [[*family.sizes[i], seed] for i, seed in MULTI]
            requests = [
                {
                    "prompt": _chat_prompt(family, model_dir, 1),
                    "images": [[h, w, 0]],
                    "mm_processor_kwargs": a,
                },
                {
                    "prompt": _chat_prompt(family, model_dir, 1),
                    "images": [[h, w, 0]],
                    "mm_processor_kwargs": b,
                },
                {"prompt": _chat_prompt(family, model_dir, 2), "images": multi, "mm_processor_kwargs": b},
            ]
            tmp = tmp_path_factory.mktemp(f"ref_{name}")
            (tmp / "requests.json").write_text(json.dumps(requests))
            overrides = {"architectures": [family.architecture], "globalcom2": SERVER_OPTIONS}
            cmd = [sys.executable, str(RUNNER), str(model_dir), str(tmp / "out.json"),
                   "--hf-overrides", json.dumps(overrides), "--max-tokens", str(MAX_TOKENS),
                   "--requests", str(tmp / "requests.json")]  # fmt: skip
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # PYTHONPATH too (the vLLM 0.33 source step)
            env.pop("GLOBALCOM2_VLLM", None)
            run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            assert run.returncode == 0, run.stderr[-4000:]
            done[name] = json.loads((tmp / "out.json").read_text())
        return done[name]

    return get


def _same_as_reference(got: dict, ref: dict, what: str) -> None:
    assert got["prompt_tokens"] == ref["prompt_length"], (what, got, ref)
    assert got["token_ids"] == ref["generated"], (what, got, ref)
    np.testing.assert_allclose([s[0] for s in got["logprobs"]], ref["logprobs"], atol=2e-3, err_msg=what)


# -- the tests -------------------------------------------------------------------------------------------------------
def test_prompt_tokens_match_the_formula_per_request(served):
    """Server default R = 0.25, per-request T and per-request R = 1 (vLLM's own uncompressed count)."""
    family, model_dir, client, _ = served
    t = family.max_image_tokens
    budgets = {"ratio": ({}, SERVER_OPTIONS), "tokens": ({"max_image_tokens": t}, None),
               "full": ({"ratio": 1.0}, None)}  # fmt: skip
    text = _text_tokens(family, model_dir)
    counts = []
    for i, (h, w) in enumerate(family.sizes):
        url = _png_url(random_image(h, w, seed=i))
        row: dict[str, Any] = {"size": [h, w], "image_full": image_tokens(family, model_dir, h, w, None)}
        for name, (per_request, options) in budgets.items():
            got = _ask(client, url, per_request).usage.prompt_tokens
            image = image_tokens(family, model_dir, h, w, options or per_request)
            row[name] = {"prompt_tokens": got, "expected": text + image, "image_tokens": image}
            assert got == text + image, (name, h, w, got, text, image)
        counts.append(row)
    _REPORT[family.name]["counts"] = counts
    fulls = [r["image_full"] for r in counts]
    assert [r["full"]["image_tokens"] for r in counts] == fulls  # R = 1 is the uncompressed count
    limit = 0.45 if family.single_tile else 0.4  # the tiny Gemma 3: 4 of a tile's 20 span tokens are markers
    assert all(r["ratio"]["image_tokens"] < limit * f for r, f in zip(counts, fulls, strict=True))
    tokens = [r["tokens"]["image_tokens"] for r in counts]
    assert all(i <= t for i in tokens)
    if family.single_tile:  # one tile per image: one count whatever the size, compressed under T
        assert len(set(fulls)) == 1 and all(i < f for i, f in zip(tokens, fulls, strict=True))
    else:
        assert tokens[0] == fulls[0] <= t  # an image already under T is left whole
        assert all(i < f for i, f in zip(tokens[1:], fulls[1:], strict=True))


def test_concurrent_requests_equal_sequential_ones(served):
    family, model_dir, client, _ = served
    sizes = [family.sizes[i % len(family.sizes)] for i in range(16)]
    urls = [_png_url(random_image(h, w, seed=100 + i)) for i, (h, w) in enumerate(sizes)]
    budgets = [BUDGETS[i % 2] for i in range(16)]  # mixed per-request budgets in one batch
    jobs = [(u, _per_request(family, b)) for u, b in zip(urls, budgets, strict=True)]
    sequential = [_answer(_ask(client, u, kw)) for u, kw in jobs]
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = [_answer(r) for r in pool.map(lambda job: _ask(client, *job), jobs)]
    seconds = time.monotonic() - start
    for i, (a, b) in enumerate(zip(sequential, concurrent, strict=True)):
        assert a["token_ids"] == b["token_ids"] and a["prompt_tokens"] == b["prompt_tokens"], (i, a, b)
        assert a["tokens"][0] == b["tokens"][0], (i, a, b)
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=2e-3, err_msg=str(i))
        assert a["prompt_tokens"] == _expected(family, model_dir, _options(family, budgets[i]), sizes[i])
    # The answers depend on the image, so equal answers are not a matter of course.
    assert len({json.dumps(a["logprobs"]) for a in sequential}) > 1
    _REPORT[family.name]["concurrency"] = (
        f"16 concurrent mixed-size requests, half with a per-request T, equal to sequential ones ({seconds:.1f} s)"
    )


def test_same_image_with_two_budgets_never_shares_a_cached_result(served, reference):
    """A, B, A, B one by one, then all four at once: each answer is the fresh engine's for its budget."""
    family, model_dir, client, base_url = served
    ref_a, ref_b, _ = reference(family.name)
    a, b = _budget_pairs(family)
    assert ref_a["prompt_length"] != ref_b["prompt_length"]  # the two budgets are told apart by their counts
    h, w = family.sizes[CACHE_IMAGE]
    url = _png_url(random_image(h, w, seed=0))
    hits_before = _prefix_cache_hits(base_url)
    sequential = [_answer(_ask(client, url, kw)) for kw in (a, b, a, b)]
    hits_sequential = _prefix_cache_hits(base_url) - hits_before
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = [_answer(r) for r in pool.map(lambda kw: _ask(client, url, kw), (a, b, a, b))]
    for i, (got, ref) in enumerate(zip(sequential + concurrent, [ref_a, ref_b] * 4, strict=True)):
        _same_as_reference(got, ref, f"request {i} ({'AB'[i % 2]})")
        assert got["prompt_tokens"] == _expected(family, model_dir, (a, b)[i % 2], (h, w))
    # The cache was in play: the repeated requests were served (partly) from the prefix cache.
    # (A prompt shorter than one KV-cache block, 128 tokens on the CPU build, has nothing to hit: the tiny Gemma 3's,
    # Llama 4's and Cohere2 Vision's.)
    if min(ref_a["prompt_length"], ref_b["prompt_length"]) >= CPU_KV_BLOCK:
        assert hits_sequential > 0, hits_sequential
    _REPORT[family.name]["cache"] = (
        f"same {h}x{w} image, A = {a}, B = {b} per request, A B A B sequential then concurrent: prompt_tokens "
        f"{ref_a['prompt_length']} / {ref_b['prompt_length']} and greedy tokens equal to a fresh engine without "
        f"caches; {hits_sequential:.0f} prompt tokens served from the prefix cache"
    )


def test_multi_image_prompt_gets_one_plan_per_image(served, reference):
    family, model_dir, client, _ = served
    b = _budget_pairs(family)[1]
    ref = reference(family.name)[2]
    sizes = [family.sizes[i] for i, _ in MULTI]
    urls = [_png_url(random_image(*family.sizes[i], seed=seed)) for i, seed in MULTI]
    got = _answer(_ask(client, urls, b))
    _same_as_reference(got, ref, "two images")
    assert got["prompt_tokens"] == _expected(family, model_dir, b, *sizes)
    # Each image its own plan, with its own count (layout tokens aside) under the request's budget.
    assert len(ref["plans"]) == 2
    own = [image_tokens(family, model_dir, h, w, b) for h, w in sizes]
    full = [image_tokens(family, model_dir, h, w, None) for h, w in sizes]
    kept = [p["num_tokens"] for p in ref["plans"]]
    dropped = [p["num_tokens_full"] - p["num_tokens"] for p in ref["plans"]]
    assert dropped == [f - o for f, o in zip(full, own, strict=True)]  # each image as if alone
    assert (full[0] != full[1] or family.single_tile) and min(dropped) > 0  # two different images, compressed
    _REPORT[family.name]["multi_image"] = (
        f"two images {sizes[0]} and {sizes[1]} under {b}: prompt_tokens {got['prompt_tokens']} = formula "
        f"(image counts {own}), answer equal to a fresh engine's, one plan per image (kept {kept})"
    )


BAD_OPTIONS = {
    "ratio 0": {"ratio": 0},
    "ratio 1.5": {"ratio": 1.5},
    "ratio as a string": {"ratio": "0.5"},
    "max_image_tokens -3": {"max_image_tokens": -3},
    "both budgets": {"ratio": 0.5, "max_image_tokens": 100},
    "unknown allocation": {"allocation": "greedy"},
    "tau 0": {"tau": 0},
    "mode per request": {"mode": "reference"},
}


def test_bad_per_request_options_get_400_with_a_one_line_reason(served):
    family, model_dir, client, _ = served
    url = _png_url(random_image(*family.sizes[1], seed=1))
    before = _answer(_ask(client, url))
    results = {}
    for what, kwargs in BAD_OPTIONS.items():
        with pytest.raises(openai.APIStatusError) as info:
            _ask(client, url, kwargs)
        err = info.value
        message = err.body.get("message", "") if isinstance(err.body, dict) else str(err.body)
        assert err.status_code == 400, (what, err.status_code, message)
        assert "\n" not in message and "mm_processor_kwargs" in message, (what, message)
        assert next(iter(kwargs)) in message, (what, message)
        results[what] = f"HTTP 400: {message}"
    assert _answer(_ask(client, url)) == before  # still serving, and still the same answer
    _REPORT[family.name]["bad_options"] = results


def test_bad_input_gets_4xx_or_a_correct_answer_and_the_server_keeps_serving(served):
    family, model_dir, client, _ = served
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
            assert response.usage.prompt_tokens == _expected(family, model_dir, SERVER_OPTIONS, (4000, 4000))
            results[what] = f"answered, prompt_tokens {response.usage.prompt_tokens} = formula"
    assert _answer(_ask(client, good)) == before  # still serving, and still the same answer
    _REPORT[family.name]["bad_input"] = results
