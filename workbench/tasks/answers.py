r"""A safe, bounded answer checker: model text is *parsed*, never evaluated.

:func:`check_answer` decides whether a model's text states the reference answer. It understands
integers, decimals, negatives, fractions (``3/4 == 0.75 == 6/8``), thousands separators (``1,000``),
``\boxed{...}`` (the last one, nested braces allowed) and simple arithmetic in ``+ - * / ^`` with
parentheses and a little LaTeX (``\frac{a}{b}``, ``\cdot``, ``\times``, ``\div``, ``^{..}``). Values
are exact :class:`fractions.Fraction` s computed by a small recursive-descent parser
(:func:`parse_value`) — no ``eval``, no ``sympify`` of raw strings.

Model output is hostile by default (a policy under RL optimises whatever the checker lets through),
so every step is bounded: a response longer than :data:`MAX_RESPONSE_CHARS` is wrong, an expression
longer than :data:`MAX_EXPR_CHARS` or nested deeper than :data:`MAX_DEPTH` is rejected, exponents
must be integers of size at most :data:`MAX_EXPONENT`, and no intermediate value may exceed
:data:`MAX_BITS` bits. ``9^9^9^9``, ``__import__('os')``, megabyte strings and 10k-deep parentheses
all come back ``False`` in microseconds to milliseconds.

**The length rule.** An over-long response is wrong *as a whole*; the checker does not read the end of
it. Reading only the tail would score 100,000 characters of junk ending in ``= 4`` as a correct ``4``,
and a policy under RL would learn to bury its answer after whatever raises its odds. No generation
budget in the workbench produces such a text: :data:`MAX_RESPONSE_CHARS` is the largest
``max_new_tokens`` a task accepts (32,768), counted in characters as the char-level tokenizer emits
them — about 8k tokens of a subword tokenizer (≈ 4 characters each); a task with a longer budget must
raise it. Within the limit the stated answer is the one in the expected place (:func:`final_answer`):
the last ``\boxed{}``, the whole text, the value after the last ``=``, or the last number.
"""

from __future__ import annotations

import re
from collections import deque
from fractions import Fraction

MAX_RESPONSE_CHARS = 32_768
"""Longest response (and reference) the checker reads; a longer one is wrong, never read from its end."""
MAX_EXPR_CHARS = 128
"""Longest expression (after LaTeX normalisation) that :func:`parse_value` will parse."""
MAX_DEPTH = 32
"""Deepest nesting of parentheses / braces / unary signs / exponents."""
MAX_EXPONENT = 64
"""Largest ``|e|`` allowed in ``x ^ e`` (``e`` must be an integer)."""
MAX_BITS = 4096
"""Largest numerator or denominator, in bits, of any intermediate value."""

# LaTeX spellings mapped to the parser's tokens; spacing commands and delimiters sizing are dropped.
_LATEX_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("\\left", ""),
    ("\\right", ""),
    ("\\!", ""),
    ("\\,", ""),
    ("\\;", ""),
    ("\\:", ""),
    ("\\ ", ""),
    ("$", ""),
    ("\\dfrac", "\\frac"),
    ("\\tfrac", "\\frac"),
    ("\\cdot", "*"),
    ("\\times", "*"),
    ("\\div", "/"),
    ("**", "^"),
    ("\u2212", "-"),  # unicode minus
)
_TOKEN_RE = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+|\\frac|[-+*/^(){}]")
# A number not glued to a word; its minus sign only counts when it is not a binary minus.
_LAST_NUMBER_RE = re.compile(
    r"(?:(?<![\w.)\]}])-)?(?<![\w.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?"
)


class _Reject(Exception):
    """Internal: the text is not a value we are willing to compute."""


def _normalise_expr(text: str) -> str:
    for old, new in _LATEX_REPLACEMENTS:
        text = text.replace(old, new)
    return "".join(text.split())


