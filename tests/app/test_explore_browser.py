"""`globalcom2 explore` in a real headless Chromium: a real server (the CLI, on a free loopback port, stopped by pid)
and a real browser (Selenium + the OS's chromium / chromedriver, installed by ``scripts/install_browser.sh``).

Checked: a shipped photo uploaded as a file, R and the methods changed, and the counts the page shows equal
`apply`'s plans for the same inputs (and the downloadable plan JSON); a bad upload gives a message and the server
keeps serving; two browser sessions at once each get their own results. Marked ``full`` (about 2-3 min on 2 busy
cores): ``.ci/run`` installs the browser and runs it with ``GLOBALCOM2_REQUIRE_BROWSER=1``, where a missing
browser fails instead of skipping.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.full

CHROMIUM = os.environ.get("GLOBALCOM2_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("GLOBALCOM2_CHROMEDRIVER", "/usr/bin/chromedriver")
OPTIONS = {"mode": "budget", "allocation": "softmax-sum", "scoring": "holistic", "score": "logits",
           "importance": "auto", "alpha": 0.5, "tau": 10.0}  # fmt: skip
WAIT_S = 240  # one Compress on 2 busy cores: ~10 s per method


def _require(what: str) -> None:
    message = f"{what} (install it: bash scripts/install_browser.sh)"
    if os.environ.get("GLOBALCOM2_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _browser_or_skip():
    for module in ("gradio", "selenium"):
        try:
            __import__(module)
        except ImportError:
            _require(f"{module} is not installed")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).exists() or shutil.which(path)):
            _require(f"{path} not found")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(folder: Path, *args: str):
    """``globalcom2 explore ARGS`` on a free loopback port; yields ``(url, process, port)``; stopped by its pid."""
    _browser_or_skip()
    port = _free_port()
    log = folder / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "globalcom2", "explore", "--port", str(port), *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).read(100)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield url, proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The stand-in explorer (LLaVA-NeXT first)."""
    with _serve(tmp_path_factory.mktemp("explore")) as served:
        yield served


def _listening_addresses(port: int) -> set[str]:
    """The IPv4/IPv6 addresses a socket listens on at ``port`` (Linux /proc/net; hex as the kernel writes it)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


@pytest.fixture(scope="module")
def standin():
    from globalcom2.loading import load_standin

    return load_standin()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Shipped photos written as PNG files to upload, and a text file that is no image."""
    from globalcom2.demo.photos import load_photo

    folder = tmp_path_factory.mktemp("uploads")
    files = {}
    for name in ("astronaut", "chelsea"):
        files[name] = folder / f"{name}.png"
        load_photo(name).save(files[name])
    files["text"] = folder / "notes.txt"
    files["text"].write_text("this is not an image\n")
    return files


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,2000"):  # fmt: skip
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


