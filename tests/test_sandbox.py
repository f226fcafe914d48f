"""The code sandbox: normal programs work, and each attack fails while the parent stays unharmed.

Every test runs in each mode this machine supports: "bwrap" (namespaces), "rlimit" (the fallback,
forced per call) and "rlimit-uid" (the fallback as root with a world-readable interpreter, where the
program runs under a private uid). Attacks that only namespaces or a private uid can stop are
skipped, with the reason, in the modes that cannot stop them. Attacks that could kill the test
process if the sandbox failed run through a throwaway wrapper process in its own session.
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from flaxchat.sandbox import execute as sandbox
from flaxchat.sandbox.execute import (
    ExecutionResult,
    SandboxError,
    isolation_level,
    run_code,
)
from flaxchat.sandbox.humaneval import run_humaneval

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parents[1]
_RUNNER_MARK = b"def run_program(source"  # present in every sandbox process's command line


def _world_readable_python() -> str | None:
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        path = os.path.realpath(candidate)
        if os.path.exists(path) and sandbox._reachable_by_others(path):
            return path
    return None


@pytest.fixture(params=["bwrap", "rlimit", "rlimit-uid"])
def mode(request, monkeypatch) -> str:
    if request.param == "bwrap" and not sandbox.bwrap_available():
        pytest.skip(f"bubblewrap does not work here ({sandbox._bwrap_status[1]})")
    if request.param == "rlimit-uid":
        python = _world_readable_python()
        if os.geteuid() != 0 or python is None:
            pytest.skip("the private-uid fallback needs root and an interpreter other users can read")
        monkeypatch.setenv(sandbox.PYTHON_ENV, python)
    return request.param.split("-")[0]


def _needs(mode: str, *levels: str) -> None:
    level = isolation_level(mode)
    if level not in levels:
        pytest.skip(f"isolation {level!r} of {mode} mode cannot stop this (needs {' or '.join(levels)})")


def _sandbox_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if _RUNNER_MARK in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


@pytest.fixture(autouse=True)
def parent_unharmed():
    """After every test: same cwd and environment, and no sandbox process left behind."""
    cwd, environ = os.getcwd(), dict(os.environ)
    yield
    assert os.getcwd() == cwd
    deadline = time.monotonic() + 5.0  # a killed pid namespace is torn down asynchronously
    while _sandbox_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_pids() == []
    for key in (set(environ) | set(os.environ)) - {"PYTEST_CURRENT_TEST"}:  # monkeypatch has undone its own
        assert os.environ.get(key) == environ.get(key), key


_WRAPPER = r"""
import dataclasses, json, os, resource, sys
sys.path.insert(0, sys.argv[1])
from flaxchat.sandbox import run_code
limits = lambda: [resource.getrlimit(r) for r in (resource.RLIMIT_NOFILE, resource.RLIMIT_AS, resource.RLIMIT_NPROC)]
before = limits()
result = run_code(sys.argv[3], timeout_s=10, memory_mb=256, mode=sys.argv[2])
print(json.dumps({"result": dataclasses.asdict(result), "limits_intact": limits() == before}))
print("WRAPPER-ALIVE")
"""


def _wrapper_env(tmp_path: Path) -> dict:
    return {**os.environ, "TMPDIR": str(tmp_path)}  # a killed wrapper leaves its run directory there


def _run_in_wrapper(code: str, mode: str, tmp_path: Path) -> dict:
    """run_code from a disposable process in its own session: if the sandbox failed, only it dies."""
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(REPO_ROOT), mode, code], capture_output=True,
                          check=False, text=True, timeout=90, start_new_session=True, env=_wrapper_env(tmp_path))
    assert proc.returncode == 0 and proc.stdout.endswith("WRAPPER-ALIVE\n"), (proc.returncode, proc.stderr[-2000:])
    report = json.loads(proc.stdout.splitlines()[0])
    assert report["limits_intact"]
    return report["result"]


# --- normal behaviour --------------------------------------------------------------------------
def test_prints_stdout(mode):
    result = run_code("print('hello', 6 * 7)\nimport sys; print('err', file=sys.stderr)", mode=mode)
    assert result == ExecutionResult(ok=True, stdout="hello 42\n", stderr="err\n", returncode=0, timed_out=False,
                                     memory_exceeded=False, truncated=False, error=None, sandbox=mode,
                                     isolation=sandbox.sandbox_isolation(mode))


def test_exception_gives_traceback(mode):
    result = run_code("def f():\n    raise ValueError('boom')\nf()", mode=mode)
    assert not result.ok and result.returncode == 1 and not result.timed_out
    assert "Traceback" in result.stderr and 'line 2, in f' in result.stderr
    assert result.error == "ValueError: boom"


def test_syntax_error_and_exit_status(mode):
    assert run_code("def (", mode=mode).error.startswith("SyntaxError")
    result = run_code("import sys; sys.exit(3)", mode=mode)
    assert (result.ok, result.returncode, result.error) == (False, 3, "exit status 3")


def test_threads_work_but_processes_do_not(mode):
    ok = run_code("import threading\nout = []\nt = threading.Thread(target=out.append, args=(7,))\n"
                  "t.start(); t.join(); print(out)", mode=mode)
    assert ok.stdout == "[7]\n"
    spawn = run_code("import subprocess\nsubprocess.run(['true'])", mode=mode)
    assert not spawn.ok and spawn.error.startswith(("BlockingIOError", "PermissionError")), spawn.error


def test_files_and_private_working_directory(mode):
    code = "import os\nprint(open('data/in.txt').read(), os.getcwd())\nopen('out.txt', 'w').write('x')"
    result = run_code(code, files={"data/in.txt": "42"}, mode=mode)
    assert result.ok, result.stderr
    value, cwd = result.stdout.split()
    assert value == "42" and cwd != os.getcwd()
    assert not os.path.exists(cwd)  # the working directory is deleted afterwards


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/evil", "a/../../b", ""])
def test_file_names_must_stay_inside(name):
    with pytest.raises(ValueError, match="relative path"):
        run_code("pass", files={name: "x"}, mode="rlimit")


def test_humaneval_program():
    problem = {"prompt": "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n",
               "test": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n",
               "entry_point": "total"}
    assert run_humaneval(problem, "    return sum(xs)\n", timeout_s=5).ok
    wrong = run_humaneval(problem, "    return 0\n", timeout_s=5)
    assert not wrong.ok and "AssertionError" in wrong.stderr
    full = "def total(xs: List[int]) -> int:\n    return sum(xs)\n"  # chat style: needs the prompt's imports
    assert run_humaneval(problem, full, timeout_s=5, completion_is_full_function=True).ok


def test_concurrent_runs_from_threads(mode):
    """GRPO rollouts call run_code from many threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: run_code(f"print({i} * {i})", mode=mode), range(8)))
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(8)]


