"""Generated documentation and the small facts the notebooks and lessons share.

- :func:`metrics_glossary_markdown` — ``lessons/metrics.md``, built from the ``*_METRIC_DOCS`` dicts the code
  emits from (a test checks the committed file is this function's output, and that documented and emitted
  keys are the same set). Regenerate with ``python -m workbench.docs glossary lessons/metrics.md``.
- :data:`REPO_URL` and :func:`colab_setup_source` — the setup cell every notebook starts with (installs the
  package when ``workbench`` is missing, e.g. in Colab). The URL lives here; a test checks every notebook's
  first code cell installs from exactly this URL.
- :func:`skipped_notebooks` / :func:`notebook_skip_reason` — the one list of notebooks left out of CI,
  ``notebooks/SKIPPED.md``, honoured by ``notebooks/conftest.py``.
- :func:`strip_outputs` — make a notebook commit-ready (no outputs, no execution counts, no widget state):
  ``python -m workbench.docs strip notebooks/*.ipynb``.
- :func:`environment_summary` — versions and device for the setup check of notebook 00.
- :class:`Table` and :func:`config_table` — rows of numbers, and a config's non-default fields, as markdown
  tables in a notebook.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "GLOSSARY_SECTIONS",
    "REPO_URL",
    "Table",
    "colab_setup_source",
    "config_table",
    "environment_summary",
    "metric_doc_sources",
    "metrics_glossary_markdown",
    "notebook_skip_reason",
    "skipped_notebooks",
    "strip_outputs",
    "write_metrics_glossary",
]

# ----------------------------------------------------------------------------------------------------
# The project's git URL: the one place it is written.

REPO_URL: str = "https://github.com/dvp-workbench/dvp-workbench"
"""The project's public git URL — **set this to the real repository before publishing**; every notebook's
first cell installs ``git+REPO_URL`` when ``workbench`` is not importable (Colab). After changing it, rewrite
the notebooks' first cells with :func:`colab_setup_source` (``tests/test_notebooks_clean.py`` checks them)."""


def colab_setup_source(repo_url: str = REPO_URL) -> str:
    """Source of the setup cell every notebook starts with: install the workbench only where it is missing.

    Locally (``make lab``) the package is already installed and the cell does nothing; in Colab (or any fresh
    kernel) it pip-installs the project from its git URL and turns on Colab's widget manager, without which
    ipywidgets and plotly ``FigureWidget`` do not render there. The cell is plain Python (no magics) and
    imports nothing from ``workbench``.

    Args:
        repo_url: the git URL to install from (default :data:`REPO_URL`).

    Returns:
        The cell source.

    >>> src = colab_setup_source()
    >>> 'find_spec("workbench") is None' in src and REPO_URL in src
    True
    """
    if not re.fullmatch(r"https://[\w.\-/]+", repo_url):
        raise ValueError(f"repo_url={repo_url!r} must be a plain https:// git URL (no spaces or quotes)")
    return (
        "# Setup: in Colab (or any fresh Python) install the workbench; after `make lab` this does nothing.\n"
        "import importlib.util\n"
        "import subprocess\n"
        "import sys\n"
        "\n"
        f'REPO_URL = "{repo_url}"  # set once, in workbench/docs.py (REPO_URL)\n'
        'if importlib.util.find_spec("workbench") is None:\n'
        '    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"dvp-workbench @ git+{REPO_URL}"], check=True)\n'
        'if "google.colab" in sys.modules:  # Colab renders ipywidgets / plotly FigureWidget only with this\n'
        "    from google.colab import output\n"
        "\n"
        "    output.enable_custom_widget_manager()"
    )


# ----------------------------------------------------------------------------------------------------
# Metrics glossary

GLOSSARY_SECTIONS: tuple[tuple[str, str], ...] = (
    ("step", "Bookkeeping"),
    ("reward/", "Reward (what the task's verifier returned)"),
    ("eval/", "Evaluation (held-out prompts)"),
    ("response/", "Responses"),
    ("mismatch/", "Mismatch between trainer π and rollout engine μ (THEORY.md, 'Metrics to log')"),
    ("dvp/", "Dynamic vocabulary pruning (the safe set V_S, retained mass Z; THEORY.md §5)"),
    ("is/", "Importance sampling (before and after the correction)"),
    ("loss/", "Policy loss"),
    ("optim/", "Optimiser"),
    ("perf/", "Performance"),
)
"""Glossary sections: key prefix → heading, in the order the glossary lists them."""


