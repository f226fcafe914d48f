"""HumanEval grading cannot be fooled: only a completion whose tests return normally passes.

Default tier: three hand-written problems in HumanEval format, in every sandbox mode this machine
supports; the right answer passes, a wrong one fails, and so does every trick that makes an
in-process grader report a pass (early exits at import time and inside the function, redefining
`check`, patching builtins, atexit/excepthook, reading the tests from the program's own files or
memory, printing or writing a fake marker, an always-equal result, killing the process group).
Conformance tier (../shared): all 164 canonical solutions pass, a `return None` body fails on
every problem, and the early-exit tricks fail on a sample of problems.
"""

import gzip
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flaxchat.sandbox import execute as sandbox
from flaxchat.sandbox.humaneval import run_humaneval

pytestmark = pytest.mark.timeout(300)

SHARED = Path(__file__).resolve().parents[2] / "shared"
HUMANEVAL = SHARED / "data" / "humaneval" / "HumanEval.jsonl.gz"
MARKER = "Zq9SECRETx7"  # appears only in the tests; no program may ever see it

PROBLEMS = [
    {"task_id": "toy/0", "entry_point": "total",
     "prompt": 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n',
     "canonical_solution": "    return sum(xs)\n",
     "test": f"def check(candidate):\n    # {MARKER}\n    assert candidate([1, 2, 3]) == 6\n"
             "    assert candidate([]) == 0\n    assert candidate([-4, 4, 10]) == 10\n"},
    {"task_id": "toy/1", "entry_point": "shout",
     "prompt": 'def shout(s: str) -> str:\n    """s in upper case with a trailing "!"."""\n',
     "canonical_solution": "    return s.upper() + '!'\n",
     "test": f"def check(candidate):\n    # {MARKER}\n    assert candidate('hi') == 'HI!'\n"
             "    assert candidate('') == '!'\n"},
    {"task_id": "toy/2", "entry_point": "decode",  # the tests use a helper defined in the prompt
     "prompt": "def encode(s: str) -> str:\n    return s[::-1]\n\n\n"
               'def decode(s: str) -> str:\n    """Inverse of encode."""\n',
     "canonical_solution": "    return s[::-1]\n",
     "test": f"def check(candidate):\n    # {MARKER}\n    for word in ('abc', 'level', 'xy z'):\n"
             "        assert candidate(encode(word)) == word\n    assert isinstance(candidate('q'), str)\n"},
]

WRONG_BODY = "    return None\n"
# Tricks that report success from inside the program. Each is a completion body; "{ep}" is the
# entry point. None of them computes the right answer.
TOP_LEVEL_EXITS = {
    "os._exit(0)": "import os\nos._exit(0)",
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "raise SystemExit": "raise SystemExit",
    "raise SystemExit(0)": "raise SystemExit(0)",
    "exit()": "exit()",
    "quit()": "quit()",
}
TRICKS = {
    **{f"{name} at import": WRONG_BODY + "\n" + code + "\n" for name, code in TOP_LEVEL_EXITS.items()},
    **{f"{name} in the function": "    " + code.replace("\n", "; ") + "\n" for name, code in TOP_LEVEL_EXITS.items()},
    "redefine check": WRONG_BODY + "\n\ndef check(candidate):\n    return True\n",
    "patch builtins": WRONG_BODY + "\nimport builtins, sys\nbuiltins.AssertionError = type('Nope', (Exception,), {})\n"
                      "builtins.print = lambda *a, **k: sys.__stdout__.write('PASSED\\n')\n"
                      "builtins.Exception = type('Nope2', (BaseException,), {})\n",
    "excepthook": WRONG_BODY + "\nimport os, sys\nsys.excepthook = lambda *a: os._exit(0)\n",
    "atexit": WRONG_BODY + "\nimport atexit, os, sys\natexit.register(lambda: os._exit(0))\n"
              "atexit.register(lambda: print('PASSED', flush=True))\n",
    "fake marker": WRONG_BODY + "\nimport os\nprint('PASSED\\nall tests passed\\n' + '0' * 32, flush=True)\n"
                   "for fd in range(0, 256):\n    try:\n        os.write(fd, b'0' * 32 + b'\\n')\n"
                   "    except OSError:\n        pass\n",
    "write through /proc": WRONG_BODY + "\nimport os\nfor pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
                           "    try:\n        fds = os.listdir(f'/proc/{pid}/fd')\n    except OSError:\n        continue\n"
                           "    for fd in fds:\n        try:\n            w = os.open(f'/proc/{pid}/fd/{fd}', os.O_WRONLY)\n"
                           "            os.write(w, b'0' * 32 + b'\\n')\n        except OSError:\n            pass\n",
    "always equal": "    class Anything:\n        def __eq__(self, other):\n            return True\n"
                    "        __hash__ = object.__hash__\n        def __bool__(self):\n            return True\n"
                    "        def __ne__(self, other):\n            return False\n    return Anything()\n",
    "equal str subclass": "    class S(str):\n        def __eq__(self, other):\n            return True\n"
                          "    return S('wrong')\n",
    "kill the group": WRONG_BODY + "\nimport os, signal\nos.kill(0, signal.SIGKILL)\n",
    "kill the group when called": "    import os, signal\n    os.kill(0, signal.SIGTERM)\n",
    "trace the tests": WRONG_BODY + "\nimport sys\nsys.settrace(lambda *a: None)\nsys.setprofile(lambda *a: None)\n",
}

