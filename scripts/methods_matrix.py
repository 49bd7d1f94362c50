"""Rewrite the README's method x family table from the registry (run after registering a family or a method):
``python scripts/methods_matrix.py`` rewrites README.md between the methods-matrix markers."""

from __future__ import annotations

from pathlib import Path

from globalcom2.methods import support_matrix_markdown

START, END = "<!-- methods-matrix:start -->\n", "\n<!-- methods-matrix:end -->"


def main() -> None:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + START + support_matrix_markdown() + END + tail)
    print(f"rewrote the method x family table in {readme}")


if __name__ == "__main__":
    main()