class Page:
    """The explorer's page in one browser session (element ids ``gc-*``, see globalcom2.app.ui)."""

    def __init__(self, url: str):
        from selenium.webdriver.common.by import By

        self.by = By
        self.driver = _browser()
        self.driver.get(url)
        self.wait_for(lambda: self.find("#gc-run"), "the page to load")

    def find(self, css: str):
        found = self.driver.find_elements(self.by.CSS_SELECTOR, css)
        return found[0] if found else None

    def wait_for(self, condition, what: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}")

    def upload(self, path: Path) -> None:
        self.find("#gc-upload input[type=file]").send_keys(str(path))
        self.wait_for(
            lambda: self.find(f"#gc-upload td.filename[aria-label='{path.name}']"), f"{path.name} to upload"
        )

    def set_ratio(self, value: float) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.find("#gc-ratio input[type=number]")
        box.clear()
        box.send_keys(str(value), Keys.TAB)
        self.wait_for(lambda: self.find("#gc-ratio input[type=range]").get_attribute("value") == str(value),
                      "the slider to follow")  # fmt: skip

    def set_methods(self, methods: list[str]) -> None:
        for label in self.driver.find_elements(self.by.CSS_SELECTOR, "#gc-methods label"):
            box = label.find_element(self.by.CSS_SELECTOR, "input")
            if box.is_selected() != (label.text.strip() in methods):
                label.click()
        chosen = [lb.text.strip() for lb in self.driver.find_elements(self.by.CSS_SELECTOR, "#gc-methods label")
                  if lb.find_element(self.by.CSS_SELECTOR, "input").is_selected()]  # fmt: skip
        assert sorted(chosen) == sorted(methods)

    def choose(self, elem_id: str, value: str) -> None:
        """Pick ``value`` in the Gradio dropdown ``#elem_id``."""
        self.find(f"#{elem_id} input").click()
        self.wait_for(
            lambda: self.find(f"ul[role=listbox] li[aria-label='{value}']"), f"option {value}"
        ).click()
        self.wait_for(
            lambda: self.find(f"#{elem_id} input").get_attribute("value") == value, f"{elem_id} = {value}"
        )

    def set_budget(self, tokens: int | None) -> None:
        """Budget by R (``tokens`` None) or by at most ``tokens`` image tokens T."""
        from selenium.webdriver.common.keys import Keys

        self.driver.find_elements(self.by.CSS_SELECTOR, "#gc-budget label")[
            0 if tokens is None else 1
        ].click()
        if tokens is not None:
            box = self.find("#gc-tokens input")
            box.clear()
            box.send_keys(str(tokens), Keys.TAB)

    def message(self) -> str:
        """The message above the result (the Markdown itself, not the progress overlay on it)."""
        return self.find("#gc-message [data-testid=markdown]").text.strip()

    def busy(self) -> bool:
        tracker = self.find("#gc-message [data-testid=status-tracker]")
        return tracker is not None and "hide" not in (tracker.get_attribute("class") or "").split()

    def click_compress(self) -> str:
        before = self.message()
        self.find("#gc-run").click()
        # a quick error may come and go between two polls: a changed message also says it started
        self.wait_for(lambda: self.busy() or self.message() != before, "the request to start", 30)
        return before

    def wait_result(self, before: str) -> str:
        return self.wait_for(lambda: not self.busy() and self.message() != before and self.message(), "a result",
                             WAIT_S)  # fmt: skip

    def compress(self) -> str:
        return self.wait_result(self.click_compress())

    def counts(self) -> dict[str, list[str]]:
        """The first table of the result: method -> its cells."""
        table = self.find("#gc-counts table")
        rows = {}
        for tr in table.find_elements(self.by.CSS_SELECTOR, "tbody tr"):
            cells = [td.text.strip() for td in tr.find_elements(self.by.CSS_SELECTOR, "td")]
            rows[cells[0]] = cells[1:]
        return rows

    def plan_json(self) -> dict:
        link = self.wait_for(lambda: self.find("#gc-plan a[href]"), "the plan JSON link")
        with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as response:
            return json.loads(response.read())

    def close(self) -> None:
        self.driver.quit()


def _expected(standin, image, method: str, ratio: float | None, tokens: int | None = None):
    """`apply`'s plan for the page's inputs: what `globalcom2 visualize` computes."""
    from globalcom2.evaluation.visual import method_plan
    from globalcom2.workflows import plan_for_image

    model, processor = standin
    if method == "globalcom2":
        return plan_for_image(model, processor, image, ratio=ratio, max_image_tokens=tokens, **OPTIONS)
    extra = {} if tokens is None else {"max_image_tokens": tokens}
    return method_plan(
        model, processor, image, method, ratio, question="What is shown in this image?", **extra
    )


def _assert_shows(page: Page, standin, image, ratio: float | None, methods: list[str],
                  tokens: int | None = None) -> dict:  # fmt: skip
    """The page's table and its plan JSON hold `apply`'s counts for each of ``methods``."""
    from globalcom2.viz.numbers import panel_numbers

    rows, payload = page.counts(), page.plan_json()
    assert sorted(rows) == sorted(methods)
    assert [p["method"] for p in payload["plans"]] == methods
    for method, record in zip(methods, payload["plans"], strict=True):
        plan = _expected(standin, image, method, ratio, tokens)
        nb = panel_numbers(plan)
        used = ratio if tokens is None else plan.ratio
        assert float(rows[method][0]) == pytest.approx(used, rel=1e-3), method
        shown = [int(c) for c in rows[method][1:6]]
        assert shown == [plan.num_tokens, plan.num_tokens_full, nb.thumbnail_tokens, nb.crops_tokens,
                         nb.newline_tokens], method  # fmt: skip
        assert (record["num_tokens"], record["crop_tokens"]) == (plan.num_tokens, list(nb.crop_tokens)), (
            method
        )
        assert record["ratio"] == pytest.approx(used)
    return payload