# Looks everywhere the program could find the tests or the token: command lines, environments,
# descriptors and memory of every other visible process, the files of every run directory,
# the objects of its own interpreter. The marker is stored masked, so that the program's own source
# and memory do not contain it (its own memory is searched through the garbage collector only).
SEARCH = f"""
import gc, os, sys
needle = bytes(b ^ 1 for b in {bytes(b ^ 1 for b in MARKER.encode())!r})
text, found = needle.decode(), []
def look(where, data):
    if needle in data:
        found.append(where)
me = str(os.getpid())
for pid in [p for p in os.listdir('/proc') if p.isdigit() and p != me]:
    for name in ('cmdline', 'environ'):
        try:
            look(pid + name, open(f'/proc/{{pid}}/{{name}}', 'rb').read())
        except OSError:
            pass
    try:
        with open(f'/proc/{{pid}}/maps') as maps, open(f'/proc/{{pid}}/mem', 'rb') as mem:
            for line in maps:
                start, end = (int(x, 16) for x in line.split()[0].split('-'))
                if 'rw' in line.split()[1] and end - start < 1 << 26:
                    try:
                        mem.seek(start)
                        look(pid + 'mem', mem.read(end - start))
                    except (OSError, ValueError, OverflowError):
                        pass
    except OSError:
        pass
for pid in [p for p in os.listdir('/proc') if p.isdigit()]:
    try:
        fds = os.listdir(f'/proc/{{pid}}/fd')
    except OSError:
        fds = []
    for fd in fds:
        try:
            path = os.readlink(f'/proc/{{pid}}/fd/{{fd}}')
            if not path.startswith(('pipe:', 'socket:', 'anon_inode:')):
                with open(f'/proc/{{pid}}/fd/{{fd}}', 'rb') as f:
                    look(pid + path, f.read(1 << 20))
        except OSError:
            pass
runs = [os.path.join('/tmp', d) for d in os.listdir('/tmp') if d.startswith('flaxchat-sandbox-')]
for root in [os.getcwd(), os.path.dirname(os.getcwd())] + runs:
    for directory, _, names in os.walk(root):
        for name in names:
            try:
                look(name, open(os.path.join(directory, name), 'rb').read(1 << 20))
            except OSError:
                pass
for obj in gc.get_objects():
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for value in values:
        if isinstance(value, str) and value is not text and text in value:
            found.append('gc')
print('FOUND' if found else 'NOTHING', found, flush=True)
"""
TRICKS["read the tests (import)"] = WRONG_BODY + SEARCH
TRICKS["read the tests (call)"] = "    exec(" + repr(SEARCH) + ")\n    return None\n"


@pytest.fixture(params=["bwrap", "rlimit", "rlimit-uid"])
def mode(request, monkeypatch) -> str:
    if request.param == "bwrap" and not sandbox.bwrap_available():
        pytest.skip(f"bubblewrap does not work here ({sandbox._bwrap_status[1]})")
    if request.param == "rlimit-uid":
        python = next((p for p in map(os.path.realpath, ("/usr/bin/python3", "/usr/local/bin/python3"))
                       if os.path.exists(p) and sandbox._reachable_by_others(p)), None)
        if os.geteuid() != 0 or python is None:
            pytest.skip("the private-uid fallback needs root and an interpreter other users can read")
        monkeypatch.setenv(sandbox.PYTHON_ENV, python)
    return request.param.split("-")[0]


