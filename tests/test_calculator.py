"""The calculator tool: answers arithmetic, refuses everything that is not arithmetic or str.count,
and refuses oversized work before doing it (so each refusal is also fast)."""
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat_core.inference.calculator import CalculatorError, evaluate


@pytest.mark.parametrize("expr, want", [
    ("1+2", "3"),
    ("12*(3+4)", "84"),
    ("48/2", "24"),            # integral float printed like GSM8K's tool outputs
    ("7/2", "3.5"),
    ("7//2", "3"),
    ("-7 % 3", "2"),
    ("2**10", "1024"),
    ("-3**2", "-9"),
    ("1,200 * 3", "3600"),     # thousands separators in pure arithmetic
    ("0.1+0.2", "0.3"),
    ("1/3", "0.333333333333"),
    ("'strawberry'.count('r')", "3"),
    ('"a,b,c".count(",")', "2"),  # commas inside strings are content
    ("'ab' * 3", "ababab"),
    ("  5  ", "5"),
])
def test_arithmetic_answers(expr, want):
    assert evaluate(expr) == want


@given(a=st.integers(-10**6, 10**6), b=st.integers(-10**6, 10**6))
@settings(max_examples=200, deadline=None)
def test_integer_arithmetic_matches_python(a, b):
    assert evaluate(f"({a}) + ({b})") == str(a + b)
    assert evaluate(f"({a}) * ({b})") == str(a * b)
    if b != 0:
        assert evaluate(f"({a}) // ({b})") == str(a // b)
        assert evaluate(f"({a}) % ({b})") == str(a % b)


@pytest.mark.parametrize("expr, why", [
    ("__import__('os').system('echo hi')", "not allowed"),
    ("__import__", "not allowed"),
    ("().__class__.__bases__[0]", "not allowed"),
    ("'abc'.upper()", "not allowed"),
    ("'abc'.__class__", "not allowed"),
    ("(1).real", "not allowed"),
    ("open('/etc/passwd')", "not allowed"),
    ("[x for x in range(10)]", "not allowed"),
    ("lambda: 1", "not allowed"),
    ("a", "not allowed"),
    ("True + 1", "not allowed"),
    ("1j * 2", "not allowed"),
    ("'abc'[0]", "not allowed"),
    ("'abc'.count('a', 1)", "exactly one argument"),
    ("(1).count(1)", "only works on strings"),
    ("1 if 1 else 2", "not allowed"),
    ("x := 3", "not a valid expression"),
    ("import os", "not a valid expression"),
    ("1 +", "not a valid expression"),
    ("", "empty"),
    ("1/0", "division by zero"),
    ("'a' - 'b'", "strings"),
])
def test_refuses_non_arithmetic(expr, why):
    with pytest.raises(CalculatorError, match=why):
        evaluate(expr)


@pytest.mark.parametrize("expr", [
    "9**9**9",             # would take forever / all memory
    "2**100000",
    "10**1000",
    "(10**50)**3",
    "2.0**5000",
    "1e308*10",
    "99999999999**99",
    "'a'*10**9",           # runaway string by repetition
    "'ab'*600",
    "'x'*999 + 'yy'",
    "'a'*1000 + 'a'*1000",
    "1" * 101,             # an integer literal with 101 digits
    "1+" * 300 + "1",      # too many parts
    "(" * 500 + "1" + ")" * 500,
    "1" + "+1" * 600,      # longer than the limit
])
def test_refuses_huge_work_fast(expr):
    # CPU seconds of this process, not wall time: other processes on a busy machine do not count
    t0 = time.process_time()
    with pytest.raises(CalculatorError):
        evaluate(expr)
    assert time.process_time() - t0 < 0.5


def test_small_powers_and_repetition_still_work():
    assert evaluate("2**64") == str(2**64)
    assert evaluate("1**100000") == "1"      # trivially small even with a big exponent
    assert evaluate("'x'*1000") == "x" * 1000
    assert evaluate("2**-2") == "0.25"


def test_not_text_is_refused():
    with pytest.raises(CalculatorError):
        evaluate(123)  # type: ignore[arg-type]


def test_tool_outputs_in_the_training_data_are_what_the_calculator_answers():
    """The engine forces evaluate(expr) where SFT showed the model a python_output: they must agree, or the
    model is trained on one answer format and served another."""
    from nanochat_core.tasks.arithmetic import Arithmetic
    from nanochat_core.tasks.gsm8k import render_solution
    from nanochat_core.tasks.spelling import SpellingBee
    calls = []
    for task in (Arithmetic(300, "train"), SpellingBee(100, "train")):
        for i in range(task.num_examples()):
            parts = task.get_example(i)["messages"][-1]["content"]
            calls += [(a["text"], b["text"]) for a, b in zip(parts, parts[1:])
                      if a["type"] == "python" and b["type"] == "python_output"]
    # a GSM8K-style reference answer, with the <<expr=result>> annotations GSM8K uses
    parts = render_solution("She sells 16-3-4=<<16-3-4=9>>9 eggs for 9*2=<<9*2=18>>$18 and 48/2=<<48/2=24>>24.\n#### 18")
    calls += [(a["text"], b["text"]) for a, b in zip(parts, parts[1:]) if a["type"] == "python"]
    assert len(calls) > 350
    wrong = [(expr, want, evaluate(expr)) for expr, want in calls if evaluate(expr) != want]
    assert wrong == []
