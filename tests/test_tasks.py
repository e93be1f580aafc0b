"""Tasks: determinism, exact rewards against naive references, knob validation, JSONL errors."""

from __future__ import annotations

import json
import random
import re
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.tasks import (
    ALPHABET,
    EOS_TOKEN,
    SPECIAL_TOKENS,
    TASKS,
    AdditionTask,
    CountTask,
    JsonlMathTask,
    MultiAddTask,
    ProbeTask,
    Problem,
    SortTask,
    Task,
    make_task,
    response_text,
)

SYNTHETIC: list[Task] = [
    AdditionTask(1),
    AdditionTask(2),
    AdditionTask(7),
    SortTask(4),
    SortTask(10, alphabet_size=3),
    CountTask(6, 4),
    CountTask(10, 2),
    MultiAddTask(2, 2),
    MultiAddTask(0, 1),
    MultiAddTask(8, 4),
    ProbeTask(),
    ProbeTask(target="3", digit_credit=0.5, prompt="pick:"),
]


def completion_of(task: Task, problem: Problem) -> str:
    """The ideal completion, as an engine would decode it (eos and padding after it)."""
    text = task.sft_text(problem)
    assert text.startswith(problem.prompt)
    return text[len(problem.prompt) :] + EOS_TOKEN + "<pad><pad>"


# --- the alphabet and shared helpers ---------------------------------------------------------


def test_alphabet_is_unique_and_covers_what_the_brief_lists() -> None:
    assert len(set(ALPHABET)) == len(ALPHABET)
    required = string.digits + "+-*/=,. " + string.ascii_lowercase + "()[]{}\\^:;?"
    assert set(required) <= set(ALPHABET)
    assert not any(tok in ALPHABET for tok in SPECIAL_TOKENS)
    assert ALPHABET.startswith("0123456789")  # ids are append-only: digits keep ids 4..13


def test_response_text_cuts_at_first_eos() -> None:
    assert response_text("12<eos>34<eos>") == "12"
    assert response_text("<eos>") == ""
    assert response_text("no eos") == "no eos"


# --- properties every synthetic task has ------------------------------------------------------


@pytest.mark.parametrize("task", SYNTHETIC, ids=repr)
def test_task_contract(task: Task) -> None:
    assert isinstance(task, Task)
    assert TASKS[task.name] is type(task)
    problems = task.sample(200, random.Random(0))
    assert len(problems) == 200
    for p in problems:
        assert set(p.prompt) <= set(ALPHABET) and 1 <= len(p.prompt) <= 16
        ideal = task.sft_text(p)
        assert set(ideal) <= set(ALPHABET)
        # the ideal completion plus eos fits the response budget (char-level: one token per char)
        assert len(ideal) - len(p.prompt) + 1 <= task.max_new_tokens
        assert task.reward(p, completion_of(task, p)) == 1.0
        assert task.reward(p, "") == 0.0
        # a sampled tail token spoils the answer it lands in (MultiAdd keeps credit for the other parts)
        spoiled = task.reward(p, "<unused_7>" + completion_of(task, p))
        assert spoiled < 1.0 if isinstance(task, MultiAddTask) else spoiled == 0.0


@pytest.mark.parametrize("task", SYNTHETIC, ids=repr)
def test_sampling_is_deterministic_given_rng(task: Task) -> None:
    a = task.sample(50, random.Random(123))
    b = task.sample(50, random.Random(123))
    assert a == b
    assert [task.sft_text(p) for p in a] == [task.sft_text(p) for p in b]
    if not isinstance(task, ProbeTask):
        assert a != task.sample(50, random.Random(124))
    assert task.sample(0, random.Random(0)) == []


@pytest.mark.parametrize("task", SYNTHETIC, ids=repr)
@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=ALPHABET + "<>_", max_size=40), st.integers(0, 2**32))
def test_reward_is_in_unit_interval(task: Task, completion: str, seed: int) -> None:
    [p] = task.sample(1, random.Random(seed))
    r = task.reward(p, completion)
    assert isinstance(r, float) and 0.0 <= r <= 1.0


def test_sample_rejects_bad_n() -> None:
    with pytest.raises(ValueError, match="n=-1"):
        AdditionTask().sample(-1, random.Random(0))


# --- each task against a naive reference ------------------------------------------------------


