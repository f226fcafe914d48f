"""The calculator tool: nanochat's contract (arithmetic and "<str>".count("<str>")), nothing else."""

import threading

import pytest

from flaxchat.calculator import MAX_EXPRESSION_CHARS, evaluate, use_calculator


@pytest.mark.parametrize("expr, expected", [
    ("1+2", "3"),
    ("2 + 3 * 4", "14"),  # precedence
    ("(2 + 3) * 4", "20"),
    ("10 - 4 - 3", "3"),  # left associativity
    ("-5 + 2", "-3"),
    ("7 / 2", "3.5"),
    ("6 / 3", "2.0"),  # true division gives a float, rendered with str() as nanochat does
    ("7 // 2", "3"),
    ("0.1 + 0.2", str(0.1 + 0.2)),
    ("1,000 * 3", "3000"),  # commas are thousands separators
    ("48/2", "24.0"),
    ("  12 * 12  ", "144"),
    ("123456789 * 987654321", str(123456789 * 987654321)),
])
def test_arithmetic(expr, expected):
    assert use_calculator(expr) == expected


@pytest.mark.parametrize("expr, expected", [
    ('"strawberry".count("r")', "3"),
    ("'banana'.count('a')", "3"),
    ('"hello world".count("o")', "2"),
    ('"directory".count("r")', "2"),  # nanochat's blacklist refused "dir"; the AST whitelist need not
    ('("mississippi").count("ss")', "2"),
    ('"abc".count("z")', "0"),
    ('"a,b".count("a" "b")', "1"),  # commas stripped, then implicit concatenation: harmless
])
def test_string_count(expr, expected):
    assert use_calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    "2**10", "9**9**9", "2 ** 100000",  # power / exponent bombs
    "x + 1", "abs(-3)", "len('abc')",  # names and calls
    "__import__('os').system('echo hi')", "().__class__.__bases__[0].__subclasses__()",
    "import os", "open('/etc/passwd').read()", "eval('1+1')", "exec('x=1')",
    '"abc".upper()', '"abc".count.__self__', "'a'.__class__", '"abc".count(x)',  # attributes / names
    '"ab".count("a") + 1', '"ab".count("a").count',  # extra operators and attributes
    '"abc".count("a", 1)',  # commas are stripped first, so this is a syntax error (as in nanochat)
    "1 +", "(1 + 2", "1 2", "", "   ", "()", "1..2", "007",  # malformed
    "1/0", "5 // 0",  # arithmetic errors
    "3 % 2", "1 < 2", "1e5", "[1, 2]",  # characters outside both whitelists
    "1+" * 200 + "1",  # longer than the length cap
])
def test_rejected(expr):
    assert use_calculator(expr) is None


def test_length_cap_is_the_boundary():
    terms = (MAX_EXPRESSION_CHARS + 1) // 2  # "1+1+...+1" with `terms` ones has 2*terms-1 chars
    at_cap = "+".join(["1"] * terms)
    assert len(at_cap) <= MAX_EXPRESSION_CHARS and use_calculator(at_cap) == str(terms)
    over_cap = "+".join(["1"] * (terms + 1))
    assert len(over_cap) > MAX_EXPRESSION_CHARS and use_calculator(over_cap) is None


def test_timeout_refuses_slow_evaluation():
    assert evaluate("1+1", timeout_s=-1.0) is None  # an already-expired deadline
    assert evaluate("1+1", timeout_s=1.0) == 2


def test_non_string_input():
    assert use_calculator(None) is None  # type: ignore[arg-type]


def test_works_off_the_main_thread():
    """nanochat's SIGALRM timeout fails (returns None) outside the main thread; this must not."""
    results = []
    thread = threading.Thread(target=lambda: results.append(use_calculator("6 * 7")))
    thread.start()
    thread.join()
    assert results == ["42"]
