"""
The calculator tool the chat model calls: `<|python_start|>12*(3+4)<|python_end|>` -> "84".

The expression is text the model wrote, so it is untrusted input. We never hand it to eval/exec:
it is parsed with `ast.parse` and we walk the tree ourselves, allowing only
  - number literals (int, float) and string literals,
  - + - * / // % ** and unary + -,
  - parentheses (they are just tree shape),
  - `<string>.count(<string>)`, the one method call (SpellingBee-style "how many r in strawberry").
Everything else (names, other attributes, subscripts, comprehensions, lambdas, ...) is refused.

Resource limits, all checked BEFORE the work is done so nothing can blow up first:
  - expression length and AST node count,
  - integer size (|n| < 10**MAX_INT_DIGITS) and exponents (the result's size is estimated from
    log10|base| * exponent before computing it),
  - string length (concatenation and repetition are sized before they run),
  - a wall-clock deadline checked at every node (belt and braces: with the limits above an evaluation
    is microseconds, but the deadline bounds anything we missed).
No signals (the server evaluates on worker threads, where SIGALRM is not an option).

How a call reads (ToolText, readable_text at the end): [calc 12*7 = 84] - in the terminal chat, the API's
text, the web page and the samples a run prints; the model's special tokens are never shown.
"""
from __future__ import annotations

import ast
import math
import operator
import time

MAX_EXPR_CHARS = 1000
MAX_NODES = 256
MAX_INT_DIGITS = 100          # |ints| stay below 10**100
MAX_FLOAT = 1e100
MAX_STR_LEN = 1000
MAX_EXPONENT = 1000
TIME_LIMIT_S = 0.1


class CalculatorError(ValueError):
    """The expression is not allowed, too big, or fails (e.g. division by zero). The message is short
    enough to show the model as the tool's output."""


_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def evaluate(expr: str, time_limit_s: float = TIME_LIMIT_S) -> str:
    """Evaluate a calculator expression, return the result as text. Raises CalculatorError."""
    if not isinstance(expr, str):
        raise CalculatorError("expression must be text")
    expr = expr.strip()
    if not expr:
        raise CalculatorError("empty expression")
    if len(expr) > MAX_EXPR_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPR_CHARS} characters")
    if '"' not in expr and "'" not in expr:
        # Pure arithmetic: the model writes numbers like people do ("1,200*3"); drop thousands separators.
        # (Inside string literals a comma is content, so only when there are none.)
        expr = expr.replace(",", "")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise CalculatorError("not a valid expression") from None
    nodes = sum(1 for _ in ast.walk(tree))
    if nodes > MAX_NODES:
        raise CalculatorError(f"expression has more than {MAX_NODES} parts")
    deadline = time.monotonic() + time_limit_s
    try:
        value = _eval(tree.body, deadline)
    except CalculatorError:
        raise
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except (OverflowError, MemoryError, RecursionError):
        raise CalculatorError("result too large") from None
    except (TypeError, ValueError) as e:
        raise CalculatorError(f"invalid operation: {e}") from None
    return format_value(value)


