"""The shared machinery of :mod:`workbench.theory`: result objects, small sympy provers, a tree policy.

Every check in this package returns a :class:`Check`: the statement (LaTeX, exactly as in THEORY.md), a list
of derivation :class:`Step` s — each either *proved by sympy* or explicitly an *assumption* (a hypothesis, a
model assumption, or a standard lemma we cite rather than re-prove) — and a dict of numeric cross-checks run
against the torch code in :mod:`workbench.dvp`. A check passes when every step is proved or assumed and every
numeric criterion holds. A step sympy *tried and failed* to prove fails the check: that is how a wrong
statement (the ``scale`` argument of every check function) is caught on the symbolic side.

Each check module declares its :class:`Statement` (name, title, LaTeX with ``{k}`` where the scale goes,
provenance), a derivation wrapped in :func:`scaled_derivation` (cached per scale, ending in a
:func:`conclusion` where it chains its steps), and a ``check_*`` function that runs its own numerics and
returns ``STATEMENT.to_check(scale, _derivation(scale), numeric, criteria, notes)``.

The provers here are deliberately small and sound (they can say "not proved" for a true statement, never
"proved" for a false one):

- :func:`is_zero` — ``simplify(expr) == 0``.
- :func:`prove_nonnegative` — put the expression over one denominator, expand numerator and denominator,
  and ask sympy's assumption system about their signs (a polynomial with non-negative coefficients in
  non-negative symbols is non-negative).
- :func:`prove_nonnegative_halfline` — ``h(x) ≥ 0`` on ``x ≥ 0`` from ``h(0) ≥ 0, …, h^{(n-1)}(0) ≥ 0`` and
  ``h^{(n)}(x) ≥ 0`` (repeated monotonicity).
- :func:`gaussian_expectation` — the expectation of a polynomial in i.i.d. standard normals, from moments.

:class:`TreePolicy` enumerates every sequence of a tiny autoregressive policy (one logit vector per prefix)
so expectations over sequences can be computed *exactly* (Theorem 4.1, Proposition 5.5).
"""

from __future__ import annotations

import functools
import html
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import sympy as sp
import torch

__all__ = [
    "Check",
    "Statement",
    "Step",
    "TreePolicy",
    "conclusion",
    "gaussian_expectation",
    "is_zero",
    "prove_nonnegative",
    "prove_nonnegative_halfline",
    "scale_prefix",
    "scaled_derivation",
    "sign_abs",
    "summary_markdown",
    "to_rational",
    "truncate_series",
    "validate_scale",
]

RECONSTRUCTED_NOTE = (
    "Reconstructed: the paper's full text was not available; this statement is the workbench's "
    "reconstruction (THEORY.md), derived to match the abstract and the quoted bounds."
)
"""The sentence every reconstructed check carries in its ``notes``."""

RECONSTRUCTED_TEX = r" \\ \text{(reconstructed: the paper's full text was not available; see THEORY.md)}"
"""Appended to the LaTeX statement of every reconstructed check."""

AS_STATED_NOTE = "As stated in THEORY.md (not a reconstruction)."
"""The sentence every check of a statement taken as THEORY.md writes it opens its ``notes`` with."""


