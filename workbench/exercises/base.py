"""What every checker shares: the failure and pass types, seeded generators, and loud comparisons.

A checker calls the learner's function with :func:`call_learner` (an exception becomes a failure naming the
case), turns its answer into a tensor of the right shape with :func:`as_tensor` / :func:`as_float`, and
compares it with the reference with :func:`compare`, which names the worst entry and the likeliest slip.
Write a new checker from these and it fails the way the others do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ExerciseFailure",
    "Passed",
    "as_float",
    "as_tensor",
    "call_learner",
    "close",
    "compare",
    "fmt",
    "generator",
    "show",
]


class ExerciseFailure(AssertionError):
    """The learner's answer disagrees with the reference; the message says where, how, and (often) why."""


@dataclass(frozen=True)
class Passed:
    """A passed exercise: renders as one line in a notebook, is truthy, and says how much was checked."""

    exercise: str
    """Name of the checker."""
    cases: int
    """How many cases the answer was compared on."""
    note: str = ""
    """What passing means, in one sentence."""

    def __str__(self) -> str:
        tail = f" {self.note}" if self.note else ""
        return f"passed {self.exercise}: your answer matches the reference on {self.cases} cases.{tail}"

    def _repr_markdown_(self) -> str:
        return "✅ " + str(self)

    def __bool__(self) -> bool:
        return True


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fmt(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        if x.numel() <= 12:
            return str([round(v, 6) if isinstance(v, float) else v for v in x.flatten().tolist()])
        return f"tensor of shape {tuple(x.shape)}"
    if isinstance(x, float):
        return f"{x:.6g}"
    return repr(x)


def show(x: torch.Tensor) -> str:
    """A small tensor's entries to 6 significant digits (the wording of :mod:`workbench.exercises.lessons_06_10`)."""
    if x.numel() <= 12:
        items = (f"{v:.6g}" if isinstance(v, float) else str(v) for v in x.flatten().tolist())
        return "[" + ", ".join(items) + "]"
    return f"tensor of shape {tuple(x.shape)}"


def call_learner(fn: Callable[..., Any], exercise: str, case: str, *args: Any) -> Any:
    """Call the learner's function; turn any exception into a failure that names the case."""
    if not callable(fn):
        raise ExerciseFailure(
            f"{exercise}: expected a function, got {type(fn).__name__}; pass the function itself"
        )
    try:
        return fn(*args)
    except ExerciseFailure:
        raise
    except Exception as err:  # the learner's bug, reported with its case
        raise ExerciseFailure(
            f"{exercise}: your function raised {type(err).__name__}: {err}\n  on case: {case}"
        ) from err


def as_tensor(
    value: Any, exercise: str, case: str, what: str, shape: Sequence[int], *, detach: bool = True
) -> torch.Tensor:
    """The learner's return value as a float64 tensor of ``shape``, or a failure saying what is wrong.

    ``detach=False`` returns the learner's tensor itself (its dtype and autograd graph kept), for a loss whose
    gradient is checked next.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool) and tuple(shape) == ():
        value = torch.tensor(float(value))
    if not isinstance(value, torch.Tensor):
        raise ExerciseFailure(
            f"{exercise}: {what} should be a torch.Tensor of shape {tuple(shape)}, got {type(value).__name__}\n"
            f"  on case: {case}"
        )
    if tuple(value.shape) != tuple(shape):
        raise ExerciseFailure(
            f"{exercise}: {what} has shape {tuple(value.shape)}, expected {tuple(shape)}\n  on case: {case}"
        )
    return value.detach().double() if detach else value


def as_float(value: Any, exercise: str, case: str, what: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ExerciseFailure(
        f"{exercise}: {what} should be a number (a Python float or a 1-element tensor), got "
        f"{type(value).__name__}\n  on case: {case}"
    )


def close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> torch.Tensor:
    """Elementwise closeness that treats NaN == NaN and equal infinities as equal."""
    a, b = a.double(), b.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    same_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    finite = torch.isfinite(a) & torch.isfinite(b)
    near = torch.zeros_like(finite)
    near[finite] = (a[finite] - b[finite]).abs() <= atol + rtol * b[finite].abs()
    return both_nan | same_inf | near


def compare(
    exercise: str,
    case: str,
    got: torch.Tensor,
    expected: torch.Tensor,
    *,
    what: str | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    diagnoses: Sequence[tuple[torch.Tensor | None, str]] = (),
    hint: str = "",
) -> None:
    """Fail loudly unless ``got ≈ expected``; name the worst entry and the likeliest slip.

    ``diagnoses`` are ``(what a typical wrong answer returns, what the slip is)``: the first one that matches
    ``got`` is reported. ``what`` names the compared quantity, as the checkers of
    :mod:`workbench.exercises.lessons_06_10` do: the message then reads "<what> is wrong" with values shown by :func:`show`; without it, "wrong value
    at flat index i" with values shown by :func:`fmt` and the tolerance quoted.
    """
    got, expected = got.detach().double(), expected.detach().double()
    ok = close(got, expected, atol, rtol)
    if bool(ok.all()):
        return
    bad = (~ok).flatten().nonzero().flatten()
    i = int(bad[0])
    g, e = got.flatten()[i].item(), expected.flatten()[i].item()
    counts = f"({len(bad)} of {got.numel()} entries differ)"
    if what is None:
        where = f" at flat index {i}" if got.numel() > 1 else ""
        render, head = fmt, f"wrong value{where} {counts}"
        first = f"first mismatch: expected {e:.6g}, got {g:.6g} (tolerance atol={atol:g}, rtol={rtol:g})"
    else:
        render, head = show, f"{what} is wrong {counts}"
        first = f"first mismatch at flat index {i}: expected {e:.6g}, got {g:.6g}"
    lines = [
        f"{exercise}: {head}",
        f"  on case:  {case}",
        f"  expected: {render(expected)}",
        f"  got:      {render(got)}",
        f"  {first}",
    ]
    for candidate, slip in diagnoses:
        if (
            candidate is not None
            and candidate.shape == got.shape
            and bool(close(got, candidate, atol, rtol).all())
        ):
            lines.append(f"  likely slip: {slip}")
            break
    else:
        if hint:
            lines.append(f"  hint: {hint}")
    raise ExerciseFailure("\n".join(lines))
