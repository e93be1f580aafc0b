"""check_answer / parse_value: exact values, boxed extraction, and hostile text returning False fast."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.tasks import check_answer, extract_boxed, final_answer, parse_value
from workbench.tasks.answers import MAX_DEPTH, MAX_EXPONENT, MAX_EXPR_CHARS, MAX_RESPONSE_CHARS

# --- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", Fraction(42)),
        ("-7", Fraction(-7)),
        ("0.75", Fraction(3, 4)),
        (".5", Fraction(1, 2)),
        ("3/4", Fraction(3, 4)),
        ("6/8", Fraction(3, 4)),
        ("-3/4", Fraction(-3, 4)),
        ("1,000,000", Fraction(10**6)),
        ("2^10", Fraction(1024)),
        ("2**10", Fraction(1024)),
        ("2^3^2", Fraction(512)),  # right-associative
        ("-2^2", Fraction(-4)),  # ^ binds tighter than unary minus
        ("(-2)^2", Fraction(4)),
        ("2^-2", Fraction(1, 4)),
        ("1+2*3", Fraction(7)),
        ("(1+2)*3", Fraction(9)),
        ("8/4/2", Fraction(1)),  # left-associative
        ("10-3-2", Fraction(5)),
        ("--3", Fraction(3)),
        (" 1 + 2 ", Fraction(3)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("\\dfrac{-1}{\\frac{1}{2}}", Fraction(-2)),
        ("2\\cdot 3", Fraction(6)),
        ("2\\times3", Fraction(6)),
        ("6\\div4", Fraction(3, 2)),
        ("2^{10}", Fraction(1024)),
        ("\\left(1+1\\right)^{2}", Fraction(4)),
        ("$12$", Fraction(12)),
        ("\u22125", Fraction(-5)),
    ],
)
def test_parse_value_exact(text: str, value: Fraction) -> None:
    assert parse_value(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "1/0",
        "\\frac{1}{0}",
        "0^-1",
        "2^0.5",
        "2(3)",
        "1+",
        "(1",
        "1)",
        "1..2",
        "1,2",
        "x+1",
        "\\sqrt{2}",
        "1e5",
        f"2^{MAX_EXPONENT + 1}",
        "9^9^9^9",
        "9**9**9**9",
        "(2^64)^64",
        "(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1),
        "-" * (MAX_DEPTH + 1) + "1",
        "1+" * (MAX_EXPR_CHARS // 2) + "1",
        "__import__('os').system('x')",
    ],
)
def test_parse_value_rejects(text: str) -> None:
    assert parse_value(text) is None


def test_parse_value_accepts_at_the_bounds() -> None:
    assert parse_value(f"2^{MAX_EXPONENT}") == 2**MAX_EXPONENT
    assert parse_value(f"2^-{MAX_EXPONENT}") == Fraction(1, 2**MAX_EXPONENT)
    depth = MAX_DEPTH - 1  # the outer expression takes one level
    assert parse_value("(" * depth + "1" + ")" * depth) == 1


# A reference evaluator over an expression *tree* (never a string), to check the parser against.
_leaf = st.integers(-50, 50).map(lambda v: (str(v) if v >= 0 else f"({v})", Fraction(v)))


def _combine(children: st.SearchStrategy) -> st.SearchStrategy:
    def build(op: str, a: tuple[str, Fraction], b: tuple[str, Fraction]) -> tuple[str, Fraction | None]:
        (sa, va), (sb, vb) = a, b
        if va is None or vb is None:
            return f"({sa}{op}{sb})", None
        if op == "+":
            return f"({sa}+{sb})", va + vb
        if op == "-":
            return f"({sa}-{sb})", va - vb
        if op == "*":
            return f"({sa}*{sb})", va * vb
        return f"({sa}/{sb})", (va / vb if vb != 0 else None)

    return st.builds(build, st.sampled_from("+-*/"), children, children)


@settings(max_examples=300, deadline=None)
@given(st.recursive(_leaf, _combine, max_leaves=8))
def test_parse_value_matches_reference_tree_evaluation(tree: tuple[str, Fraction | None]) -> None:
    text, value = tree
    if len(text) > MAX_EXPR_CHARS:
        assert parse_value(text) is None
    else:
        assert parse_value(text) == value


# --- extraction -------------------------------------------------------------------------------


def test_extract_boxed_last_and_nested() -> None:
    assert extract_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert extract_boxed("\\boxed{\\frac{1}{\\sqrt{4}}}") == "\\frac{1}{\\sqrt{4}}"
    assert extract_boxed("\\boxed{}") == ""
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxed{1") is None
    assert extract_boxed("\\boxed{1}" + " " * 20_000) == "1"
    assert extract_boxed("\\boxed{1}" + " " * MAX_RESPONSE_CHARS) is None  # an over-long text has no answer


@pytest.mark.parametrize(
    ("text", "stated"),
    [
        ("46", "46"),
        ("12+34=46", "46"),
        ("the answer is 7.", "7"),
        ("x = -3/4.", "-3/4"),
        ("5-3", "5-3"),  # the whole text is a value: 2, not "-3"
        ("so x-3 and then 4", "4"),
        ("answer: \\boxed{12} (not 13)", "12"),
        ("1,000 apples", "1,000"),
        ("abc", "abc"),
        ("", None),
    ],
)
def test_final_answer(text: str, stated: str | None) -> None:
    assert final_answer(text) == stated


# --- check_answer -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("46", "46"),
        ("0.75", "3/4"),
        ("3/4", "0.75"),
        ("6/8", "3/4"),
        ("-0.5", "-1/2"),
        ("12+34=46", "46"),
        ("so the answer is \\boxed{\\frac{6}{8}}", "0.75"),
        ("\\boxed{\\boxed{3}}", "3"),
        ("The answer is 1,000.", "1000"),
        ("2^10", "1024"),
        ("46", "\\boxed{46}"),
        ("\\boxed{\\sqrt{2}}", "\\sqrt{2}"),  # not a value: compared as normalised strings
        ("\\boxed{(1, 2)}", "(1,2)"),
        ("abcd", "abcd"),
        ("  46  ", "46"),
    ],
)
def test_check_answer_accepts(text: str, answer: str) -> None:
    assert check_answer(text, answer) is True


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("47", "46"),
        ("0.333", "1/3"),  # exact comparison: decimals are not rounded
        ("3+4", "4"),  # the last number is not the answer when the whole text is a value
        ("\\boxed{1} \\boxed{2}", "1"),  # the last box counts
        ("\\boxed{46", "46"),  # an unclosed box is no answer
        ("46 \\boxed{", "46"),
        ("", "46"),
        ("46", ""),
        ("no digits here", "46"),
        ("\\boxed{}", "0"),
        ("abce", "abcd"),
        ("9^9^9^9", "9^9^9^9x"),
    ],
)
def test_check_answer_rejects(text: str, answer: str) -> None:
    assert check_answer(text, answer) is False


def test_check_answer_non_strings_are_wrong() -> None:
    assert check_answer(None, "1") is False  # type: ignore[arg-type]
    assert check_answer("1", 1) is False  # type: ignore[arg-type]


HOSTILE = [
    "__import__('os').system('x')",
    "9**9**9**9",
    "9^9^9^9",
    "\\boxed{9^9^9^9}",
    "(2^64)^64^64",
    "1" * 1_000_000,
    "x" * 1_000_000 + "46",
    "(" * 10_000 + "1" + ")" * 10_000,
    "\\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}",
    "\\boxed{" * 10_000 + "1" + "}" * 10_000,
    "{" * 100_000,
    "-" * 100_000 + "1",
    "1." * 500_000,
    "1/" * 500_000 + "1",
    "1," * 500_000,
    "=" * 1_000_000,
    "\\frac{" * 5_000 + "1",
    "x" * 100_000 + "= 46",  # a buried answer: over-long texts are wrong, not read from their end
    "junk " * 20_000 + "\\boxed{46}",
]


@pytest.mark.parametrize("text", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_text_is_wrong_and_fast(text: str) -> None:
    start = time.perf_counter()
    result = check_answer(text, "46")
    elapsed = time.perf_counter() - start
    assert result is False
    assert elapsed < 0.2, f"check_answer took {elapsed:.3f} s"


# The length rule (answers.py module docstring): a response longer than MAX_RESPONSE_CHARS is wrong as a
# whole, however right its ending; up to the limit the answer in the expected place counts.
BURIED = [
    "x" * 100_000 + "= 4",
    "x" * 100_000 + "\\boxed{4}",
    "1+1=2. " * 5_000 + "so x = 4",  # a long derivation is not exempt
    "4" + " " * MAX_RESPONSE_CHARS,
    ("= 4").rjust(MAX_RESPONSE_CHARS + 1, "x"),  # one character over
]


@pytest.mark.parametrize("text", BURIED, ids=[f"buried{i}" for i in range(len(BURIED))])
def test_an_answer_after_more_than_the_length_limit_is_wrong(text: str) -> None:
    assert len(text) > MAX_RESPONSE_CHARS
    start = time.perf_counter()
    assert final_answer(text) is None and extract_boxed(text) is None
    assert check_answer(text, "4") is False
    assert time.perf_counter() - start < 0.2


def test_the_length_limit_is_inclusive_and_applies_to_the_reference() -> None:
    at_limit = ("= 4").rjust(MAX_RESPONSE_CHARS, "x")
    assert check_answer(at_limit, "4") is True and check_answer("x" + at_limit, "4") is False
    assert check_answer("1+1=2. " * 500 + "so x = 4", "4") is True  # 3,508 characters of working
    assert check_answer("4", "4".rjust(MAX_RESPONSE_CHARS + 1)) is False


def test_hostile_reference_is_bounded_too() -> None:
    start = time.perf_counter()
    assert check_answer("1", "9^9^9^9") is False
    assert check_answer("1", "(" * 10_000 + "1" + ")" * 10_000) is False
    assert time.perf_counter() - start < 0.2


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300), st.text(max_size=30))
def test_fuzz_never_raises_and_returns_bool(text: str, answer: str) -> None:
    assert isinstance(check_answer(text, answer), bool)


_expr_chars = st.text(alphabet="0123456789+-*/^().,{}\\fracboxed =", max_size=200)


@settings(max_examples=500, deadline=None)
@given(_expr_chars, _expr_chars)
def test_fuzz_expression_like_text(text: str, answer: str) -> None:
    start = time.perf_counter()
    assert isinstance(check_answer(text, answer), bool)
    assert time.perf_counter() - start < 0.2