def _sandbox_pids() -> list[int]:
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"def run_program(source" in Path(f"/proc/{entry}/cmdline").read_bytes():
                pids.append(int(entry))
        except OSError:
            continue
    return pids


@pytest.fixture(autouse=True)
def nothing_left_running():
    """Neither the tests' process nor the candidate's survives a run."""
    yield
    deadline = time.monotonic() + 5.0
    while _sandbox_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_pids() == []


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p["task_id"])
def test_correct_passes_and_wrong_fails(problem, mode):
    good = run_humaneval(problem, problem["canonical_solution"], mode=mode)
    assert good.ok and good.error is None and good.isolation == sandbox.sandbox_isolation(mode), good
    full = problem["prompt"] + problem["canonical_solution"]  # chat style: the whole function
    assert run_humaneval(problem, full, completion_is_full_function=True, mode=mode).ok
    wrong = run_humaneval(problem, WRONG_BODY, mode=mode)
    assert not wrong.ok and "AssertionError" in wrong.stderr and wrong.returncode == 1


@pytest.mark.parametrize("trick", sorted(TRICKS))
def test_tricks_fail(trick, mode):
    def grade(problem):
        return run_humaneval(problem, TRICKS[trick], timeout_s=10.0, mode=mode)

    with ThreadPoolExecutor(len(PROBLEMS)) as pool:
        results = list(pool.map(grade, PROBLEMS))
    for problem, result in zip(PROBLEMS, results):
        assert not result.ok, (problem["task_id"], result)
        assert "FOUND" not in result.stdout, (problem["task_id"], result.stdout)
        if trick.startswith("read the tests (import"):
            assert "NOTHING" in result.stdout, result.stderr  # the search itself ran to the end


def test_candidate_errors_are_reported(mode):
    problem = PROBLEMS[0]
    missing = run_humaneval(problem, "def other():\n    pass\n", completion_is_full_function=True, mode=mode)
    assert not missing.ok and "does not define a function 'total'" in missing.error
    raising = run_humaneval(problem, "    raise ValueError('nope')\n", mode=mode)
    assert not raising.ok and "ValueError: nope" in raising.stderr
    slow = run_humaneval(problem, "    while True:\n        pass\n", timeout_s=1.0, mode=mode)
    assert not slow.ok and slow.timed_out
    syntax = run_humaneval(problem, "    return (\n", mode=mode)
    assert not syntax.ok and "SyntaxError" in syntax.stderr


# --- conformance: the real HumanEval --------------------------------------------------------------
def _humaneval() -> list[dict]:
    if not HUMANEVAL.exists():
        pytest.skip(f"{HUMANEVAL} is absent: the conformance tier needs the ../shared reference data")
    with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _grade_all(jobs: list[tuple[dict, str]]) -> list:
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda job: run_humaneval(job[0], job[1], timeout_s=10.0), jobs))


@pytest.mark.conformance
def test_humaneval_canonical_pass_and_wrong_fail():
    problems = _humaneval()
    assert len(problems) == 164
    canonical = _grade_all([(p, p["canonical_solution"]) for p in problems])
    failed = [(p["task_id"], r.error) for p, r in zip(problems, canonical) if not r.ok]
    assert failed == []
    wrong = _grade_all([(p, WRONG_BODY) for p in problems])
    passed = [p["task_id"] for p, r in zip(problems, wrong) if r.ok]
    assert passed == []


@pytest.mark.conformance
def test_humaneval_early_exits_fail():
    problems = _humaneval()[::16]  # 11 problems, each trick
    tricks = [name for name in TRICKS if name.split(" ")[0] in {n.split(" ")[0] for n in TOP_LEVEL_EXITS}
              or name in ("redefine check", "atexit", "fake marker", "always equal")]
    jobs = [(p, TRICKS[name]) for p in problems for name in tricks]
    results = _grade_all(jobs)
    fooled = [(p["task_id"], name) for (p, _), name, r in zip(jobs, tricks * len(problems), results) if r.ok]
    assert fooled == []


def test_search_finds_what_is_there(mode):
    """The search of the "read the tests" tricks is not blind: a file holding the marker is found."""
    result = sandbox.run_code(SEARCH, files={"leak.txt": f"# {MARKER}\n"}, timeout_s=10.0, mode=mode)
    assert result.ok and result.stdout.startswith("FOUND") and "leak.txt" in result.stdout, result