def test_addition_answers_and_operand_range() -> None:
    task = AdditionTask(digits=3)
    problems = task.sample(2000, random.Random(0))
    ops = []
    for p in problems:
        a, b = map(int, re.fullmatch(r"(\d+)\+(\d+)=", p.prompt).groups())
        assert p.answer == str(a + b)
        ops += [a, b]
    assert min(ops) < 20 and max(ops) > 980 and max(ops) <= 999
    p = Problem("12+34=", "46")
    assert task.reward(p, "46") == 1.0
    assert task.reward(p, "046") == 0.0
    assert task.reward(p, " 46") == 0.0
    assert task.reward(p, "4") == 0.0
    assert task.reward(p, "466") == 0.0


def test_sort_and_count_answers() -> None:
    for p in SortTask(length=6, alphabet_size=4).sample(300, random.Random(1)):
        letters = p.prompt.removeprefix("sort ").removesuffix("=")
        assert len(letters) == 6 and set(letters) <= set("abcd")
        assert p.answer == "".join(sorted(letters))
    counts = []
    for p in CountTask(length=8, alphabet_size=3).sample(300, random.Random(2)):
        m = re.fullmatch(r"([a-z]) in ([a-z]+)=", p.prompt)
        assert m is not None
        c, s = m.groups()
        assert p.answer == str(s.count(c))
        counts.append(int(p.answer))
    assert 0 in counts and max(counts) >= 5  # the distribution is not degenerate


def test_multiadd_reward_cases() -> None:
    task = MultiAddTask(n_problems=2, digits=2)
    p = Problem("12+34=", "46")
    cases = {
        "46;57+8=65;3+21=24": 1.0,
        "46;57+8=65;3+21=24<eos>junk": 1.0,
        "47;57+8=65;3+21=24": 2 / 3,  # prompt answered wrong
        "46;57+8=65": 2 / 3,  # stopped early
        "46": 1 / 3,
        "46;57+8=65;3+21=24;1+1=2": 3 / 4,  # rambling dilutes
        "46;57+8=65;57+8=65": 2 / 3,  # repeats earn nothing
        "46;34+12=46;1+2=3": 1.0,  # commuted operands are a new problem
        "46;12+34=46;1+2=3": 2 / 3,  # re-posing the prompt earns nothing
        "46;057+8=65;3+21=24": 2 / 3,  # leading zero: not well-formed
        "46;100+8=108;3+21=24": 2 / 3,  # operand has too many digits
        "46;57+8=065;3+21=24": 2 / 3,
        "46;0+0=0;3+21=24": 1.0,
        "46;57+8=65;3+21=24;": 3 / 4,  # a trailing empty part counts as a bad part
        "46;57-8=49;3+21=24": 2 / 3,
        "": 0.0,
    }
    for completion, expected in cases.items():
        assert task.reward(p, completion) == pytest.approx(expected), completion


def test_multiadd_sft_text_is_deterministic_valid_and_fits_24_tokens() -> None:
    task = MultiAddTask(n_problems=2, digits=2)
    assert task.max_new_tokens == 24
    p = Problem("99+99=", "198")
    text = task.sft_text(p)
    assert text == task.sft_text(Problem("99+99=", "198"))
    parts = text[len(p.prompt) :].split(";")
    assert parts[0] == "198" and len(parts) == 3
    assert len({part.split("=")[0] for part in parts[1:]} | {"99+99"}) == 3
    assert task.sample(5, random.Random(0)) == AdditionTask(2).sample(5, random.Random(0))


