"""Real math sets from JSON Lines files, scored by the safe answer checker.

One JSON object per line with string fields ``prompt`` and ``answer`` (a number is accepted for
``answer`` and turned into a string) and an optional ``solution`` (a worked solution used as the SFT
completion). Blank lines are skipped. Anything else is an error that names the file and line.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from workbench.tasks.answers import check_answer
from workbench.tasks.base import Problem, check_int, check_n, response_text


def load_jsonl_problems(path: str | os.PathLike[str]) -> tuple[list[Problem], dict[str, str]]:
    """Read ``(problems, solutions)`` from a JSONL file; ``solutions`` maps prompt → worked solution.

    Args:
        path: a ``.jsonl`` file, one ``{"prompt": ..., "answer": ...}`` object per line.

    Returns:
        The problems in file order and the optional solutions keyed by prompt.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: ``"<path>:<line>: ..."`` for invalid JSON, a non-object, a missing or non-string
            field; ``"<path>: ..."`` for a file with no problems.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path={str(path)!r}: no such JSONL file; pass the path of a .jsonl file")
    problems: list[Problem] = []
    solutions: dict[str, str] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg}); each line must be one JSON object") from e
            if not isinstance(record, dict):
                raise ValueError(
                    f"{where}: expected a JSON object with 'prompt' and 'answer', got {record!r:.60}"
                )
            for key in ("prompt", "answer"):
                if key not in record:
                    raise ValueError(f"{where}: missing field {key!r}; each line needs 'prompt' and 'answer'")
            prompt, answer = record["prompt"], record["answer"]
            if isinstance(answer, (int, float)) and not isinstance(answer, bool):
                answer = str(answer)
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{where}: field 'prompt' must be a non-empty string, got {prompt!r:.60}")
            if not isinstance(answer, str) or not answer.strip():
                raise ValueError(f"{where}: field 'answer' must be a non-empty string, got {answer!r:.60}")
            solution = record.get("solution")
            if solution is not None:
                if not isinstance(solution, str):
                    raise ValueError(f"{where}: field 'solution' must be a string, got {solution!r:.60}")
                solutions[prompt] = solution
            problems.append(Problem(prompt, answer))
    if not problems:
        raise ValueError(
            f"{path}: no problems (the file is empty or blank); add JSON lines with 'prompt' and 'answer'"
        )
    return problems, solutions


@dataclass(frozen=True)
class JsonlMathTask:
    r"""A fixed set of math problems from a JSONL file, rewarded by :func:`check_answer`.

    Reward 1.0 iff the text before eos states the reference answer (``\boxed{..}``, a fraction, a
    decimal or a simple expression with the same exact value; see :func:`check_answer`), else 0.0. A text
    longer than :data:`~workbench.tasks.answers.MAX_RESPONSE_CHARS` scores 0.0 however it ends, so a
    policy cannot bury an answer after junk (raise the limit for budgets above ~8k subword tokens).
    The SFT completion is the record's ``solution`` when given, else the answer itself.

    Args:
        path: the ``.jsonl`` file (loaded once, at construction).
        max_new_tokens: response budget in tokens, eos included.
    """

    path: str | os.PathLike[str]
    """The JSONL file."""
    max_new_tokens: int = 256
    """Response budget in tokens (1–32768), eos included."""

    name: ClassVar[str] = "jsonl"
    problems: tuple[Problem, ...] = field(init=False, repr=False)
    """Every problem in file order."""
    solutions: dict[str, str] = field(init=False, repr=False, compare=False)
    """Worked solutions by prompt, for the records that have one."""

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 1, 32768)
        problems, solutions = load_jsonl_problems(self.path)
        object.__setattr__(self, "problems", tuple(problems))
        object.__setattr__(self, "solutions", solutions)

    def __len__(self) -> int:
        return len(self.problems)

    def sample(self, n: int, rng: random.Random) -> list[Problem]:
        """``n`` problems: distinct while ``n`` does not exceed the set, with replacement beyond."""
        n = check_n(n)
        if n <= len(self.problems):
            return rng.sample(self.problems, n)
        return [rng.choice(self.problems) for _ in range(n)]

    def reward(self, problem: Problem, completion: str) -> float:
        """1.0 iff :func:`check_answer` accepts the text before eos."""
        return 1.0 if check_answer(response_text(completion), problem.answer) else 0.0

    def sft_text(self, problem: Problem) -> str:
        """``prompt + solution`` when the record has one, else ``prompt + answer``."""
        return problem.prompt + self.solutions.get(problem.prompt, problem.answer)