# --------------------------------------------------------------------------------------------------------------
# Result objects
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One step of a derivation.

    Attributes:
        description: the step in words.
        latex: the step's formula (LaTeX, no surrounding ``$``).
        proved: sympy established it (see ``method``).
        assumption: taken as given — a hypothesis of the statement, a modelling assumption, or a standard
            lemma cited rather than re-proved. An assumption is not a failure; an unproved non-assumption is.
        method: how sympy proved it, or why it is assumed.
    """

    description: str
    latex: str
    proved: bool
    assumption: bool = False
    method: str = ""

    @property
    def ok(self) -> bool:
        """True when the step is proved or is an explicit assumption."""
        return self.proved or self.assumption

    @property
    def status(self) -> str:
        """``"proved"``, ``"assumption"`` or ``"NOT PROVED"``."""
        if self.proved:
            return "proved"
        return "assumption" if self.assumption else "NOT PROVED"


@dataclass
class Check:
    """The result of checking one statement: symbolic derivation + numeric cross-checks.

    Attributes:
        name: short identifier, e.g. ``"prop_4_2"``.
        title: human title, e.g. ``"Proposition 4.2 — asymmetric bound"``.
        statement: the statement in LaTeX, as written in THEORY.md (scaled when the check was run with a
            deliberately wrong ``scale``).
        reconstructed: the statement is a reconstruction (the paper's full text was not available).
        steps: the derivation, in order.
        numeric: numeric results (JSON-friendly scalars/lists): estimates, maxima, ratios, tolerances.
        criteria: the numeric pass/fail criteria by name.
        notes: free text: scope, caveats, what the numbers mean.
    """

    name: str
    title: str
    statement: str
    reconstructed: bool
    steps: list[Step] = field(default_factory=list)
    numeric: dict[str, Any] = field(default_factory=dict)
    criteria: dict[str, bool] = field(default_factory=dict)
    notes: str = ""

    @property
    def symbolic_passed(self) -> bool:
        """Every derivation step is proved by sympy or an explicit assumption."""
        return all(s.ok for s in self.steps)

    @property
    def numeric_passed(self) -> bool:
        """Every numeric criterion holds (and there is at least one)."""
        return bool(self.criteria) and all(self.criteria.values())

    @property
    def passed(self) -> bool:
        """The check passes: symbolic derivation and numeric cross-checks both hold."""
        return self.symbolic_passed and self.numeric_passed

    @property
    def failures(self) -> list[str]:
        """What failed: unproved steps (by description) and numeric criteria (by name)."""
        out = [f"step: {s.description}" for s in self.steps if not s.ok]
        out += [f"numeric: {k}" for k, v in self.criteria.items() if not v]
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``json.dumps(check.to_dict())`` works), including ``passed``."""
        d = asdict(self)
        d["steps"] = [{**asdict(s), "status": s.status} for s in self.steps]
        d["numeric"] = _jsonable(self.numeric)
        d["criteria"] = {k: bool(v) for k, v in self.criteria.items()}
        d["symbolic_passed"] = self.symbolic_passed
        d["numeric_passed"] = self.numeric_passed
        d["passed"] = self.passed
        return d

    def to_json(self, indent: int | None = 2) -> str:
        """``json.dumps(self.to_dict())``."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def _repr_markdown_(self) -> str:
        verdict = "✅ passed" if self.passed else "❌ FAILED: " + "; ".join(self.failures)
        lines = [
            f"### {self.title}",
            "",
            f"**{verdict}**" + (" · *reconstructed*" if self.reconstructed else ""),
        ]
        lines += ["", f"$$\\begin{{gathered}}{self.statement}\\end{{gathered}}$$", ""]
        lines += ["| # | step | | status | method |", "|---|---|---|---|---|"]
        for i, s in enumerate(self.steps, 1):
            lines.append(
                f"| {i} | {_md_cell(s.description)} | ${_tex_no_pipes(s.latex)}$ | {s.status} | {_md_cell(s.method)} |"
            )
        lines += ["", "| numeric | value |", "|---|---|"]
        for k, v in self.numeric.items():
            lines.append(f"| `{k}` | {_fmt(v)} |")
        lines += ["", "| criterion | holds |", "|---|---|"]
        for k, v in self.criteria.items():
            lines.append(f"| `{k}` | {'✅' if v else '❌'} |")
        if self.notes:
            lines += ["", html.escape(self.notes, quote=False)]
        return "\n".join(lines)

    def _repr_latex_(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        heading = self.title.split(" — ")[0]
        rows = [f"\\textbf{{{heading}}}\\ (\\text{{{verdict}}})", self.statement]
        for i, s in enumerate(self.steps, 1):
            rows.append(f"\\text{{{i}. [{s.status}]}}\\quad {s.latex}")
        return "$$\\begin{array}{l}" + " \\\\ ".join(rows) + "\\end{array}$$"

    def __repr__(self) -> str:
        return (
            f"Check(name={self.name!r}, passed={self.passed}, steps={len(self.steps)}, "
            f"criteria={sum(self.criteria.values())}/{len(self.criteria)})"
        )


@dataclass(frozen=True)
class Statement:
    """One result of THEORY.md as its check states it; :meth:`to_check` assembles the check's :class:`Check`.

    The checks differ in their derivations and numerics only: how the statement is rendered at a ``scale``,
    how its provenance enters the notes and how the cached derivation is handed out are the same for all.

    Attributes:
        name: short identifier, e.g. ``"prop_4_2"``.
        title: human title; a reconstructed statement says ``(reconstructed)`` in it.
        latex: the statement in LaTeX, with ``{k}`` wherever the scale factor multiplies a right-hand side.
        reconstructed: the statement is a reconstruction (the paper's full text was not available).
    """

    name: str
    title: str
    latex: str
    reconstructed: bool

    def render(self, scale: float) -> str:
        r"""The LaTeX statement at ``scale``: ``{k}`` → :func:`scale_prefix`, plus a reconstruction remark.

        >>> claim = Statement("demo", "Demo", r"a \le {k}b", reconstructed=False)
        >>> claim.render(1.0), claim.render(0.5)
        ('a \\le b', 'a \\le \\frac{1}{2}\\cdot b')
        """
        tex = self.latex.replace("{k}", scale_prefix(to_rational(scale)))
        return tex + RECONSTRUCTED_TEX if self.reconstructed else tex

    def to_check(
        self,
        scale: float,
        steps: Iterable[Step],
        numeric: dict[str, Any],
        criteria: dict[str, bool],
        notes: str,
    ) -> Check:
        """The :class:`Check` of this statement at ``scale``.

        Args:
            scale: the factor the check ran with (see :func:`validate_scale`); the statement is rendered at it.
            steps: the derivation, typically a cached tuple; each step is copied, so a caller that edits the
                returned check cannot change the cache.
            numeric, criteria: the numeric cross-checks (see :class:`Check`).
            notes: what the numbers mean; the provenance sentence (:data:`RECONSTRUCTED_NOTE` or
                :data:`AS_STATED_NOTE`) is put in front.
        """
        provenance = RECONSTRUCTED_NOTE if self.reconstructed else AS_STATED_NOTE
        return Check(
            name=self.name,
            title=self.title,
            statement=self.render(scale),
            reconstructed=self.reconstructed,
            steps=[replace(s) for s in steps],
            numeric=numeric,
            criteria=criteria,
            notes=f"{provenance} {notes}",
        )


def conclusion(description: str, latex: str, steps: Iterable[Step]) -> Step:
    """The closing step of a derivation that chains ``steps``: proved exactly when every one of them is ok.

    >>> proved, assumed = Step("s", "x", proved=True), Step("t", "y", proved=False, assumption=True)
    >>> conclusion("combine", "z", [proved, assumed]).proved, conclusion("combine", "z", [Step("u", "w", False)]).proved
    (True, False)
    """
    return Step(
        description,
        latex,
        proved=all(s.ok for s in steps),
        method="chain of the steps above (each proved by sympy or stated as an assumption)",
    )


def summary_markdown(checks: Iterable[Check]) -> str:
    """A markdown table with one row per check: verdict, reconstructed, steps proved, criteria met.

    Display it in a notebook with ``IPython.display.Markdown(summary_markdown(all_checks()))``.
    """
    lines = ["| check | verdict | reconstructed | steps proved / assumed / total | numeric criteria met |"]
    lines.append("|---|---|---|---|---|")
    for c in checks:
        proved = sum(s.proved for s in c.steps)
        assumed = sum(s.assumption and not s.proved for s in c.steps)
        verdict = "✅ passed" if c.passed else "❌ failed"
        lines.append(
            f"| {_md_cell(c.title)} | {verdict} | {'yes' if c.reconstructed else 'no'} | "
            f"{proved} / {assumed} / {len(c.steps)} | {sum(c.criteria.values())} / {len(c.criteria)} |"
        )
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    """Escape a plain-text markdown table cell (a bare ``|`` would start a new column)."""
    return text.replace("|", "\\|")


def _tex_no_pipes(tex: str) -> str:
    """LaTeX for a markdown table cell: ``\\|`` → ``\\Vert``, ``|`` → ``\\vert`` (same rendering, no column break)."""
    return tex.replace("\\|", "\\Vert ").replace("|", "\\vert ")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return _jsonable(v.tolist())
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return str(v)


# --------------------------------------------------------------------------------------------------------------
# Small sound provers
# --------------------------------------------------------------------------------------------------------------


def validate_scale(scale: float) -> None:
    """Raise ``ValueError`` unless ``scale`` is a finite positive number.

    ``scale`` multiplies the right-hand side of a statement; 1 is the statement as written, anything else is
    a deliberately wrong statement (the tests use it to show that each check can fail).
    """
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"scale={scale!r} must be a finite number > 0 (1.0 checks the statement as written; "
            "other values check a deliberately rescaled, wrong statement)"
        )


def to_rational(x: float) -> sp.Rational:
    """Turn a float such as ``0.5`` into an exact sympy rational (``1/2``), for exact symbolic checks.

    >>> to_rational(0.5)
    1/2
    """
    return sp.nsimplify(x, rational=True)


def scale_prefix(k: sp.Expr) -> str:
    r"""LaTeX for a statement's scale factor: ``""`` when it is 1 (as written), else e.g. ``"\frac{1}{2}\cdot "``.

    >>> scale_prefix(sp.Integer(1)), scale_prefix(sp.Rational(1, 2))
    ('', '\\frac{1}{2}\\cdot ')
    """
    return "" if k == 1 else f"{sp.latex(k)}\\cdot "


def scaled_derivation(derive: Callable[..., list[Step]]) -> Callable[..., tuple[Step, ...]]:
    r"""Make ``derive(k, kx, *args)`` the cached derivation ``derivation(scale, *args)`` of a scaled statement.

    Every check proves its statement with each right-hand side multiplied by ``scale``. ``derive`` receives it
    as the exact rational ``k = to_rational(scale)`` and as LaTeX, ``kx = scale_prefix(k)`` (``""`` at 1), and
    returns its steps; the result is cached per ``(scale, *args)`` (sympy is slow and the checks rerun it) and
    handed out as a tuple, which :meth:`Statement.to_check` copies step by step.

    >>> @scaled_derivation
    ... def demo(k: sp.Rational, kx: str) -> list[Step]:
    ...     return [Step("x ≤ k·x for x ≥ 0", f"x ≤ {kx}x", proved=bool(k >= 1))]
    >>> demo(1.0)[0].proved, demo(0.5)[0].proved, demo(0.5)[0].latex
    (True, False, 'x ≤ \\frac{1}{2}\\cdot x')
    """

    @functools.lru_cache(maxsize=8)
    @functools.wraps(derive)
    def derivation(scale: float, *args: Any) -> tuple[Step, ...]:
        k = to_rational(scale)
        return tuple(derive(k, scale_prefix(k), *args))

    return derivation


def is_zero(expr: sp.Expr) -> bool:
    """True when sympy simplifies ``expr`` to exactly 0.

    >>> x = sp.Symbol("x", positive=True)
    >>> is_zero(sp.log(sp.exp(x)) - x), is_zero(x)
    (True, False)
    """
    expr = sp.sympify(expr)
    if expr == 0:
        return True
    return bool(sp.simplify(expr) == 0)


def prove_nonnegative(expr: sp.Expr) -> bool:
    """True when sympy can show ``expr ≥ 0`` for every value its symbols' assumptions allow.

    Sound, not complete: ``False`` means "not proved". The expression is put over one denominator and the
    expanded numerator and denominator are classified by sympy's assumption system; e.g. a polynomial with
    non-negative coefficients in non-negative symbols is non-negative.

    >>> u, v = sp.symbols("u v", positive=True)
    >>> prove_nonnegative(2 - 1 / (1 + u) - 1 / (1 + v))
    True
    >>> prove_nonnegative(1 - 2 / (1 + u))  # negative for u < 1
    False
    """
    expr = sp.sympify(expr)
    if expr.is_nonnegative:
        return True
    num, den = sp.fraction(sp.together(expr))
    num, den = sp.expand(num), sp.expand(den)
    if num == 0:
        return True
    if num.is_nonnegative and den.is_positive:
        return True
    return bool(num.is_nonpositive and den.is_negative)


def prove_nonnegative_halfline(h: sp.Expr, x: sp.Symbol, max_order: int = 3) -> tuple[bool, int]:
    """Prove ``h(x) ≥ 0`` for all ``x ≥ 0`` by repeated monotonicity.

    If ``h(0), h'(0), …, h^{(n-1)}(0) ≥ 0`` and ``h^{(n)}(x) ≥ 0`` for all ``x ≥ 0`` then each lower derivative
    is non-decreasing from a non-negative start, so ``h ≥ 0``. Tries ``n = 1 … max_order``.

    Args:
        h: the expression; ``x`` should be declared ``nonnegative=True`` (or positive) so sympy can use it.
        x: the variable.
        max_order: highest derivative order tried.

    Returns:
        ``(proved, n)`` — ``n`` is the order that worked (0 when not proved).

    >>> x = sp.Symbol("x", nonnegative=True)
    >>> prove_nonnegative_halfline(x - 1 + sp.exp(-x), x)   # 1 − e^{−x} ≤ x
    (True, 2)
    >>> prove_nonnegative_halfline(x / 2 - 1 + sp.exp(-x), x)[0]
    False
    """
    for n in range(1, max_order + 1):
        starts = [sp.diff(h, x, k).subs(x, 0) for k in range(n)]
        if not all(prove_nonnegative(sp.simplify(s)) for s in starts):
            return False, 0  # a start value is not provably ≥ 0: higher orders cannot help
        if prove_nonnegative(sp.simplify(sp.diff(h, x, n))):
            return True, n
    return False, 0


def sign_abs(expr: sp.Expr) -> sp.Expr:
    """``|expr|`` with the sign decided by :func:`prove_nonnegative` when possible, else ``Abs(expr)``.

    >>> u = sp.Symbol("u", positive=True)
    >>> sign_abs(-u / (1 + u))
    u/(u + 1)
    """
    if prove_nonnegative(expr):
        return expr
    if prove_nonnegative(-expr):
        return -expr
    return sp.Abs(expr)


def truncate_series(expr: sp.Expr, var: sp.Symbol, order: int) -> sp.Expr:
    """Drop every power of ``var`` above ``order`` from a polynomial in ``var`` (after expanding).

    >>> s = sp.Symbol("s")
    >>> truncate_series((1 + s) ** 3, s, 1)
    3*s + 1
    """
    expr = sp.expand(expr)
    return sp.Add(*[expr.coeff(var, k) * var**k for k in range(order + 1)])


def gaussian_expectation(expr: sp.Expr, normals: Sequence[sp.Symbol]) -> sp.Expr:
    """``E[expr]`` for a polynomial in i.i.d. standard normal symbols, from the moments ``E[ξ^k] = (k−1)!!``.

    >>> x, y = sp.symbols("x y", real=True)
    >>> gaussian_expectation((x + 2 * y) ** 2 + x**4 + x * y, [x, y])
    8
    """
    poly = sp.Poly(sp.expand(expr), *normals)
    total = sp.Integer(0)
    for monomial, coeff in poly.terms():
        if any(k % 2 for k in monomial):
            continue
        moment = sp.Integer(1)
        for k in monomial:
            moment *= sp.factorial2(k - 1) if k > 0 else 1
        total += coeff * moment
    return sp.expand(total)


# --------------------------------------------------------------------------------------------------------------
# A tiny autoregressive policy whose every sequence can be enumerated
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreePolicy:
    """A tabular autoregressive policy over ``vocab`` tokens and horizon ``horizon``: one logit row per prefix.

    The prefixes of length ``t`` are numbered in base ``vocab`` after the ``Σ_{k<t} vocab^k`` shorter ones, so
    a table of shape ``(num_states, vocab)`` holds the whole policy, and :meth:`sequence_logits` lays it out
    along every one of the ``vocab^horizon`` sequences for the torch functions of :mod:`workbench.dvp`.

    >>> tree = TreePolicy(vocab=2, horizon=2)
    >>> tree.num_states, tree.num_sequences
    (3, 4)
    >>> tree.sequences().tolist()
    [[0, 0], [0, 1], [1, 0], [1, 1]]
    >>> tree.state_index().tolist()  # root, then the prefix (y_0,) as state 1 + y_0
    [[0, 1], [0, 1], [0, 2], [0, 2]]
    """

    vocab: int
    horizon: int

    def __post_init__(self) -> None:
        if not (isinstance(self.vocab, int) and self.vocab >= 2):
            raise ValueError(f"vocab={self.vocab!r} must be an int ≥ 2 (tokens per step)")
        if not (isinstance(self.horizon, int) and self.horizon >= 1):
            raise ValueError(f"horizon={self.horizon!r} must be an int ≥ 1 (steps per sequence)")
        if self.vocab**self.horizon > 200_000:
            raise ValueError(
                f"vocab**horizon={self.vocab**self.horizon} sequences is too many to enumerate; "
                "keep it ≤ 200000 (e.g. vocab=6, horizon=4)"
            )

    @property
    def num_states(self) -> int:
        """Number of prefixes of length 0 … horizon − 1."""
        return sum(self.vocab**t for t in range(self.horizon))

    @property
    def num_sequences(self) -> int:
        """``vocab ** horizon``."""
        return self.vocab**self.horizon

    def sequences(self) -> torch.Tensor:
        """Every sequence, in lexicographic order. Returns LongTensor ``(N, T)``."""
        n = torch.arange(self.num_sequences)
        powers = self.vocab ** torch.arange(self.horizon - 1, -1, -1)  # (T,)
        return (n[:, None] // powers[None, :]) % self.vocab  # (N, T)

    def state_index(self) -> torch.Tensor:
        """Row of the table used at each step of each sequence. Returns LongTensor ``(N, T)``."""
        seq = self.sequences()  # (N, T)
        idx = torch.zeros_like(seq)
        offset, prefix = 0, torch.zeros(self.num_sequences, dtype=torch.long)
        for t in range(self.horizon):
            idx[:, t] = offset + prefix
            offset += self.vocab**t
            prefix = prefix * self.vocab + seq[:, t]
        return idx

    def sequence_logits(self, table: torch.Tensor) -> torch.Tensor:
        """Gather the table along every sequence: ``(num_states, V) → (N, T, V)``."""
        if table.shape != (self.num_states, self.vocab):
            raise ValueError(
                f"table has shape {tuple(table.shape)}; expected (num_states, vocab) = "
                f"({self.num_states}, {self.vocab})"
            )
        return table[self.state_index()]  # (N, T, V)


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    return torch.Generator().manual_seed(int(seed))


def all_ok(values: Iterable[bool]) -> bool:
    """``all`` that returns a plain ``bool`` (not a tensor)."""
    return bool(all(bool(v) for v in values))