def metric_doc_sources() -> dict[str, tuple[str, Mapping[str, str]]]:
    """Every ``*_METRIC_DOCS`` dict a training step emits from, by the symbol that defines it.

    Returns:
        ``{"workbench.trainer.TRAINER_METRIC_DOCS": (module path, dict), …}`` in the order
        :func:`workbench.trainer.all_metric_docs` merges them.
    """
    from workbench import importance, metrics, rloo, trainer

    return {
        "workbench.trainer.TRAINER_METRIC_DOCS": ("workbench/trainer.py", trainer.TRAINER_METRIC_DOCS),
        "workbench.metrics.MISMATCH_METRIC_DOCS": ("workbench/metrics.py", metrics.MISMATCH_METRIC_DOCS),
        "workbench.metrics.DVP_METRIC_DOCS": ("workbench/metrics.py", metrics.DVP_METRIC_DOCS),
        "workbench.importance.IS_METRIC_DOCS": ("workbench/importance.py", importance.IS_METRIC_DOCS),
        "workbench.rloo.BATCH_METRIC_DOCS": ("workbench/rloo.py", rloo.BATCH_METRIC_DOCS),
        "workbench.rloo.LOSS_METRIC_DOCS": ("workbench/rloo.py", rloo.LOSS_METRIC_DOCS),
    }


def _md_cell(text: str) -> str:
    """A markdown table cell: escape ``|`` and fold newlines."""
    return " ".join(text.split()).replace("|", "\\|")


def metrics_glossary_markdown() -> str:
    """The metrics glossary (``lessons/metrics.md``): every key of ``all_metric_docs()`` with its meaning.

    Keys are grouped by namespace (:data:`GLOSSARY_SECTIONS`); each row names the dict that documents it, so
    a reader can jump from a logged number to the code that computes it. Deterministic: the committed file
    must equal this string (``tests/test_docs.py``).

    Returns:
        Markdown text ending with a newline.
    """
    from workbench.trainer import all_metric_docs

    docs = all_metric_docs()
    source_of: dict[str, str] = {}
    for symbol, (_, d) in metric_doc_sources().items():
        for key in d:
            source_of.setdefault(key, symbol.rsplit(".", 1)[1])
    lines = [
        "# Metrics glossary",
        "",
        "<!-- Generated by `python -m workbench.docs glossary lessons/metrics.md` from the *_METRIC_DOCS dicts;",
        "     do not edit by hand (tests/test_docs.py checks this file equals the generated one). -->",
        "",
        "Every key a training step of `workbench.trainer.RLOOTrainer` can write to `metrics.jsonl` (and hand to",
        "callbacks and the live dashboard), with what it means and how it is estimated. Notation (THEORY.md):",
        "trainer policy π, rollout-engine policy μ, Δ = log μ − log π on a sampled token, token ratio",
        "r_t = π/μ, sequence ratio r(y) = Π_t r_t, safe set V_S = {a : π(a) ≥ ρ·max π}, retained mass",
        'Z = Σ_{a∈V_S} π(a). Keys documented as *ppo_clip only* appear only with `loss_type="ppo_clip"`.',
        "Healthy dense-model values from the literature: k1 ≈ 1e-3, k3 between 1e-5 and 1e-3, ESS > 0.5.",
        "",
    ]
    seen: set[str] = set()
    for prefix, heading in GLOSSARY_SECTIONS:
        keys = [k for k in docs if (k == prefix if not prefix.endswith("/") else k.startswith(prefix))]
        if not keys:
            continue
        lines += [f"## {heading}", "", "| key | meaning and estimator | documented in |", "|---|---|---|"]
        for key in keys:
            lines.append(f"| `{key}` | {_md_cell(docs[key])} | `{source_of.get(key, '?')}` |")
            seen.add(key)
        lines.append("")
    rest = [k for k in docs if k not in seen]
    if rest:
        lines += ["## Other", "", "| key | meaning and estimator | documented in |", "|---|---|---|"]
        lines += [f"| `{k}` | {_md_cell(docs[k])} | `{source_of.get(k, '?')}` |" for k in rest]
        lines.append("")
    return "\n".join(lines)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_metrics_glossary(path: str | os.PathLike[str]) -> Path:
    """Write :func:`metrics_glossary_markdown` to ``path`` atomically (temp file + rename)."""
    target = Path(path)
    _atomic_write_text(target, metrics_glossary_markdown())
    return target


# ----------------------------------------------------------------------------------------------------
# Notebooks left out of CI: notebooks/SKIPPED.md

_SKIP_ROW = re.compile(r"^\|\s*`?([\w.\-]+\.ipynb)`?\s*\|(.*)\|\s*$")


def skipped_notebooks(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse the skip list (``notebooks/SKIPPED.md``): ``{notebook file name: reason}``.

    The file is markdown; every table row whose first cell is a ``*.ipynb`` name is an entry, its second
    cell the reason. Anything else (prose, the header row) is ignored.

    Args:
        path: the markdown file.

    Returns:
        The entries, in file order.

    Raises:
        ValueError: the file is missing, a reason is empty, or a notebook is listed twice.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p} does not exist; create it (it lists the notebooks CI skips, possibly none)")
    out: dict[str, str] = {}
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        m = _SKIP_ROW.match(line.strip())
        if not m:
            continue
        name, reason = m.group(1), m.group(2).strip().strip("|").strip()
        if not reason:
            raise ValueError(f"{p}:{i}: {name} is skipped without a reason; say why in the second column")
        if name in out:
            raise ValueError(f"{p}:{i}: {name} is listed twice; keep one row")
        out[name] = reason
    return out