def test_upload_ratio_methods_and_bad_upload(server, standin, photos):
    from globalcom2.demo.photos import load_photo

    url, proc, port = server
    if Path("/proc/net/tcp").exists():  # bound to loopback only: 127.0.0.1, as the kernel writes it
        assert _listening_addresses(port) == {"0100007F"}
    page = Page(url)
    try:
        page.upload(photos["astronaut"])
        page.set_ratio(0.1)
        page.set_methods(["globalcom2", "fastervlm"])
        message = page.compress()
        assert message.startswith("astronaut.png (512x512)"), message
        payload = _assert_shows(page, standin, load_photo("astronaut"), 0.1, ["globalcom2", "fastervlm"])
        assert payload["image"] == {"name": "astronaut.png", "width": 512, "height": 512}
        assert page.find("#gc-picture img") is not None

        page.find("#gc-upload button[aria-label='Clear']").click()
        page.upload(photos["text"])
        message = page.compress()
        assert message.startswith("Error:") and "cannot read image notes.txt" in message, message
        assert page.find("#gc-counts table") is None

        page.find("#gc-upload button[aria-label='Clear']").click()  # back to the shipped photo (astronaut)
        page.set_methods(["globalcom2"])
        page.set_budget(1)  # an absurd budget: fewer tokens than any R gives
        message = page.compress()
        assert message.startswith("Error:") and "too small for this image" in message, message
        page.set_budget(288)
        message = page.compress()
        assert message.startswith("photo:astronaut (512x512)"), message
        _assert_shows(page, standin, load_photo("astronaut"), None, ["globalcom2"], tokens=288)
    finally:
        page.close()
    assert proc.poll() is None  # still serving


def test_two_sessions_get_their_own_results(server, standin, photos):
    from globalcom2.demo.photos import load_photo

    url, proc, _ = server
    first, second = Page(url), Page(url)
    try:
        first.upload(photos["chelsea"])  # chelsea at R = 0.5
        first.set_ratio(0.5)
        second.set_ratio(0.15)  # the default photo (astronaut) at R = 0.15
        befores = [page.click_compress() for page in (first, second)]
        results: dict[int, str] = {}
        waits = [threading.Thread(target=lambda k=k, p=p, b=b: results.__setitem__(k, p.wait_result(b)))
                 for k, (p, b) in enumerate(zip((first, second), befores, strict=True))]  # fmt: skip
        for t in waits:
            t.start()
        for t in waits:
            t.join()
        assert results[0].startswith("chelsea.png"), results
        assert results[1].startswith("photo:astronaut"), results
        _assert_shows(first, standin, load_photo("chelsea"), 0.5, ["globalcom2"])
        _assert_shows(second, standin, load_photo("astronaut"), 0.15, ["globalcom2"])
    finally:
        first.close()
        second.close()
    assert proc.poll() is None


def test_family_switch(server, photos):
    """The family dropdown loads that family's stand-in; a method the family does not support is a note."""
    from globalcom2.demo.photos import load_photo
    from globalcom2.loading import load_standin

    url, proc, _ = server
    internvl = load_standin(family="internvl")
    image = load_photo("astronaut")
    try:  # the baselines' support of other families is growing: expect a row where it runs, else its note
        _expected(internvl, image, "fastervlm", 0.25)
        runs, refusal = ["globalcom2", "fastervlm"], None
    except (TypeError, ValueError) as err:
        runs, refusal = ["globalcom2"], f"fastervlm: {str(err).splitlines()[0]}"
    page = Page(url)
    try:
        page.choose("gc-family", "internvl")
        page.set_methods(["globalcom2", "fastervlm"])
        message = page.compress()
        assert message.startswith(f"photo:astronaut (512x512), {len(runs)} method(s)"), message
        if refusal is not None:
            assert refusal in message, message
        payload = _assert_shows(page, internvl, image, 0.25, runs)
        assert payload["family"] == "internvl"
    finally:
        page.close()
    assert proc.poll() is None


def test_checkpoint_model(tmp_path, tiny_clip_dir):
    """``--model <checkpoint>``: the family is the checkpoint's (not a choice) and the counts are its plans."""
    from globalcom2.demo.photos import load_photo
    from globalcom2.demo.tiny_model import load_tiny

    with _serve(tmp_path, "--model", str(tiny_clip_dir)) as (url, proc, _):
        page = Page(url)
        try:
            family = page.find("#gc-family input")
            assert family.get_attribute("value") == "LlavaNextForConditionalGeneration"
            assert not family.is_enabled()
            page.set_ratio(0.4)
            message = page.compress()
            assert message.startswith("photo:astronaut (512x512), 1 method(s)"), message
            payload = _assert_shows(
                page, load_tiny(tiny_clip_dir), load_photo("astronaut"), 0.4, ["globalcom2"]
            )
            assert payload["model"] == str(tiny_clip_dir)
        finally:
            page.close()
        assert proc.poll() is None
