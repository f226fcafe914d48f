"""Running model-written code safely: the python tool during generation and graded execution.

- execute.py   run_code / run_graded: a fresh interpreter under bubblewrap (no network, read-only
               root, own pid namespace) or, where namespaces are unavailable, rlimits + seccomp
               (warned loudly), with a wall-clock kill of the whole process group
- runner.py    the program the child interpreter runs first: limits, privilege drop, seccomp, and
               for graded runs the split into a candidate process and a tests process
- capture.py   bounded pipe capture and waiting without reaping
- grading.py   the parent's side of a graded run: the secret channel and the unforgeable verdict
- humaneval.py HumanEval problems graded from outside the program (run_humaneval)
"""

from flaxchat.sandbox.execute import (MODE_ENV, PYTHON_ENV, ExecutionResult, SandboxError, bwrap_available,
                                      isolation_level, run_code, run_graded, sandbox_isolation, sandbox_mode)
from flaxchat.sandbox.humaneval import humaneval_program, run_humaneval

__all__ = ["MODE_ENV", "PYTHON_ENV", "ExecutionResult", "SandboxError", "bwrap_available", "humaneval_program",
           "isolation_level", "run_code", "run_graded", "run_humaneval", "sandbox_isolation", "sandbox_mode"]