def test_probe_reward_and_known_optimum() -> None:
    task = ProbeTask(target="7", digit_credit=0.25)
    [p] = task.sample(1, random.Random(0))
    assert p == Problem("?", "7")
    assert task.reward(p, "7") == 1.0
    assert task.reward(p, "7123<eos>") == 1.0  # only the first character counts
    assert task.reward(p, "3") == 0.25
    assert task.reward(p, "a7") == 0.0
    assert task.reward(p, "<eos>7") == 0.0
    assert task.reward(p, "\u0667") == 0.0  # a non-ASCII digit is not a digit here
    # The stated optimum: putting all mass on the target is strictly best.
    rng = random.Random(0)
    for _ in range(100):
        w = [rng.random() for _ in range(12)]
        total = sum(w)
        chars = [*string.digits, "a", "b"]
        expected = sum(wi / total * task.reward(p, c) for wi, c in zip(w, chars))
        assert expected < 1.0
    assert ProbeTask().reward(p, "3") == 0.0


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: AdditionTask(0), "digits=0"),
        (lambda: AdditionTask(8), "digits=8"),
        (lambda: AdditionTask(2.0), "digits=2.0"),
        (lambda: SortTask(11), "length=11"),
        (lambda: SortTask(4, alphabet_size=1), "alphabet_size=1"),
        (lambda: CountTask(0), "length=0"),
        (lambda: CountTask(4, 27), "alphabet_size=27"),
        (lambda: MultiAddTask(25), "n_problems=25"),
        (lambda: MultiAddTask(2, 5), "digits=5"),
        (lambda: ProbeTask(target="x"), "target='x'"),
        (lambda: ProbeTask(target="77"), "target='77'"),
        (lambda: ProbeTask(digit_credit=1.0), "digit_credit=1.0"),
        (lambda: ProbeTask(prompt=""), "prompt=''"),
        (lambda: ProbeTask(prompt="Q"), "prompt='Q'"),
        (lambda: ProbeTask(max_new_tokens=0), "max_new_tokens=0"),
    ],
)
def test_knob_validation_names_the_argument(factory, match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        factory()


# --- registry ----------------------------------------------------------------------------------


def test_make_task_registry(tmp_path: Path) -> None:
    assert set(TASKS) == {"addition", "sort", "count", "multiadd", "probe", "jsonl"}
    assert make_task("addition", digits=3) == AdditionTask(3)
    assert make_task("multiadd") == MultiAddTask()
    f = tmp_path / "m.jsonl"
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    assert isinstance(make_task("jsonl", path=f), JsonlMathTask)
    with pytest.raises(ValueError, match=r"name='nope'.*addition"):
        make_task("nope")
    with pytest.raises(ValueError, match=r"takes no argument\(s\) \['dgits'\].*digits"):
        make_task("addition", dgits=3)


# --- JSONL -------------------------------------------------------------------------------------


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_loads_samples_and_rewards(tmp_path: Path) -> None:
    records = [
        {"prompt": "what is 3/4 as a decimal?", "answer": "0.75"},
        {"prompt": "2+2=", "answer": 4},
        {"prompt": "half of 1", "answer": "\\frac{1}{2}", "solution": "1/2 so \\boxed{\\frac{1}{2}}"},
    ]
    f = write_jsonl(tmp_path / "math.jsonl", [json.dumps(r) for r in records] + [""])
    task = JsonlMathTask(f, max_new_tokens=64)
    assert len(task) == 3 and task.max_new_tokens == 64
    p0, p1, p2 = task.problems
    assert p1 == Problem("2+2=", "4")
    assert task.reward(p0, "\\boxed{3/4}<eos>") == 1.0
    assert task.reward(p0, "0.75") == 1.0
    assert task.reward(p0, "0.7<eos>5") == 0.0  # only text before eos counts
    assert task.reward(p1, "2+2=4") == 1.0
    assert task.sft_text(p1) == "2+2=4"
    assert task.sft_text(p2) == "half of 11/2 so \\boxed{\\frac{1}{2}}"
    assert task.reward(p2, task.sft_text(p2)[len(p2.prompt) :]) == 1.0
    # sampling: distinct within a call when possible, deterministic given rng
    batch = task.sample(3, random.Random(0))
    assert sorted(batch, key=lambda p: p.prompt) == sorted(task.problems, key=lambda p: p.prompt)
    assert task.sample(10, random.Random(5)) == task.sample(10, random.Random(5))
    assert len(task.sample(10, random.Random(5))) == 10


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"prompt": "a", "answer": "1"}', "{not json"], r"bad\.jsonl:2: invalid JSON"),
        (['{"prompt": "a"}'], r"bad\.jsonl:1: missing field 'answer'"),
        (["", '{"answer": "1"}'], r"bad\.jsonl:2: missing field 'prompt'"),
        (['["a", "1"]'], r"bad\.jsonl:1: expected a JSON object"),
        (['{"prompt": 3, "answer": "1"}'], r"bad\.jsonl:1: field 'prompt' must be a non-empty string"),
        (['{"prompt": "a", "answer": ""}'], r"bad\.jsonl:1: field 'answer' must be a non-empty string"),
        (['{"prompt": "a", "answer": null}'], r"bad\.jsonl:1: field 'answer'"),
        (['{"prompt": "a", "answer": "1", "solution": 5}'], r"bad\.jsonl:1: field 'solution'"),
        ([], r"bad\.jsonl: no problems"),
        (["", "   "], r"bad\.jsonl: no problems"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, lines: list[str], match: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        JsonlMathTask(f)


def test_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such JSONL file"):
        JsonlMathTask(tmp_path / "absent.jsonl")
