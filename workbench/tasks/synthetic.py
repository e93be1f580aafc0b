"""Synthetic tasks with exact rewards and difficulty knobs, sized for CPU training.

Every prompt is a short string over :data:`workbench.tasks.ALPHABET` (at most 16 characters, so a
char-level model sees at most 16 prompt tokens) and every reward is an exact comparison of the text
before eos (:func:`workbench.tasks.response_text`) with the reference. No whitespace is stripped: the
ideal completion (:meth:`sft_text`) is the reference answer exactly, and anything else is wrong.

| task | prompt → ideal completion | knobs |
|---|---|---|
| :class:`AdditionTask` | ``"12+34="`` → ``"46"`` | ``digits`` |
| :class:`SortTask` | ``"sort dbca="`` → ``"abcd"`` | ``length``, ``alphabet_size`` |
| :class:`CountTask` | ``"a in abacab="`` → ``"3"`` | ``length``, ``alphabet_size`` |
| :class:`MultiAddTask` | ``"12+34="`` → ``"46;57+8=65;3+21=24"`` | ``n_problems``, ``digits`` |
| :class:`ProbeTask` | ``"?"`` → ``"7"`` (bandit with a known optimum) | ``target``, ``digit_credit`` |
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import ClassVar

from workbench.tasks.base import ALPHABET, Problem, check_int, check_n, response_text

MAX_PROMPT_CHARS = 16
"""Longest prompt any synthetic task writes (char-level: tokens)."""


def _operand(rng: random.Random, digits: int) -> int:
    """Uniform integer with at most ``digits`` decimal digits."""
    return rng.randrange(10**digits)


class _ExactAnswerTask:
    """What the single-answer tasks share: problems drawn one at a time, an exact-match reward, SFT text.

    A subclass writes :meth:`_draw` (one problem from ``rng``); :meth:`sample`, :meth:`reward` and
    :meth:`sft_text` are the same for :class:`AdditionTask`, :class:`SortTask` and :class:`CountTask`.
    """

    def _draw(self, rng: random.Random) -> Problem:
        """One problem, using only ``rng`` for randomness."""
        raise NotImplementedError

    def sample(self, n: int, rng: random.Random) -> list[Problem]:
        """Draw ``n`` problems, one :meth:`_draw` after another (deterministic given ``rng``)."""
        return [self._draw(rng) for _ in range(check_n(n))]

    def reward(self, problem: Problem, completion: str) -> float:
        """1.0 iff the text before eos is exactly the reference answer (nothing stripped), else 0.0."""
        return 1.0 if response_text(completion) == problem.answer else 0.0

    def sft_text(self, problem: Problem) -> str:
        """``prompt + answer``."""
        return problem.prompt + problem.answer


@dataclass(frozen=True)
class AdditionTask(_ExactAnswerTask):
    """Add two non-negative integers: ``"12+34="`` → ``"46"``.

    Operands are uniform on ``[0, 10**digits)``; the answer is written without leading zeros, and only
    that exact text (no spaces) earns the reward.

    >>> task = AdditionTask(digits=2)
    >>> [p] = task.sample(1, random.Random(0))
    >>> p
    Problem(prompt='49+97=', answer='146')
    >>> task.reward(p, "146<eos>"), task.reward(p, "145"), task.max_new_tokens
    (1.0, 0.0, 4)
    """

    digits: int = 2
    """Digits per operand, 1–7 (the prompt ``a+b=`` must fit in 16 chars). More digits = harder."""

    name: ClassVar[str] = "addition"

    def __post_init__(self) -> None:
        check_int("digits", self.digits, 1, 7, "the prompt 'a+b=' must fit in 16 characters")

    @property
    def max_new_tokens(self) -> int:
        """Longest answer (``digits + 1`` chars) plus eos."""
        return self.digits + 2

    def _draw(self, rng: random.Random) -> Problem:
        """One addition."""
        a, b = _operand(rng, self.digits), _operand(rng, self.digits)
        return Problem(f"{a}+{b}=", str(a + b))


@dataclass(frozen=True)
class SortTask(_ExactAnswerTask):
    """Sort letters alphabetically: ``"sort dbca="`` → ``"abcd"``.

    Letters are drawn with replacement from the first ``alphabet_size`` letters of a–z, so repeats
    occur and must be kept (``"sort abab="`` → ``"aabb"``).

    >>> task = SortTask(length=4, alphabet_size=5)
    >>> [p] = task.sample(1, random.Random(0))
    >>> p
    Problem(prompt='sort ddac=', answer='acdd')
    >>> task.reward(p, "acdd<eos>"), task.reward(p, "acd")
    (1.0, 0.0)
    """

    length: int = 4
    """Letters to sort, 1–10 (the prompt must fit in 16 chars). Longer = harder."""
    alphabet_size: int = 26
    """Letters drawn from (the first ``alphabet_size`` of a–z), 2–26. Smaller = more repeats."""

    name: ClassVar[str] = "sort"

    def __post_init__(self) -> None:
        check_int("length", self.length, 1, 10, "the prompt 'sort <letters>=' must fit in 16 characters")
        check_int("alphabet_size", self.alphabet_size, 2, 26, "letters are drawn from a-z")

    @property
    def max_new_tokens(self) -> int:
        """The sorted letters plus eos."""
        return self.length + 1

    def _draw(self, rng: random.Random) -> Problem:
        """One string to sort."""
        letters = string.ascii_lowercase[: self.alphabet_size]
        s = "".join(rng.choice(letters) for _ in range(self.length))
        return Problem(f"sort {s}=", "".join(sorted(s)))


@dataclass(frozen=True)
class CountTask(_ExactAnswerTask):
    """Count occurrences of a letter: ``"a in abacab="`` → ``"3"``.

    The query letter and the string's letters are uniform over the first ``alphabet_size`` letters
    of a–z, so the count is Binomial(``length``, 1/``alphabet_size``) and 0 is a common answer. The
    answer is written in decimal without leading zeros.

    >>> task = CountTask(length=6, alphabet_size=3)
    >>> [p] = task.sample(1, random.Random(1))
    >>> p
    Problem(prompt='a in cababb=', answer='2')
    >>> task.reward(p, "2"), task.reward(p, "02")
    (1.0, 0.0)
    """

    length: int = 6
    """Length of the string searched, 1–10 (the prompt must fit in 16 chars)."""
    alphabet_size: int = 4
    """Letters drawn from (the first ``alphabet_size`` of a–z), 2–26."""

    name: ClassVar[str] = "count"

    def __post_init__(self) -> None:
        check_int("length", self.length, 1, 10, "the prompt '<c> in <letters>=' must fit in 16 characters")
        check_int("alphabet_size", self.alphabet_size, 2, 26, "letters are drawn from a-z")

    @property
    def max_new_tokens(self) -> int:
        """The count's digits plus eos."""
        return len(str(self.length)) + 1

    def _draw(self, rng: random.Random) -> Problem:
        """One counting problem: the query letter, then the string searched."""
        letters = string.ascii_lowercase[: self.alphabet_size]
        c = rng.choice(letters)
        s = "".join(rng.choice(letters) for _ in range(self.length))
        return Problem(f"{c} in {s}=", str(s.count(c)))


