"""HumanEval in the sandbox: assemble a problem's program from a completion and run its tests.

A chat model usually answers with the whole function, so `completion_is_full_function` replaces the
prompt by the completion, keeping only the prompt's imports (as nanochat evaluates chat models).
"""

from __future__ import annotations

from flaxchat.sandbox import ExecutionResult, run_code


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


def humaneval_program(problem: dict, completion: str, *, completion_is_full_function: bool = False) -> str:
    """prompt + completion + test + check(entry_point); a full-function completion (chat models,
    as nanochat evaluates them) replaces the prompt and keeps only the prompt's imports."""
    head = _leading_imports(problem["prompt"]) + "\n\n" if completion_is_full_function else problem["prompt"]
    return f"{head}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def run_humaneval(problem: dict, completion: str, timeout_s: float = 5.0, *, memory_mb: int | None = 512,
                  completion_is_full_function: bool = False, mode: str | None = None) -> ExecutionResult:
    """Run one HumanEval problem's tests on a completion; result.ok means the tests passed."""
    program = humaneval_program(problem, completion, completion_is_full_function=completion_is_full_function)
    return run_code(program, timeout_s=timeout_s, memory_mb=memory_mb, mode=mode)
