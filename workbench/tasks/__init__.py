r"""Verifiable tasks: prompts, exact rewards, ideal completions, and a safe answer checker.

>>> import random
>>> task = make_task("addition", digits=2)
>>> [problem] = task.sample(1, random.Random(0))
>>> problem.prompt, task.reward(problem, problem.answer + "<eos>"), task.sft_text(problem)
('49+97=', 1.0, '49+97=146')
>>> sorted(TASKS)
['addition', 'count', 'jsonl', 'multiadd', 'probe', 'sort']

- :mod:`~workbench.tasks.base`: :data:`ALPHABET`, :class:`Problem`, the :class:`Task` protocol.
- :mod:`~workbench.tasks.synthetic`: :class:`AdditionTask`, :class:`SortTask`, :class:`CountTask`,
  :class:`MultiAddTask`, :class:`ProbeTask`.
- :mod:`~workbench.tasks.jsonl`: :class:`JsonlMathTask` for real math sets.
- :mod:`~workbench.tasks.answers`: :func:`check_answer` (no ``eval``; bounded parser over fractions; a
  response longer than ``MAX_RESPONSE_CHARS`` is wrong, never read from its end).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from workbench.tasks.answers import check_answer, extract_boxed, final_answer, parse_value
from workbench.tasks.base import (
    ALPHABET,
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    UNK_TOKEN,
    Problem,
    Task,
    response_text,
)
from workbench.tasks.jsonl import JsonlMathTask, load_jsonl_problems
from workbench.tasks.synthetic import AdditionTask, CountTask, MultiAddTask, ProbeTask, SortTask

TASKS: dict[str, type] = {
    cls.name: cls for cls in (AdditionTask, SortTask, CountTask, MultiAddTask, ProbeTask, JsonlMathTask)
}
"""Task classes by registry name (what :func:`make_task` and the CLI accept)."""


def make_task(name: str, **kwargs: Any) -> Task:
    """Build a registered task by name.

    Args:
        name: one of ``TASKS`` (``"addition"``, ``"sort"``, ``"count"``, ``"multiadd"``, ``"probe"``,
            ``"jsonl"``).
        **kwargs: the task's knobs (e.g. ``digits=3``; ``path=...`` for ``"jsonl"``).

    Returns:
        The task instance.

    Raises:
        ValueError: unknown name, or a keyword the task does not take (the message lists valid ones).

    >>> make_task("sort", length=3).max_new_tokens
    4
    """
    if name not in TASKS:
        raise ValueError(f"name={name!r} is not a registered task; choose one of {sorted(TASKS)}")
    cls = TASKS[name]
    accepted = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"task {name!r} takes no argument(s) {unknown}; it accepts {accepted}")
    return cls(**kwargs)


__all__ = [
    "ALPHABET",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "TASKS",
    "UNK_TOKEN",
    "AdditionTask",
    "CountTask",
    "JsonlMathTask",
    "MultiAddTask",
    "ProbeTask",
    "Problem",
    "SortTask",
    "Task",
    "check_answer",
    "extract_boxed",
    "final_answer",
    "load_jsonl_problems",
    "make_task",
    "parse_value",
    "response_text",
]