# --- attacks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [
    "while True:\n    pass",
    "import time\ntime.sleep(60)",
    "import os\nos.close(1); os.close(2)\nwhile True:\n    pass",  # end of file on the pipes, still running
    "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass",
])
def test_infinite_loop_is_killed(mode, code):
    result = run_code("print('started', flush=True)\n" + code, timeout_s=1.0, mode=mode)
    assert result.timed_out and not result.ok and "timed out" in result.error
    assert result.stdout == "started\n"
    # parent_unharmed then checks that no sandbox process survived


def test_program_dies_with_its_parent(mode, tmp_path):
    """A parent killed mid-run (an OOM-killed trainer, say) must not leave the program running."""
    wrapper = subprocess.Popen([sys.executable, "-c", _WRAPPER, str(REPO_ROOT), mode, "import time\ntime.sleep(60)"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               env=_wrapper_env(tmp_path))
    try:
        deadline = time.monotonic() + 30
        while not _sandbox_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _sandbox_pids(), "the sandboxed program never started"
        time.sleep(0.3)  # let the runner get past its lock-down
    finally:
        wrapper.kill()
        wrapper.wait()
    # parent_unharmed asserts that the sandbox processes are gone


def test_fork_bomb_is_bounded(mode):
    code = """
import ctypes, os, subprocess, time
started, errors = 0, set()
libc = ctypes.CDLL(None)
for attempt in range(10_000):
    try:
        if attempt % 3 == 2:
            subprocess.Popen(['sleep', '30']); started += 1; continue
        pid = os.fork() if attempt % 3 == 0 else libc.fork()
        if pid < 0:
            raise OSError('libc fork failed')
    except OSError as error:
        errors.add(type(error).__name__)
        continue
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    started += 1
print(started, sorted(errors))
"""
    result = run_code(code, timeout_s=10.0, mode=mode)
    assert result.ok, result.stderr
    started = int(result.stdout.split()[0])
    assert started <= sandbox._EXTRA_PROCESSES, result.stdout


@pytest.mark.parametrize("code", [
    "x = bytearray(8 * 1024 ** 3)",
    "blocks = []\nwhile True:\n    blocks.append(bytearray(16 * 1024 * 1024))",
])
def test_memory_bomb(mode, code):
    result = run_code(code, memory_mb=128, timeout_s=10.0, mode=mode)
    assert result.memory_exceeded and not result.ok and not result.timed_out
    assert "MemoryError" in result.stderr and "128 MB" in result.error


def test_cannot_write_outside_workdir(mode, tmp_path):
    _needs(mode, "namespaces", "uid")
    victim, target = tmp_path / "victim.txt", tmp_path / "new.txt"
    victim.write_text("original")
    code = f"""
for path in ({str(victim)!r}, {str(target)!r}, {str(REPO_ROOT / 'sandbox-escape.txt')!r}):
    try:
        with open(path, 'w') as f:
            f.write('pwned')
        print('wrote', path)
    except OSError as error:
        print('blocked', type(error).__name__)
"""
    result = run_code(code, mode=mode)
    assert result.ok and "wrote" not in result.stdout and result.stdout.count("blocked") == 3
    assert victim.read_text() == "original" and not target.exists()
    assert not (REPO_ROOT / "sandbox-escape.txt").exists()


def test_cannot_delete_outside_workdir(mode, tmp_path):
    _needs(mode, "namespaces", "uid")
    victim = tmp_path / "keep" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("original")
    code = f"""
import os, shutil
for action in (lambda: os.remove({str(victim)!r}), lambda: shutil.rmtree({str(victim.parent)!r}),
               lambda: os.rename({str(victim)!r}, {str(victim)!r} + '.moved')):
    try:
        action()
        print('done')
    except OSError as error:
        print('blocked', type(error).__name__)
"""
    result = run_code(code, mode=mode)
    assert result.ok and "done" not in result.stdout
    assert victim.read_text() == "original"


def test_no_network(mode):
    _needs(mode, "namespaces")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')\nprint('connected')"
        result = run_code(code, mode=mode)
        assert not result.ok and "connected" not in result.stdout
        with pytest.raises(TimeoutError):
            server.accept()


def test_environment_secret_not_inherited(mode, monkeypatch):
    monkeypatch.setenv("FLAXCHAT_SECRET", "hunter2-secret")
    result = run_code("import os\nprint(dict(os.environ))", mode=mode)
    assert result.ok and "hunter2" not in result.stdout and "FLAXCHAT_SECRET" not in result.stdout
    assert os.environ["FLAXCHAT_SECRET"] == "hunter2-secret"


def test_environment_secret_unreadable_through_proc(mode, monkeypatch):
    _needs(mode, "namespaces", "uid")
    monkeypatch.setenv("FLAXCHAT_SECRET", "hunter2-secret")
    code = f"""
import os
for pid in {{os.getppid(), {os.getpid()}}} | {{int(p) for p in os.listdir('/proc') if p.isdigit()}}:
    try:
        print(open(f'/proc/{{pid}}/environ', 'rb').read())
    except OSError:
        pass
"""
    result = run_code(code, mode=mode)
    assert result.ok and "hunter2" not in result.stdout


def test_cannot_signal_other_processes(mode):
    """Signal 0 only checks permission, so this probe is harmless even if the sandbox failed."""
    code = f"""
import os
for target in (os.getppid(), -os.getpgid(os.getppid()), {os.getpid()}, -{os.getpgid(0)}, -1, 1):
    try:
        os.kill(target, 0)
        print('allowed', target)
    except OSError:
        pass
"""
    result = run_code(code, mode=mode)
    assert result.ok and "allowed" not in result.stdout, result.stdout


def test_killing_the_parent_fails(mode, tmp_path):
    code = """
import ctypes, os, signal
parent = os.getppid()
for attack in (lambda: os.kill(parent, signal.SIGKILL), lambda: os.killpg(os.getpgid(parent), signal.SIGKILL),
               lambda: ctypes.CDLL(None, use_errno=True).kill(parent, signal.SIGKILL)):
    try:
        print('returned', attack())
    except OSError as error:
        print('blocked', type(error).__name__)
"""
    result = _run_in_wrapper(code, mode, tmp_path)
    assert result["ok"] and result["stdout"].count("blocked") == 2
    assert "returned -1" in result["stdout"]  # the libc call fails too (its errno is not raised)


def test_ctypes_cannot_lift_limits_or_touch_the_parent(mode, tmp_path):
    code = """
import ctypes, os, resource
libc = ctypes.CDLL(None, use_errno=True)
unlimited = (ctypes.c_ulong * 2)(resource.RLIM_INFINITY, resource.RLIM_INFINITY)
print('setrlimit', libc.setrlimit(resource.RLIMIT_AS, unlimited))
try:
    resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (3, 3))
    print('prlimit parent succeeded')
except OSError as error:
    print('prlimit blocked', type(error).__name__)
data = bytearray(1024 ** 3)
print('allocated', len(data))
"""
    result = _run_in_wrapper(code, mode, tmp_path)
    assert "setrlimit -1" in result["stdout"] and "prlimit blocked" in result["stdout"]
    assert "allocated" not in result["stdout"] and result["memory_exceeded"]


def test_segfault_crashes_only_the_child(mode):
    result = run_code("import ctypes\nctypes.string_at(0)", mode=mode)
    assert not result.ok and result.returncode == -signal.SIGSEGV and result.error == "killed by signal SIGSEGV"


def test_huge_output_is_truncated_with_bounded_memory(mode):
    code = ("import sys\nchunk = 'x' * 65536\nfor _ in range(800):\n    sys.stdout.write(chunk)\n"
            "for _ in range(800):\n    sys.stderr.write(chunk)\nsys.stderr.write('END\\n')")
    tracemalloc.start()
    try:
        result = run_code(code, max_output_bytes=10_000, timeout_s=30.0, mode=mode)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.ok and result.truncated
    assert result.stdout == "x" * 10_000
    assert len(result.stderr) <= 10_000 and "bytes truncated" in result.stderr and result.stderr.endswith("xEND\n")
    assert peak < 4 * 1024 * 1024, peak  # 100 MB went through the pipes


def test_endless_output_times_out_truncated(mode):
    result = run_code("while True:\n    print('y' * 1000)", max_output_bytes=5_000, timeout_s=1.0, mode=mode)
    assert result.timed_out and result.truncated and result.stdout.startswith("y" * 1000) and len(result.stdout) == 5_000


# --- mode selection ----------------------------------------------------------------------------
def test_mode_from_environment(monkeypatch):
    monkeypatch.setenv(sandbox.MODE_ENV, "rlimit")
    assert sandbox.sandbox_mode() == "rlimit"
    assert run_code("print(1)").sandbox == "rlimit"
    monkeypatch.setenv(sandbox.MODE_ENV, "chroot")
    with pytest.raises(SandboxError, match="FLAXCHAT_SANDBOX"):
        sandbox.sandbox_mode()
    monkeypatch.delenv(sandbox.MODE_ENV)
    assert sandbox.sandbox_mode() == ("bwrap" if sandbox.bwrap_available() else "rlimit")


def test_fallback_warns_once(monkeypatch, caplog):
    monkeypatch.delenv(sandbox.MODE_ENV, raising=False)
    monkeypatch.setattr(sandbox, "_bwrap_status", (False, "pretend bwrap is missing"))
    monkeypatch.setattr(sandbox, "_warned_degraded", False)
    with caplog.at_level("WARNING", logger="flaxchat.sandbox"):
        assert sandbox.sandbox_mode() == "rlimit" and sandbox.sandbox_mode() == "rlimit"
    warnings = [r for r in caplog.records if "SANDBOX DEGRADED" in r.getMessage()]
    assert len(warnings) == 1 and "pretend bwrap is missing" in warnings[0].getMessage()
    monkeypatch.setenv(sandbox.MODE_ENV, "bwrap")
    with pytest.raises(SandboxError, match="bubblewrap does not work"):
        sandbox.sandbox_mode()
    with pytest.raises(SandboxError):
        run_code("print(1)", mode="bwrap")


def test_explicit_rlimit_warns_like_the_fallback(monkeypatch, caplog):
    """Choosing the weaker mode on purpose warns exactly as the automatic fallback does."""
    def warnings_for(setup) -> list[str]:
        monkeypatch.setattr(sandbox, "_warned_degraded", False)
        caplog.clear()
        with caplog.at_level("WARNING", logger="flaxchat.sandbox"):
            setup()
            setup()
        return [r.getMessage() for r in caplog.records if "SANDBOX DEGRADED" in r.getMessage()]

    def fallback():
        monkeypatch.delenv(sandbox.MODE_ENV, raising=False)
        monkeypatch.setattr(sandbox, "_bwrap_status", (False, "pretend bwrap is missing"))
        assert sandbox.sandbox_mode() == "rlimit"

    def from_environment():
        monkeypatch.setenv(sandbox.MODE_ENV, "rlimit")
        assert sandbox.sandbox_mode() == "rlimit"

    def per_call():
        monkeypatch.delenv(sandbox.MODE_ENV, raising=False)
        assert run_code("print(1)", mode="rlimit").ok

    def template(message: str) -> str:  # the text without the reason in parentheses
        return message[:message.index("(")] + message[message.index(")"):]

    messages = [warnings_for(setup) for setup in (fallback, from_environment, per_call)]
    assert all(len(m) == 1 for m in messages), messages  # once per process, not per call
    assert len({template(m[0]) for m in messages}) == 1, messages
    assert "FLAXCHAT_SANDBOX=rlimit" in messages[1][0] and "pretend bwrap is missing" in messages[0][0]
    for text in ("WITHOUT filesystem or network isolation", "outside its directory", "loopback sockets"):
        assert text in messages[1][0]


def test_isolation_is_recorded(mode, monkeypatch):
    expected = {"namespaces": "bwrap", "uid": "rlimit-uid", "none": "rlimit"}[isolation_level(mode)]
    result = run_code("print(1)", mode=mode)
    assert result.isolation == expected == sandbox.sandbox_isolation(mode)
    assert result.sandbox == mode and expected.startswith(mode)
    assert run_humaneval({"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n",
                          "entry_point": "f"}, "    return 1\n", mode=mode).isolation == expected
    monkeypatch.setenv(sandbox.MODE_ENV, "rlimit")
    assert sandbox.sandbox_isolation() == sandbox.sandbox_isolation("rlimit")


def test_result_is_a_plain_record():
    result = run_code("print('x')", mode="rlimit")
    assert set(dataclasses.asdict(result)) == {"ok", "stdout", "stderr", "returncode", "timed_out",
                                               "memory_exceeded", "truncated", "error", "sandbox", "isolation"}
    assert result.ok and result.stdout == "x\n"
