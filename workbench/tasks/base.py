"""The vocabulary of the toy world and the shape every task has.

A *task* turns a random generator into prompts (:meth:`Task.sample`), scores a model's completion
with an exact, verifiable reward (:meth:`Task.reward`) and writes the ideal completion for the
supervised warm start (:meth:`Task.sft_text`). Tasks know nothing about tokenizers or models: they
speak plain strings. The tiny models of :mod:`workbench.models` use a character-level tokenizer
over :data:`ALPHABET`, so every character a task can put in a prompt or expect in an answer is listed
here.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# Every character a task can produce or need. Order matters: the char-level tokenizer gives the
# characters consecutive ids in this order (after the special tokens), so never reorder, only append.
ALPHABET: str = (
    string.digits  # 0-9
    + "+-*/=,. "  # arithmetic, separators, space
    + string.ascii_lowercase  # a-z
    + "()[]{}\\^:;"  # grouping, LaTeX (\boxed{...}, \frac{..}{..}), powers, separators
    + "?"  # the probe task's prompt
)

PAD_TOKEN: str = "<pad>"
BOS_TOKEN: str = "<bos>"
EOS_TOKEN: str = "<eos>"
UNK_TOKEN: str = "<unk>"
# Special tokens of the char-level tokenizer, in id order (pad = 0, bos = 1, eos = 2, unk = 3).
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)


def response_text(completion: str, eos: str = EOS_TOKEN) -> str:
    """The part of a completion that counts: everything before the first end-of-sequence marker.

    The engines stop at eos; a completion decoded without ``skip_special_tokens`` still carries the
    marker (and padding after it), a truncated one carries none. Either way the answer is what comes
    before it.

    Args:
        completion: decoded response text.
        eos: the end-of-sequence marker as it appears in decoded text.

    Returns:
        ``completion`` cut at the first ``eos`` (unchanged when there is none).

    >>> response_text("46<eos><pad><pad>")
    '46'
    >>> response_text("46")
    '46'
    """
    cut = completion.find(eos)
    return completion if cut < 0 else completion[:cut]


@dataclass(frozen=True)
class Problem:
    """One prompt and its reference answer.

    >>> Problem("12+34=", "46").prompt
    '12+34='
    """

    prompt: str
    """What the model is conditioned on (for tiny models: a short string over ALPHABET)."""
    answer: str
    """The reference answer the reward compares against (task-specific; for the probe, the target)."""


@runtime_checkable
class Task(Protocol):
    """A verifiable task: prompts, an exact reward in [0, 1], and the ideal completion for SFT.

    Implementations are deterministic given the ``random.Random`` passed to :meth:`sample`, and their
    reward depends only on ``(problem, completion)``.
    """

    name: str
    """Registry name (``workbench.tasks.TASKS``)."""
    max_new_tokens: int
    """Tokens a response may take, eos included (for char-level tokenizers: chars + 1)."""

    def sample(self, n: int, rng: random.Random) -> list[Problem]:
        """Draw ``n`` problems using only ``rng`` for randomness."""
        ...

    def reward(self, problem: Problem, completion: str) -> float:
        """Score a decoded completion (text before eos counts) with an exact reward in [0, 1]."""
        ...

    def sft_text(self, problem: Problem) -> str:
        """Prompt + ideal completion, without eos (the caller appends the tokenizer's eos)."""
        ...


def check_int(name: str, value: object, lo: int, hi: int, fix: str = "") -> int:
    """Validate an integer knob, raising a ValueError that names it, its range and the fix.

    >>> check_int("digits", 3, 1, 7)
    3
    """
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        hint = f"; {fix}" if fix else ""
        raise ValueError(f"{name}={value!r} must be an integer in [{lo}, {hi}]{hint}")
    return value


def check_n(n: object) -> int:
    """Validate the number of problems requested from :meth:`Task.sample`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} must be a non-negative integer (the number of problems to draw)")
    return n
