"""`pytest --nbmake notebooks`: run every notebook in QUICK mode, except those listed in SKIPPED.md.

SKIPPED.md is the one place a notebook is left out of CI, with its reason (parsed by
:func:`workbench.docs.skipped_notebooks`); the reason appears in pytest's skip summary.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workbench.docs import skipped_notebooks

HERE = Path(__file__).resolve().parent
SKIP_FILE = HERE / "SKIPPED.md"

# QUICK only shrinks sizes; a user can still run the full notebooks with WORKBENCH_QUICK=0.
os.environ.setdefault("WORKBENCH_QUICK", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skipped = skipped_notebooks(SKIP_FILE)
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if path.suffix == ".ipynb" and path.parent == HERE and path.name in skipped:
            item.add_marker(pytest.mark.skip(reason=f"notebooks/SKIPPED.md: {skipped[path.name]}"))