def format_value(value: int | float | str) -> str:
    """How a result reads to the model: integers plainly, integral floats without ".0" (48/2 -> "24", as
    in the GSM8K tool calls it was trained on), other floats to 12 significant digits."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e16:
            return str(int(value))
        return f"{value:.12g}"
    return str(value)


def _check(value):
    if isinstance(value, int):   # never a bool: no literal we allow, nor any operation on them, makes one
        if value != 0 and _int_digits(value) > MAX_INT_DIGITS:
            raise CalculatorError(f"number larger than 10**{MAX_INT_DIGITS}")
    elif isinstance(value, float):
        if math.isnan(value) or math.isinf(value) or abs(value) > MAX_FLOAT:
            raise CalculatorError("number too large")
    elif isinstance(value, str):
        if len(value) > MAX_STR_LEN:
            raise CalculatorError(f"string longer than {MAX_STR_LEN} characters")
    else:
        raise CalculatorError(f"{type(value).__name__} values are not supported")
    return value


def _int_digits(n: int) -> int:
    # bit_length is O(1); 0.30103 = log10(2). Off by at most one digit, which is fine for a limit.
    return int(abs(n).bit_length() * 0.30103) + 1


def _eval(node: ast.AST, deadline: float):
    if time.monotonic() > deadline:
        raise CalculatorError("calculation took too long")
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float, str):
            raise CalculatorError(f"literal {node.value!r} is not allowed")
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _eval(node.operand, deadline)
        if isinstance(v, str):
            raise CalculatorError("unary sign on a string")
        return _check(-v if isinstance(node.op, ast.USub) else +v)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a = _eval(node.left, deadline)
        b = _eval(node.right, deadline)
        _precheck_binop(node.op, a, b)
        return _check(_BINOPS[type(node.op)](a, b))
    if isinstance(node, ast.Call):
        return _eval_count(node, deadline)
    if isinstance(node, ast.Attribute):
        raise CalculatorError(f"attribute access .{node.attr} is not allowed")
    if isinstance(node, ast.Name):
        raise CalculatorError(f"name {node.id!r} is not allowed")
    raise CalculatorError(f"{type(node).__name__} is not allowed")


def _precheck_binop(op: ast.operator, a, b) -> None:
    """Refuse work whose result would be too big, before doing it."""
    a_str, b_str = isinstance(a, str), isinstance(b, str)
    if a_str or b_str:
        if isinstance(op, ast.Add) and a_str and b_str:
            if len(a) + len(b) > MAX_STR_LEN:
                raise CalculatorError(f"string longer than {MAX_STR_LEN} characters")
            return
        if isinstance(op, ast.Mult) and (a_str != b_str):
            s, n = (a, b) if a_str else (b, a)
            if not isinstance(n, int):
                raise CalculatorError("a string can only be repeated a whole number of times")
            if len(s) * max(n, 0) > MAX_STR_LEN:
                raise CalculatorError(f"string longer than {MAX_STR_LEN} characters")
            return
        raise CalculatorError("only + (join) and * (repeat) work on strings")
    if isinstance(op, ast.Pow):
        if abs(b) > MAX_EXPONENT:
            if not (isinstance(a, (int, float)) and abs(a) in (0, 1)):
                raise CalculatorError(f"exponent larger than {MAX_EXPONENT}")
        if a != 0 and abs(a) != 1 and b > 0:
            # digits of the result ~ exponent * log10|base|: too big -> refuse without computing
            if b * math.log10(abs(a)) > MAX_INT_DIGITS:
                raise CalculatorError(f"result larger than 10**{MAX_INT_DIGITS}")
        if a == 0 and b < 0:
            raise ZeroDivisionError
        if isinstance(b, float) and a < 0:
            raise CalculatorError("fractional power of a negative number")


def _eval_count(node: ast.Call, deadline: float) -> int:
    func = node.func
    if not (isinstance(func, ast.Attribute) and func.attr == "count"):
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", type(func).__name__)
        raise CalculatorError(f"calling {name!r} is not allowed (only <string>.count(<string>))")
    if node.keywords or len(node.args) != 1:
        raise CalculatorError(".count takes exactly one argument")
    haystack = _eval(func.value, deadline)
    needle = _eval(node.args[0], deadline)
    if not (isinstance(haystack, str) and isinstance(needle, str)):
        raise CalculatorError(".count only works on strings")
    return haystack.count(needle)


# -----------------------------------------------------------------------------
# Tool calls as text a person reads

CALC_OPEN, CALC_SEP, CALC_CLOSE = "[calc ", " = ", "]"


class ToolText:
    """Reply pieces (text / python / python_output, as Engine.stream_reply yields them) -> readable text, with a
    calculator call and its result written [calc 12*7 = 84]. Every surface shows a tool call this way:
    the terminal chat, the sample at the end of a run, the API's `content` (serve.py parses it back into
    parts when a client sends the history) and the web page (which draws it as boxes). The engine reports
    python -> text -> python_output (<|python_end|> closes the call before the result is forced), so the
    bracket stays open from the call until its result ends; text that comes without a result closes it."""

    def __init__(self):
        self.kind, self.open = "text", False

    def frame(self, kind: str, text: str = "") -> str:
        """What to write before `text` of `kind`: the bracket's opening, separator or close, or nothing."""
        out = ""
        if kind == "python" and self.kind != "python":
            out, self.open = self._close() + CALC_OPEN, True
        elif kind == "python_output" and self.kind != "python_output":
            out, self.open = (CALC_SEP if self.open else "[= "), True
        elif kind == "text" and (self.kind == "python_output" or (text and self.open)):
            out = self._close()
        self.kind = kind
        return out

    def feed(self, kind: str, text: str) -> str:
        return self.frame(kind, text) + text

    def close(self) -> str:
        self.kind = "text"
        return self._close()

    def _close(self) -> str:
        was, self.open = self.open, False
        return CALC_CLOSE if was else ""


def readable_text(tokenizer, ids: list[int]) -> str:
    """Generated token ids -> readable text: tool calls as [calc EXPR = RESULT], every other special token
    (structure, not text) left out. For the samples stages print; the chat UIs stream through ToolText."""
    sp = tokenizer.encode_special
    kinds = {sp("<|python_start|>"): "python", sp("<|python_end|>"): "text",
             sp("<|output_start|>"): "python_output", sp("<|output_end|>"): "text"}
    specials = {sp(s) for s in tokenizer.get_special_tokens()}
    view, out, run, kind = ToolText(), [], [], "text"
    for t in list(ids) + [None]:
        if t is None or t in specials:
            if run:
                out.append(view.feed(kind, tokenizer.decode(run)))
                run = []
            if t in kinds:
                kind = kinds[t]
                out.append(view.frame(kind))
        else:
            run.append(t)
    out.append(view.close())
    return "".join(out)
