"""CLI: unreadable, truncated, empty, huge or odd image files give one line and a clean exit status.

``main()`` is called in-process for the matrix (same code path as the console script, much faster); a few cases
run as real subprocesses. tests/test_cli.py covers a text file and a truncated PNG.
"""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from globalcom2 import cli
from tests.conftest import random_image
from tests.test_cli import run_cli


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG header announcing width x height pixels, with no pixel data (a 'decompression bomb' probe)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_images")
    good = d / "good.jpg"
    random_image(120, 200, seed=2).save(good, quality=90)
    data = good.read_bytes()
    out = {
        "empty": (d / "empty.png", b""),
        "truncated-jpeg": (d / "cut.jpg", data[: len(data) // 3]),
        "header-only-jpeg": (d / "head.jpg", data[:20]),
        "bomb": (d / "bomb.png", _png_claiming(20000, 20000)),
        "html": (d / "page.jpg", b"<html><body>not an image</body></html>"),
    }
    for path, content in out.values():
        path.write_bytes(content)
    (d / "folder.png").mkdir()
    return d, {k: v[0] for k, v in out.items()}


@pytest.mark.parametrize(
    "name, words",
    [
        ("empty", "the file is empty"),
        ("truncated-jpeg", "cannot read image"),
        ("header-only-jpeg", "cannot read image"),
        ("bomb", "exceeds limit"),
        ("html", "cannot identify image file"),
        ("folder", "it is a directory"),
        ("missing", "image file not found"),
    ],
)
def test_bad_image_files_one_line_exit_2(files, tiny_clip_dir, capsys, name, words):
    d, paths = files
    path = paths.get(name, d / ("folder.png" if name == "folder" else "nowhere.png"))
    for command in (["ask", "--ratio", "0.25", "q"], ["visualize", "--out", str(d / "o.png")]):
        code = cli.main([command[0], "--model", str(tiny_clip_dir), "--image", str(path), *command[1:]])
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert err.startswith("globalcom2: error: ") and words in err and str(path) in err, err
        assert len(err.strip().splitlines()) == 1


def test_truncated_jpeg_as_a_real_subprocess_and_debug_traceback(files, tiny_clip_dir):
    _, paths = files
    args = (
        "ask",
        "--model",
        str(tiny_clip_dir),
        "--image",
        str(paths["truncated-jpeg"]),
        "--ratio",
        "0.5",
        "q",
    )
    res = run_cli(*args)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "cannot read image" in res.stderr
    debug = run_cli("--debug", *args)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "CLIError" in debug.stderr


def test_unexpected_errors_are_one_line_unless_debug(tiny_clip_dir, photo_png, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyError("weights")

    monkeypatch.setattr(cli, "load_model", boom)
    argv = ["visualize", "--model", str(tiny_clip_dir), "--image", str(photo_png), "--out", "x.png"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert (
        err.strip()
        == "globalcom2: internal error: KeyError: 'weights' (rerun with --debug for the traceback)"
    )
    # --debug shows the traceback and keeps the exit status (before or after the subcommand)
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        assert cli.main(debug_argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and "KeyError: 'weights'" in err
        assert err.strip().splitlines()[-1] == "globalcom2: internal error: KeyError: 'weights'"


def test_unwritable_output_is_one_line(tiny_clip_dir, photo_png, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code = cli.main(["visualize", "--model", str(tiny_clip_dir), "--image", str(photo_png),
                     "--out", str(blocker / "sub" / "o.png")])  # fmt: skip
    err = capsys.readouterr().err  # after the model loaded: HF's progress bar may precede our line
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("globalcom2: error: ") and "Not a directory" in err


@pytest.fixture(scope="module")
def photo_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("ok") / "photo.png"
    random_image(120, 200, seed=3).save(path)
    return path


def test_16_bit_png_end_to_end_subprocess(tiny_clip_dir, tmp_path):
    """A 16-bit grayscale PNG runs through the real CLI (scaled to 8 bits, not clipped to white)."""
    ramp = (np.linspace(0, 65535, 90 * 170).reshape(90, 170)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # really stored as 16 bits
    out = tmp_path / "o.png"
    res = run_cli("visualize", "--model", str(tiny_clip_dir), "--image", str(path), "--ratio", "0.25",
                  "--out", str(out), "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)["plans"][0]
    assert plan["num_tokens"] < plan["num_tokens_full"]


def test_8000x8000_and_odd_modes_through_main(tiny_clip_dir, tmp_path, capsys):
    ramp = Image.linear_gradient("L").resize((8000, 8000))
    big = tmp_path / "big.png"
    Image.merge("RGB", (ramp, ramp.rotate(90), ramp)).save(big, compress_level=1)
    cmyk = tmp_path / "cmyk.jpg"
    random_image(100, 300, seed=4).convert("CMYK").save(cmyk)
    pal = tmp_path / "pal.gif"
    random_image(300, 100, seed=5).convert("P").save(pal)
    for path in (big, cmyk, pal):
        code = cli.main(["visualize", "--model", str(tiny_clip_dir), "--image", str(path),
                         "--out", str(tmp_path / "o.png"), "--json"])  # fmt: skip
        captured = capsys.readouterr()
        assert code == 0, captured.err
        plan = json.loads(captured.out)["plans"][0]
        assert 0 < plan["num_tokens"] < plan["num_tokens_full"]
