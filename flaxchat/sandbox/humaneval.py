"""HumanEval in the sandbox: grade a completion against a problem's tests, from outside the program.

The completion (untrusted) runs as its own program: the prompt + completion, or, for a chat model
that answers with the whole function (`completion_is_full_function`, as nanochat evaluates chat
models), the prompt's imports + completion. The problem's tests never enter that program: they run
in a second process with the prompt as trusted setup (for helpers such as HumanEval/32's `poly`)
and call the entry point through plain-data pipes; a per-run token written only after
`check(candidate)` returned is what marks a pass (flaxchat.sandbox.run_graded explains the design
and its remaining attack surface). Exiting early, redefining `check`, patching builtins or printing
a fake marker therefore cannot pass.
"""

from __future__ import annotations

from flaxchat.sandbox.execute import ExecutionResult, run_graded


def _leading_imports(prompt: str) -> str:
    """The import lines at the top of a HumanEval prompt (a chat completion may omit them)."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def _setup_code(prompt: str) -> str:
    """The prompt as trusted setup for the tests' process (helpers, imports): as is when it compiles
    (every HumanEval prompt ends in a docstring), else with a `pass` body, else its imports only."""
    for code in (prompt, prompt.rstrip("\n") + "\n    pass\n", _leading_imports(prompt)):
        try:
            compile(code, "<setup>", "exec")
            return code
        except SyntaxError:
            continue
    return ""


def candidate_program(problem: dict, completion: str, *, completion_is_full_function: bool = False) -> str:
    """The untrusted program: prompt + completion; a full-function completion (chat models) replaces
    the prompt and keeps only the prompt's imports. The tests are not part of it."""
    head = _leading_imports(problem["prompt"]) + "\n\n" if completion_is_full_function else problem["prompt"]
    return f"{head}{completion}\n"


def humaneval_program(problem: dict, completion: str, *, completion_is_full_function: bool = False) -> str:
    """The classic single-file program (candidate + test + check(entry_point)), for display and
    debugging only: grading never runs this, since a program holding its own tests can fake a pass."""
    program = candidate_program(problem, completion, completion_is_full_function=completion_is_full_function)
    return f"{program}\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def run_humaneval(problem: dict, completion: str, timeout_s: float = 5.0, *, memory_mb: int | None = 512,
                  completion_is_full_function: bool = False, mode: str | None = None) -> ExecutionResult:
    """Run one HumanEval problem's tests on a completion; result.ok means check() returned normally
    in the tests' own process. result.isolation says what isolated the run."""
    program = candidate_program(problem, completion, completion_is_full_function=completion_is_full_function)
    return run_graded(program, test=problem["test"], entry_point=problem["entry_point"], setup=_setup_code(problem["prompt"]),
                      timeout_s=timeout_s, memory_mb=memory_mb, mode=mode)
