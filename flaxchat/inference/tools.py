"""What the engine forces after a python block: nanochat's calculator, else the sandbox.

`run_tool(expr)` returns the text that goes between <|output_start|> and <|output_end|>: the
calculator's value when it accepts the expression (nanochat's `use_calculator`), otherwise the
sandbox's stdout (a trailing bare expression's value is printed, as in a REPL), or its error line.
"""

from __future__ import annotations

import ast

from flaxchat.calculator import use_calculator

TOOL_TIMEOUT_S = 5.0


def _show_last_expression(code: str) -> str:
    """Like a REPL: a trailing bare expression's value is printed (unless it is None)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code                     # the sandbox reports the SyntaxError line
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return code
    shown = ast.parse("_flaxchat_value = None\nif _flaxchat_value is not None:\n    print(_flaxchat_value)")
    shown.body[0].value = tree.body[-1].value
    tree.body[-1:] = shown.body
    return ast.unparse(ast.fix_missing_locations(tree))


def run_tool(expr: str, timeout_s: float = TOOL_TIMEOUT_S) -> str:
    """The text forced after a python block: calculator value, else sandbox stdout, else its error."""
    value = use_calculator(expr)
    if value is not None:
        return value
    from flaxchat.sandbox import SandboxError, run_code     # heavy; only loaded when code runs
    try:
        result = run_code(_show_last_expression(expr), timeout_s=timeout_s)
    except SandboxError as err:
        return f"error: {err}"
    if result.ok:
        return result.stdout.rstrip("\n")
    lines = result.stderr.strip().splitlines()
    return result.error or (lines[-1] if lines else "error")