@dataclass(frozen=True)
class MultiAddTask:
    """Answer an addition, then pose and solve ``n_problems`` more: a longer, open-ended response.

    ``"12+34="`` → ``"46;57+8=65;3+21=24"``. The response is split at ``;`` into parts. Part 0 must be
    the prompt's sum; each later part must be a *well-formed, correct, new* addition ``a+b=c``:
    operands of at most ``digits`` digits, no leading zeros (``0`` itself is fine), ``c == a + b``, and
    ``a+b`` different from the prompt's and from every earlier part's. The reward is the fraction of
    parts that pass, over ``max(1 + n_problems, number of parts)`` — so stopping early loses the
    missing parts and rambling on past the last one dilutes the score.

    With ``digits=2, n_problems=2`` responses take up to 24 tokens (the issue's "24-token responses").

    >>> task = MultiAddTask(n_problems=2, digits=2)
    >>> p = Problem("12+34=", "46")
    >>> task.reward(p, "46;57+8=65;3+21=24<eos>")
    1.0
    >>> task.reward(p, "46;57+8=65;3+21=25")  # last sum wrong
    0.6666666666666666
    >>> task.reward(p, "46;12+34=46;3+21=24")  # re-posing the prompt earns nothing
    0.6666666666666666
    >>> task.max_new_tokens
    24
    """

    n_problems: int = 2
    """Further additions the model must pose and solve, 0–24 (0 reduces to :class:`AdditionTask`; 24 two-digit
    additions make responses of up to 244 tokens, the horizon study's longest)."""
    digits: int = 2
    """Digits per operand of the prompt and of posed problems, 1–4."""

    name: ClassVar[str] = "multiadd"

    def __post_init__(self) -> None:
        check_int("n_problems", self.n_problems, 0, 24, "use fewer posed problems to keep responses short")
        check_int("digits", self.digits, 1, 4, "posed problems take 3*digits+4 tokens each")

    @property
    def max_new_tokens(self) -> int:
        """Answer (``digits + 1``) + ``n_problems`` × ``;a+b=c`` (``3 digits + 4``) + eos."""
        return (self.digits + 1) + self.n_problems * (3 * self.digits + 4) + 1

    def _pattern(self) -> re.Pattern[str]:
        num = f"(?:0|[1-9][0-9]{{0,{self.digits - 1}}})"
        return re.compile(f"({num})\\+({num})=(0|[1-9][0-9]*)")

    def sample(self, n: int, rng: random.Random) -> list[Problem]:
        """Draw ``n`` prompts, exactly as :class:`AdditionTask` with the same ``digits`` does."""
        return AdditionTask(self.digits).sample(n, rng)

    def reward(self, problem: Problem, completion: str) -> float:
        """Fraction of well-formed, correct, new parts (see the class docstring)."""
        parts = response_text(completion).split(";")
        slots = max(1 + self.n_problems, len(parts))
        good = 1 if parts[0] == problem.answer else 0
        seen = {problem.prompt.rstrip("=")}
        pattern = self._pattern()
        for part in parts[1 : 1 + self.n_problems]:  # parts past the last slot only dilute
            m = pattern.fullmatch(part)
            if m is None:
                continue
            a, b, c = m.groups()
            lhs = f"{a}+{b}"
            if int(a) + int(b) == int(c) and lhs not in seen:
                good += 1
            seen.add(lhs)
        return good / slots

    def sft_text(self, problem: Problem) -> str:
        """Prompt, its sum, then ``n_problems`` new additions drawn from a generator seeded by the prompt.

        Deterministic: the same problem always gets the same ideal completion.
        """
        rng = random.Random(problem.prompt)
        seen = {problem.prompt.rstrip("=")}
        parts = [problem.answer]
        while len(parts) < 1 + self.n_problems:
            a, b = _operand(rng, self.digits), _operand(rng, self.digits)
            if f"{a}+{b}" in seen:
                continue
            seen.add(f"{a}+{b}")
            parts.append(f"{a}+{b}={a + b}")
        return problem.prompt + ";".join(parts)


