"""Print the per-family token-count tables of docs/max_image_tokens.md (pure geometry, no weights, < 1 s).

Usage::

    python scripts/budget_table.py
"""

from __future__ import annotations

from globalcom2.evaluation.budget_table import all_tables

if __name__ == "__main__":
    print(all_tables(), end="")
