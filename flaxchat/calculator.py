"""The calculator tool the chat model calls between <|python_start|> and <|python_end|>.

Same contract as nanochat's `use_calculator` (nanochat/engine.py): commas are stripped (so
"1,000" means 1000); an expression made only of digits, + - * / ( ) . and spaces is evaluated as
arithmetic, with the power operator refused (exponent bombs); otherwise only a string method call
`"<literal>".count("<literal>")` built from letters, digits, quotes, parentheses, dots, underscores
and spaces is accepted. Anything else, including malformed input and failures such as a division by
zero, gives None, and the engine then emits no tool output.

Unlike nanochat, nothing here goes through `eval`: the expression is parsed with `ast` and only a
whitelist of node types is evaluated, so names, attributes other than `.count`, subscripts, calls,
lambdas and dunder tricks cannot run at all. That also makes nanochat's substring blacklist
("dir", "open", "file", ...) unnecessary, so `"directory".count("r")` works here. The timeout is a
deadline checked at every node instead of SIGALRM, which only works in the main thread (nanochat's
calculator silently returns None when called from any other thread).

The value is rendered with `str`, as nanochat's engine does: 6/3 gives "2.0", 6//3 gives "2".
"""

from __future__ import annotations

import ast
import operator
import time

MAX_EXPRESSION_CHARS = 256  # the longest GSM8K annotation is ~60 characters
DEFAULT_TIMEOUT_S = 3.0  # nanochat's eval_with_timeout default
_ARITHMETIC_CHARS = frozenset("0123456789*+-/.() ")
_STRING_CALL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _Rejected(Exception):
    """The expression uses something outside the whitelist, or ran past its deadline."""


def _arithmetic(node: ast.AST, deadline: float) -> int | float:
    if time.monotonic() > deadline:
        raise _Rejected("deadline")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_arithmetic(node.left, deadline), _arithmetic(node.right, deadline))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_arithmetic(node.operand, deadline))
    raise _Rejected(type(node).__name__)


def _string_count(node: ast.AST) -> int:
    """Exactly `"<literal>".count("<literal>")`: nothing nested, no keywords."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
            and len(node.args) == 1 and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str) and not node.keywords):
        raise _Rejected("not a string .count() call")
    return node.func.value.value.count(node.args[0].value)


def evaluate(expr: str, *, max_chars: int = MAX_EXPRESSION_CHARS, timeout_s: float = DEFAULT_TIMEOUT_S) -> int | float | None:
    """The value of a calculator expression, or None when it is refused or fails."""
    if not isinstance(expr, str):
        return None
    expr = expr.replace(",", "")
    if not expr.strip() or len(expr) > max_chars:
        return None
    chars = set(expr)
    if chars <= _ARITHMETIC_CHARS:
        if "**" in expr:
            return None
        mode = "arithmetic"
    elif chars <= _STRING_CALL_CHARS and ".count(" in expr:
        mode = "count"
    else:
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval")
        if mode == "arithmetic":
            return _arithmetic(tree.body, time.monotonic() + timeout_s)
        return _string_count(tree.body)
    except (_Rejected, SyntaxError, ValueError, ArithmeticError, RecursionError, MemoryError):
        return None


def use_calculator(expr: str) -> str | None:
    """The tool output the engine forces into the sequence for `expr`, or None for no output."""
    value = evaluate(expr)
    return None if value is None else str(value)