def _tokenize(expr: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN_RE.match(expr, pos)
        if m is None:
            raise _Reject(f"unexpected character {expr[pos]!r}")
        tokens.append(m.group())
        pos = m.end()
    return tokens


def _bounded(x: Fraction) -> Fraction:
    if max(x.numerator.bit_length(), x.denominator.bit_length()) > MAX_BITS:
        raise _Reject("value too large")
    return x


class _Parser:
    """Recursive descent over Fractions; every rule is bounded in depth and value size.

    Grammar (``^`` is right-associative and binds tighter than unary minus: ``-2^2 = -4``)::

        expr  := term (('+' | '-') term)*
        term  := unary (('*' | '/') unary)*
        unary := ('+' | '-') unary | power
        power := atom ('^' unary)?
        atom  := NUMBER | '(' expr ')' | '{' expr '}' | '\\frac' '{' expr '}' '{' expr '}'
    """

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise _Reject(f"expected {expected or 'a token'}, got {tok!r}")
        self.pos += 1
        return tok

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Reject("nested too deeply")

    def parse(self) -> Fraction:
        value = self.expr()
        if self.peek() is not None:
            raise _Reject(f"trailing {self.peek()!r}")
        return value

    def expr(self) -> Fraction:
        self.enter()
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            value = _bounded(value + rhs if op == "+" else value - rhs)
        self.depth -= 1
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.unary()
            if op == "/" and rhs == 0:
                raise _Reject("division by zero")
            value = _bounded(value * rhs if op == "*" else value / rhs)
        return value

    def unary(self) -> Fraction:
        if self.peek() in ("+", "-"):
            op = self.take()
            self.enter()
            value = self.unary()
            self.depth -= 1
            return -value if op == "-" else value
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take("^")
        self.enter()
        exponent = self.unary()
        self.depth -= 1
        if exponent.denominator != 1 or abs(exponent) > MAX_EXPONENT:
            raise _Reject(f"exponent must be an integer with |e| <= {MAX_EXPONENT}")
        e = int(exponent)
        if base == 0 and e < 0:
            raise _Reject("zero to a negative power")
        size = max(base.numerator.bit_length(), base.denominator.bit_length())
        if size * abs(e) > MAX_BITS:
            raise _Reject("power too large")
        return _bounded(base**e)

    def atom(self) -> Fraction:
        tok = self.take()
        if tok in ("(", "{"):
            value = self.expr()
            self.take(")" if tok == "(" else "}")
            return value
        if tok == "\\frac":
            self.take("{")
            num = self.expr()
            self.take("}")
            self.take("{")
            den = self.expr()
            self.take("}")
            if den == 0:
                raise _Reject("division by zero")
            return _bounded(num / den)
        if tok[0].isdigit() or tok[0] == ".":
            return Fraction(tok.replace(",", ""))
        raise _Reject(f"unexpected {tok!r}")


def parse_value(text: str) -> Fraction | None:
    r"""The exact value of a number or simple arithmetic expression, or ``None`` if it is not one.

    Bounded: ``None`` for anything longer than :data:`MAX_EXPR_CHARS` after normalisation, nested
    deeper than :data:`MAX_DEPTH`, with a non-integer or too large exponent, or with an intermediate
    value above :data:`MAX_BITS` bits. Never raises, never evaluates Python.

    Args:
        text: e.g. ``"3/4"``, ``"-0.75"``, ``"1,000"``, ``"(1+2)^2"``, ``"\frac{3}{4}"``.

    Returns:
        The value as a :class:`~fractions.Fraction`, or ``None``.

    >>> parse_value("6/8"), parse_value("-0.75"), parse_value("2^3^2")
    (Fraction(3, 4), Fraction(-3, 4), Fraction(512, 1))
    >>> parse_value("\\frac{1}{2} + 1,000"), parse_value("9^9^9^9"), parse_value("__import__('os')")
    (Fraction(2001, 2), None, None)
    """
    if not isinstance(text, str) or len(text) > MAX_RESPONSE_CHARS:
        return None
    expr = _normalise_expr(text)
    if not expr or len(expr) > MAX_EXPR_CHARS:
        return None
    try:
        return _Parser(_tokenize(expr)).parse()
    except (_Reject, ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None


def extract_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` in ``text``.

    Braces inside are matched (``\boxed{\frac{1}{2}}`` → ``\frac{1}{2}``). Returns ``None`` when there
    is no ``\boxed{``, the last one is never closed, or ``text`` is longer than :data:`MAX_RESPONSE_CHARS`.

    >>> extract_boxed(r"so \boxed{1} or rather \boxed{\frac{1}{2}}.")
    '\\frac{1}{2}'
    >>> extract_boxed(r"\boxed{12") is None
    True
    """
    if len(text) > MAX_RESPONSE_CHARS:
        return None
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    begin = start + len("\\boxed{")
    depth = 1
    for i in range(begin, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
    return None


def final_answer(text: str) -> str | None:
    r"""The span of ``text`` that :func:`check_answer` treats as the stated answer.

    In order of priority: the last ``\boxed{...}`` (if ``\boxed`` occurs at all, nothing else counts —
    an unclosed box means no answer); the whole text if it is a value (so ``"3+4"`` means 7, not 4);
    the text after the last ``=`` if that is a value; else the last number. A text longer than
    :data:`MAX_RESPONSE_CHARS` states no answer (``None``), whatever it ends with.

    >>> final_answer("12+34=46"), final_answer("The answer is -3/4."), final_answer("3+4")
    ('46', '-3/4', '3+4')
    """
    if len(text) > MAX_RESPONSE_CHARS:
        return None
    if "\\boxed" in text:
        return extract_boxed(text)
    stripped = text.strip().rstrip(".")
    if parse_value(stripped) is not None:
        return stripped
    after_eq = stripped.rpartition("=")[2].strip()
    if "=" in stripped and parse_value(after_eq) is not None:
        return after_eq
    last = deque(_LAST_NUMBER_RE.finditer(text), maxlen=1)  # keeps only the last match
    if last:
        return last[0].group()
    return stripped if stripped else None


def _normalise_text(s: str) -> str:
    return _normalise_expr(s).rstrip(".")


def check_answer(text: str, answer: str) -> bool:
    r"""Whether ``text`` (model output) states ``answer`` (the reference).

    The stated answer is found by :func:`final_answer`. If both it and the reference are values
    (:func:`parse_value`) they are compared exactly as fractions (``0.75 == 3/4 == 6/8``, but
    ``0.333 != 1/3``); otherwise the two strings are compared after dropping whitespace, ``$`` and a
    trailing period. A reference written as ``\boxed{...}`` is unboxed first. Never raises: anything
    malformed, oversized or hostile is simply wrong — a text or reference longer than
    :data:`MAX_RESPONSE_CHARS` included, however it ends (see "The length rule" in the module docstring).

    Args:
        text: decoded model output.
        answer: the reference answer.

    Returns:
        ``True`` iff the stated answer equals the reference.

    >>> check_answer(r"... so the answer is \boxed{\frac{6}{8}}", "0.75")
    True
    >>> check_answer("12+34=46", "46"), check_answer("3+4", "4"), check_answer("9**9**9**9", "1")
    (True, False, False)
    >>> derivation = "1+1=2. "  # 7 characters of working
    >>> check_answer(derivation * 500 + "so x = 4", "4"), check_answer(derivation * 5_000 + "so x = 4", "4")
    (True, False)
    """
    try:
        if not isinstance(text, str) or not isinstance(answer, str) or len(answer) > MAX_RESPONSE_CHARS:
            return False
        ref = (extract_boxed(answer) or "") if "\\boxed" in answer else answer
        ref = ref.strip()
        stated = final_answer(text)
        if stated is None or not ref:
            return False
        ref_value = parse_value(ref)
        if ref_value is not None:
            value = parse_value(stated)
            if value is not None:
                return value == ref_value
        return _normalise_text(stated) == _normalise_text(ref)
    except Exception:  # pragma: no cover - defence in depth: hostile text must never crash a run
        return False