@dataclass(frozen=True)
class ProbeTask:
    """A few-token bandit with a known optimum, for testing that a trainer learns the right thing.

    Every prompt is ``prompt`` (default ``"?"``). The reward looks only at the first character of
    the response: 1.0 if it is ``target``, ``digit_credit`` if it is another digit, 0.0 otherwise.

    **Known optimum:** the policy that puts all first-token probability on ``target`` earns expected
    reward exactly 1.0, and no other policy does. A policy with probability ``q`` on ``target`` and
    ``d`` on the other nine digits earns ``q + digit_credit · d``; a policy-gradient trainer should
    raise ``q`` towards 1. ``digit_credit > 0`` gives a sparse-reward start a stepping stone (first
    learn "a digit", then "the digit") without changing the optimum.

    >>> task = ProbeTask(target="7")
    >>> task.sample(2, random.Random(0))
    [Problem(prompt='?', answer='7'), Problem(prompt='?', answer='7')]
    >>> task.reward(task.sample(1, random.Random(0))[0], "7<eos>"), task.sft_text(Problem("?", "7"))
    (1.0, '?7')
    """

    target: str = "7"
    """The rewarded first character (a digit)."""
    digit_credit: float = 0.0
    """Reward for any other digit, in [0, 1). 0 makes a pure needle-in-a-haystack bandit."""
    prompt: str = "?"
    """The single prompt (non-empty, at most 16 chars over ALPHABET)."""
    max_new_tokens: int = 2
    """Response budget: the answer character plus eos by default; raise it to test longer rollouts."""

    name: ClassVar[str] = "probe"

    def __post_init__(self) -> None:
        if not (isinstance(self.target, str) and len(self.target) == 1 and self.target.isdigit()):
            raise ValueError(f"target={self.target!r} must be a single digit '0'-'9'")
        if not (isinstance(self.digit_credit, (int, float)) and 0.0 <= self.digit_credit < 1.0):
            raise ValueError(
                f"digit_credit={self.digit_credit!r} must be in [0, 1) so that the target stays the "
                "unique optimum"
            )
        bad = sorted(set(self.prompt) - set(ALPHABET)) if isinstance(self.prompt, str) else None
        if not isinstance(self.prompt, str) or not 1 <= len(self.prompt) <= MAX_PROMPT_CHARS or bad:
            raise ValueError(
                f"prompt={self.prompt!r} must be 1-{MAX_PROMPT_CHARS} characters from "
                f"workbench.tasks.ALPHABET (offending characters: {bad})"
            )
        check_int("max_new_tokens", self.max_new_tokens, 1, 4096)

    def sample(self, n: int, rng: random.Random) -> list[Problem]:
        """``n`` copies of the single problem (``rng`` is unused: there is nothing to draw)."""
        return [Problem(self.prompt, self.target)] * check_n(n)

    def reward(self, problem: Problem, completion: str) -> float:
        """1.0 for the target as first char, ``digit_credit`` for another digit, else 0.0."""
        first = response_text(completion)[:1]
        if first == problem.answer:
            return 1.0
        return float(self.digit_credit) if first.isdigit() and first.isascii() else 0.0

    def sft_text(self, problem: Problem) -> str:
        """``prompt + target``: the optimal response."""
        return problem.prompt + problem.answer