def notebook_skip_reason(notebook: str | os.PathLike[str], skip_file: str | os.PathLike[str]) -> str | None:
    """Why ``notebook`` is left out of CI according to ``skip_file``, or ``None`` when it runs.

    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "SKIPPED.md"
    >>> _ = f.write_text("| notebook | reason |\\n|---|---|\\n| `09_x.ipynb` | needs a GPU |\\n")
    >>> notebook_skip_reason("notebooks/09_x.ipynb", f), notebook_skip_reason("00_tour.ipynb", f)
    ('needs a GPU', None)
    """
    return skipped_notebooks(skip_file).get(Path(notebook).name)


# ----------------------------------------------------------------------------------------------------
# Commit-ready notebooks


def strip_outputs(path: str | os.PathLike[str]) -> bool:
    """Remove outputs, execution counts and stored widget state from a notebook, in place and atomically.

    Args:
        path: an ``.ipynb`` file.

    Returns:
        True when the file changed.
    """
    import nbformat

    p = Path(path)
    nb = nbformat.read(p, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    after = nbformat.writes(nb)
    if after == before:
        return False
    _atomic_write_text(p, after if after.endswith("\n") else after + "\n")
    return True


# ----------------------------------------------------------------------------------------------------
# Tables in notebooks


@dataclass(frozen=True)
class Table:
    """Rows of dicts shown as a markdown table in a notebook (``_repr_markdown_``) or as text.

    Floats are printed with ``fmt``; ``columns`` picks and orders the keys (default: the first row's).

    >>> print(Table([{"engine": "bf16", "k3": 1.23456e-05}]))
    | engine | k3 |
    |---|---|
    | bf16 | 1.23e-05 |
    """

    rows: Sequence[Mapping[str, object]]
    columns: Sequence[str] | None = None
    fmt: str = ".3g"

    def _cell(self, value: object) -> str:
        if isinstance(value, float):
            return format(value, self.fmt)
        return _md_cell(str(value))

    def __str__(self) -> str:
        if not self.rows:
            return "(no rows)"
        cols = list(self.columns) if self.columns is not None else list(self.rows[0])
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(self._cell(r.get(c, "")) for c in cols) + " |" for r in self.rows]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return str(self)


def config_table(config: object, base: object | None = None) -> Table:
    """The fields of a config dataclass that differ from ``base`` (default: the class defaults), as a table.

    STYLE.md: notebooks show the config with the fields that differ from the defaults marked.

    Args:
        config: a dataclass instance with a ``diff(other)`` method (e.g. :class:`workbench.trainer.RLOOConfig`).
        base: what to compare with (``None``: the defaults).

    Returns:
        A :class:`Table` with columns ``field``, ``value``, ``default``.
    """
    diff = config.diff(base)  # type: ignore[attr-defined]
    return Table([{"field": k, "value": repr(v), "default": repr(d)} for k, (v, d) in diff.items()])


# ----------------------------------------------------------------------------------------------------
# Setup check


def environment_summary() -> dict[str, str]:
    """Versions, device and shipped policies: what notebook 00 prints as its setup check.

    Returns:
        ``{name: value}`` with python, platform, torch, transformers, plotly, ipywidgets, sympy, workbench,
        device (the CUDA device name or ``cpu``), torch threads, whether vllm is importable, and the
        shipped policies.
    """
    import ipywidgets
    import plotly
    import sympy
    import torch
    import transformers

    import workbench
    from workbench.models import available_policies

    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    else:
        device = "cpu"
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(terse=True),
        "workbench": workbench.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "plotly": plotly.__version__,
        "ipywidgets": ipywidgets.__version__,
        "sympy": sympy.__version__,
        "device": device,
        "torch threads": str(torch.get_num_threads()),
        "vllm": "installed" if importlib.util.find_spec("vllm") is not None else "not installed (CPU path)",
        "shipped policies": ", ".join(available_policies()) or "none",
    }


# ----------------------------------------------------------------------------------------------------
# Command line: python -m workbench.docs glossary PATH | strip NOTEBOOK...


def main(argv: Sequence[str] | None = None) -> int:
    """``glossary PATH`` writes the metrics glossary; ``strip NB...`` strips notebooks. Returns an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] == "glossary":
        write_metrics_glossary(args[1])
        return 0
    if len(args) >= 2 and args[0] == "strip":
        changed = [a for a in args[1:] if strip_outputs(a)]
        sys.stderr.write(json.dumps({"stripped": changed}) + "\n")
        return 0
    sys.stderr.write("usage: python -m workbench.docs glossary PATH | strip NOTEBOOK...\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
