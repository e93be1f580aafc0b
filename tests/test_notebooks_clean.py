"""Committed notebooks are clean and follow the house conventions (STYLE.md 3–4), and the skip list works.

For every ``notebooks/*.ipynb``: valid nbformat, no outputs, no execution counts, no stored widget state; the
first code cell installs the package from :data:`workbench.docs.REPO_URL` when it is missing (see
:func:`workbench.docs.colab_setup_source`); exactly one ``parameters``-tagged
code cell, right after the imports, defining ``QUICK``. ``notebooks/SKIPPED.md`` is the one list of notebooks
left out of CI; ``notebooks/conftest.py`` must honour it. Fix a dirty notebook with
``python -m workbench.docs strip notebooks/NN_name.ipynb``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from workbench.docs import REPO_URL, colab_setup_source, skipped_notebooks

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
QUICK_LINE = 'QUICK = os.environ.get("WORKBENCH_QUICK") == "1"'
ALL = sorted(NOTEBOOKS.glob("*.ipynb"))


def test_there_are_notebooks() -> None:
    names = [p.name for p in ALL]
    assert "00_tour.ipynb" in names, names


@pytest.mark.parametrize("path", ALL, ids=[p.name for p in ALL])
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)
    ]
    assert not dirty, (
        f"{path.name}: cells {dirty} carry outputs or execution counts; "
        f"run `python -m workbench.docs strip notebooks/{path.name}` before committing"
    )
    assert "widgets" not in nb.metadata, f"{path.name} stores widget state; strip it (see above)"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", (
        f"{path.name}: kernelspec must be python3"
    )


@pytest.mark.parametrize("path", ALL, ids=[p.name for p in ALL])
def test_notebook_layout_follows_the_conventions(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    setup = code[0].source
    assert 'find_spec("workbench")' in setup and REPO_URL in setup, (
        f"{path.name}: the first code cell must install the workbench when it is missing, from "
        f"workbench.docs.REPO_URL ({REPO_URL}); paste workbench.docs.colab_setup_source()"
    )
    urls = set(re.findall(r"https?://[^\s\"'}]+", setup))
    assert urls <= {REPO_URL}, f"{path.name}: the setup cell names other URLs {urls - {REPO_URL}}"
    assert all(c.cell_type == "markdown" for c in nb.cells[: nb.cells.index(code[0])]), (
        f"{path.name}: only markdown (a title) may come before the setup cell"
    )
    tagged = [i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, (
        f"{path.name}: {len(tagged)} cells tagged 'parameters'; exactly one holds every knob"
    )
    params = code[tagged[0]]
    assert QUICK_LINE in params.source, f"{path.name}: the parameters cell must define {QUICK_LINE}"
    before = code[tagged[0] - 1].source if tagged[0] >= 1 else ""
    assert tagged[0] >= 2 and "import" in before, (
        f"{path.name}: the parameters cell must come right after the imports cell (setup, imports, parameters)"
    )


def test_skip_list_names_existing_notebooks_with_reasons() -> None:
    skipped = skipped_notebooks(NOTEBOOKS / "SKIPPED.md")
    names = {p.name for p in ALL}
    for name, reason in skipped.items():
        assert name in names, f"notebooks/SKIPPED.md lists {name}, which does not exist"
        assert len(reason) > 10, f"notebooks/SKIPPED.md: say why {name} is skipped"


def test_conftest_skips_exactly_the_listed_notebooks(tmp_path: Path) -> None:
    """Run pytest --nbmake on a scratch folder: the listed (failing) notebook is skipped with its reason."""
    shutil.copy(NOTEBOOKS / "conftest.py", tmp_path / "conftest.py")
    bad = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise RuntimeError('must not run')")])
    bad.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(bad, tmp_path / "99_broken.ipynb")
    (tmp_path / "SKIPPED.md").write_text(
        "| notebook | reason |\n|---|---|\n| `99_broken.ipynb` | needs a GPU to run |\n"
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbmake", "-p", "no:cacheprovider", "-rs", "-q", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 skipped" in out and "needs a GPU to run" in out, out


def test_reference_setup_cell_passes_the_layout_check() -> None:
    src = colab_setup_source()
    compile(src, "<setup>", "exec")
    assert 'find_spec("workbench")' in src and REPO_URL in src and json.dumps(src)
