"""Run untrusted, model-written Python in a separate, locked-down process.

Used by tool use in the inference engine, GRPO rollouts and HumanEval. The parent process (often a
multi-threaded JAX process) is never forked for this: each run starts a fresh interpreter
(`python -I -S`, standard library only, no user site, no PYTHON* variables) through
`subprocess.Popen` without a `preexec_fn`, in a new session, with stdin closed and a scrubbed
environment, in a temporary working directory that is deleted afterwards. The child locks itself
down before running the program (see flaxchat/sandbox/runner.py: rlimits, privilege drop, seccomp).

Two modes, chosen once per process by `sandbox_mode()` (override with FLAXCHAT_SANDBOX=auto|bwrap|
rlimit, or per call with `run_code(..., mode=...)`):
- "bwrap": the child runs inside bubblewrap: new pid, network, ipc and uts namespaces (no network
  at all), only system directories and the interpreter visible and read-only, the working directory
  the only writable place, killed with its parent. As root, the program additionally runs under a
  fresh unprivileged uid per run, so RLIMIT_NPROC applies to it.
- "rlimit": the fallback where bubblewrap is missing or cannot create namespaces (many
  containers). Limits and seccomp still stop time, memory and fork bombs and signals to the parent;
  as root with an interpreter other users can read, the per-run uid also protects files. Otherwise
  the program can read and write whatever the parent's user can and open loopback sockets. A
  warning is logged once per process whenever this mode is used, chosen automatically as a fallback
  or explicitly (FLAXCHAT_SANDBOX=rlimit, run_code(mode="rlimit")).
Every ExecutionResult says what isolated it in `isolation`: "bwrap", "rlimit-uid" (rlimit with a
private uid) or "rlimit"; `sandbox_isolation()` says the same for the default mode, for reports.

Graded runs (`run_graded`, used by HumanEval): the verdict comes from outside the program.
A program that runs in the same process as its tests can forge any in-process signal of success:
exit with status 0 before the tests (os._exit, sys.exit, SystemExit), redefine `check`, patch
builtins (AssertionError, print), catch failures with atexit or sys.excepthook, read the tests from
its own source, return an object whose __eq__ is always True, or find a secret token through gc
and frames. So the program and the tests never share a process:
- The runner makes itself non-dumpable (no /proc/<pid>/mem, /fd or /environ for its own uid) and
  forks. The child, the *candidate* process, closes every grading descriptor, locks itself down and
  only then runs the program (prompt + completion; the tests are not in it). It then answers calls
  of the entry point over a pair of pipes, arguments and results encoded as plain data (None,
  bool, int, float, complex, str, bytes, and lists, tuples, sets, dicts of them).
- The parent, the *tester* process, locks itself down too, and only then reads the tests, the
  trusted setup (HumanEval: the prompt, for helpers such as `poly`) and a fresh per-run token
  (secrets.token_hex) from an anonymous memfd passed by the parent process, which the candidate
  closed before running anything. It runs the tests with a proxy for the entry point and writes the
  token to a verdict pipe, which only it holds, after `check(proxy)` returned normally.
- The parent process counts the run as passed only if the verdict pipe carried exactly the token,
  the tester exited with status 0 and nothing timed out.
What the candidate can still do: answer calls (that is the test), fail (exit, raise, hang, exhaust
memory, send malformed data, kill its own process group including the tester: all fail the run).
It never holds the token, the tests or a test object, cannot write to the verdict pipe, and cannot
signal, ptrace or read the memory of the tester (seccomp, non-dumpable). Remaining attack surface,
stated honestly: (1) kernel bugs; (2) in "rlimit" isolation (no namespaces, no private uid) the
program runs as the parent's user: it can rewrite files the tester imports later (the standard
library, if that user owns it) and, where Yama does not forbid it, read the parent's memory through
/proc, where the token lives - grading is tamper-proof only under "bwrap" or "rlimit-uid" isolation,
which the result reports; (3) without bwrap the host's files stay readable (with a private uid:
those readable by everyone), so a program could look its answers up in a copy of the benchmark on
disk: it still has to return them, but keep datasets unreadable to others or use bwrap; (4) a
semantic difference from running in-process: the tests do not see the candidate's mutations of its
arguments, and its results must be plain data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path, PurePosixPath

from flaxchat.sandbox import runner as sandbox_runner
from flaxchat.sandbox.grading import GradingChannel
from flaxchat.sandbox.capture import Capture, exited, pump

log = logging.getLogger(__name__)

MODE_ENV = "FLAXCHAT_SANDBOX"  # auto (default) | bwrap | rlimit
PYTHON_ENV = "FLAXCHAT_SANDBOX_PYTHON"  # interpreter for the child; default: this one's base
MODES = ("bwrap", "rlimit")

_RUNNER_SOURCE = Path(sandbox_runner.__file__).read_text(encoding="utf-8")
_FILE_BYTES = 16 * 1024 * 1024  # RLIMIT_FSIZE: largest file the program may write
_OPEN_FILES = 64
_EXTRA_PROCESSES = 16  # RLIMIT_NPROC headroom; threads count against it too
_UID_BASE, _UID_SPAN = 1_500_000_000, 100_000_000  # per-run uids, far from any real account
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SYSTEM_FILES = ("/etc/ld.so.cache",)
_DRAIN_GRACE_S = 1.0  # after a kill, how long to wait for the pipes to report end of file


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not: the program failed)."""


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
    ok: bool  # exited with status 0 within the time limit
    stdout: str  # at most max_output_bytes characters: the head of the output
    stderr: str  # at most max_output_bytes characters: head and tail, with a marker between
    returncode: int | None  # exit status; -N when killed by signal N (as subprocess reports it)
    timed_out: bool  # wall-clock or CPU time limit hit; the whole process group was killed
    memory_exceeded: bool  # the program died of MemoryError under the address-space limit
    truncated: bool  # stdout or stderr was longer than max_output_bytes
    error: str | None  # one line: the exception, the limit hit or the signal; None when ok
    sandbox: str  # the mode: "bwrap" | "rlimit"
    isolation: str  # what isolated this run: "bwrap" | "rlimit-uid" (private uid) | "rlimit"


# --- mode selection ----------------------------------------------------------------------------
_probe_lock = threading.RLock()
_bwrap_status: tuple[bool, str] | None = None
_warned_degraded = False


def bwrap_available() -> bool:
    """Whether bubblewrap works here; tried once with a trivial program, then cached."""
    global _bwrap_status
    with _probe_lock:
        if _bwrap_status is None:
            _bwrap_status = _probe_bwrap()
        return _bwrap_status[0]


def _probe_bwrap() -> tuple[bool, str]:
    if shutil.which("bwrap") is None:
        return False, "the `bwrap` executable is not installed (Debian: apt-get install bubblewrap)"
    try:
        result = _execute("print('sandbox-ok')", 20.0, 256, 4096, None, "bwrap")
    except OSError as error:
        return False, f"bwrap could not be started: {error}"
    if result.ok and result.stdout == "sandbox-ok\n":
        return True, ""
    return False, result.error or "bwrap probe printed nothing"


def sandbox_mode() -> str:
    """The mode run_code uses by default: FLAXCHAT_SANDBOX if set, else bwrap where it works."""
    requested = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if requested == "rlimit":
        _warn_degraded(f"{MODE_ENV}=rlimit chooses the weaker mode explicitly")
        return "rlimit"
    if requested not in ("auto", "bwrap"):
        raise SandboxError(f"{MODE_ENV}={requested!r} is not one of auto, bwrap, rlimit; unset it or pick one")
    if bwrap_available():
        return "bwrap"
    reason = _bwrap_status[1] if _bwrap_status else "unknown"
    if requested == "bwrap":
        raise SandboxError(f"{MODE_ENV}=bwrap but bubblewrap does not work here ({reason}); install it or unset {MODE_ENV}")
    _warn_degraded(f"bubblewrap unavailable: {reason}")
    return "rlimit"


def _warn_degraded(reason: str) -> None:
    """The one warning for rlimit mode, whether chosen as a fallback or explicitly."""
    global _warned_degraded
    with _probe_lock:
        if not _warned_degraded:
            _warned_degraded = True
            log.warning("!!! SANDBOX DEGRADED (%s). Model-written code will run with rlimits and seccomp "
                        "only, WITHOUT filesystem or network isolation: it can write files outside its "
                        "directory and open loopback sockets. Install bubblewrap (apt-get install "
                        "bubblewrap) where namespaces are allowed and leave FLAXCHAT_SANDBOX unset. !!!", reason)


def isolation_level(mode: str | None = None) -> str:
    """What separates the program from the parent's files and processes in `mode`.

    "namespaces" (bwrap): nothing of the host is visible or writable but the working directory.
    "uid" (rlimit, parent is root): a fresh unprivileged uid: files the parent's user owns are
    protected by permissions, but world-writable places and the network are reachable.
    "none" (rlimit otherwise): only the seccomp filter and nanochat's accident guard.
    """
    mode = mode or sandbox_mode()
    if mode == "bwrap":
        return "namespaces"
    return "uid" if _uses_private_uid(mode, _interpreter()) else "none"


def sandbox_isolation(mode: str | None = None) -> str:
    """What isolates runs in `mode` (default: sandbox_mode()), as ExecutionResult.isolation spells
    it: "bwrap", "rlimit-uid" or "rlimit". For eval reports: what graded the programs."""
    return {"namespaces": "bwrap", "uid": "rlimit-uid", "none": "rlimit"}[isolation_level(mode)]


# --- the interpreter and what bwrap must show of the host ---------------------------------------
def _interpreter() -> str:
    override = os.environ.get(PYTHON_ENV)
    if override:
        return os.path.realpath(override)
    # the base interpreter, not the venv's: -I -S never looks at site-packages anyway
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _prefix_of(interpreter: str) -> str:
    return os.path.dirname(os.path.dirname(interpreter))  # <prefix>/bin/pythonX.Y


def _reachable_by_others(interpreter: str) -> bool:
    """Can an unprivileged uid run this interpreter and import its standard library?"""
    lib = os.path.join(_prefix_of(interpreter), "lib")
    try:
        paths = [Path(interpreter), *Path(interpreter).parents, Path(lib), *Path(lib).parents]
        return all(os.stat(p).st_mode & stat.S_IXOTH for p in paths) and bool(os.stat(lib).st_mode & stat.S_IROTH)
    except OSError:
        return False


def _under(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _bwrap_argv(interpreter: str, base_dir: str, work_dir: str, as_root: bool) -> list[str]:
    argv = [shutil.which("bwrap") or "bwrap", "--die-with-parent", "--new-session"]
    if as_root:
        # No user namespace: it would map the program to uid 0, which RLIMIT_NPROC exempts. The
        # runner keeps only the two capabilities it needs to switch to the per-run uid.
        argv += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                 "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-all"]
    bound: list[str] = []
    for top in _SYSTEM_DIRS:
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
            bound.append(top)
    argv += [arg for f in _SYSTEM_FILES if os.path.isfile(f) for arg in ("--ro-bind", f, f)]
    made: set[str] = set()

    def bind(kind: str, path: str) -> None:
        for parent in reversed(Path(path).parents[:-1] if path != "/" else []):
            name = str(parent)
            if name not in made and not _under(name, bound):  # bwrap would mirror a 0700 /root
                argv.extend(["--perms", "0755", "--dir", name])
                made.add(name)
        argv.extend([kind, path, path])
        bound.append(path)

    roots = {os.path.realpath(_prefix_of(interpreter))}
    if interpreter == os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable):
        roots |= {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
    for root in sorted(roots):
        if not _under(root, bound):
            bind("--ro-bind", root)
    argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
    bind("--ro-bind", base_dir)
    bind("--bind", work_dir)
    return argv + ["--chdir", work_dir, "--remount-ro", "/", "--"]


# --- running -----------------------------------------------------------------------------------
def _kill_uid(uid: int) -> None:
    """Kill whatever still runs under this run's private uid (only reachable in rlimit mode)."""
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/status") as status:
                uid_line = next(line for line in status if line.startswith("Uid:"))
            if int(uid_line.split()[1]) == uid:
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, ValueError, StopIteration):
            continue


def _write_files(work_dir: str, files: dict[str, str] | None) -> None:
    for name, content in (files or {}).items():
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise ValueError(f"sandbox file name {name!r} must be a relative path inside the working directory")
        target = Path(work_dir, *relative.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")


def _chown_tree(path: str, uid: int) -> None:
    os.chown(path, uid, uid)
    for root, dirs, names in os.walk(path):
        for name in dirs + names:
            os.chown(os.path.join(root, name), uid, uid, follow_symlinks=False)


def _remove_tree(path: str) -> None:
    """Delete the run's directory even if the program chmod-ed parts of it to 000."""
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            child = os.path.join(root, name)
            if not os.path.islink(child):
                try:
                    os.chmod(child, 0o700)
                except OSError:
                    pass
    shutil.rmtree(path, ignore_errors=True)


_uid_drop_works: dict[str, bool] = {}


def _uses_private_uid(mode: str, interpreter: str) -> bool:
    """Root always switches to a private uid inside bwrap, and in rlimit mode when it can: when an
    unprivileged uid can run the interpreter (tried once per interpreter with a trivial program)."""
    if os.geteuid() != 0:
        return False
    if mode == "bwrap":
        return True
    with _probe_lock:
        if interpreter not in _uid_drop_works:
            works = _reachable_by_others(interpreter)
            if works:
                probe = _execute("print('sandbox-ok')", 20.0, 256, 4096, None, "rlimit", drop_uid=True)
                works = probe.ok and probe.stdout == "sandbox-ok\n"
            _uid_drop_works[interpreter] = works
        return _uid_drop_works[interpreter]


def _execute(code: str, timeout_s: float, memory_mb: int | None, max_output_bytes: int,
             files: dict[str, str] | None, mode: str, drop_uid: bool | None = None,
             grading: dict | None = None) -> ExecutionResult:
    interpreter = _interpreter()
    as_root = os.geteuid() == 0
    if drop_uid is None:
        drop_uid = _uses_private_uid(mode, interpreter)
    private_uid = _UID_BASE + secrets.randbelow(_UID_SPAN) if drop_uid else None
    base_dir = tempfile.mkdtemp(prefix="flaxchat-sandbox-")
    try:
        os.chmod(base_dir, 0o711)  # the private uid may traverse, not list
        program = os.path.join(base_dir, "program.py")
        Path(program).write_text(code, encoding="utf-8", errors="replace")
        os.chmod(program, 0o644)
        work_dir = os.path.join(base_dir, "work")
        os.mkdir(work_dir)
        os.chmod(work_dir, 0o711)  # capability-less root (bwrap's --chdir) must still enter it
        _write_files(work_dir, files)
        if private_uid is not None:
            _chown_tree(work_dir, private_uid)
        config = {"program": program, "cpu_seconds": math.ceil(timeout_s) + 1,
                  "memory_bytes": memory_mb * 1024 * 1024 if memory_mb else 0, "file_bytes": _FILE_BYTES,
                  "open_files": _OPEN_FILES, "extra_processes": _EXTRA_PROCESSES,
                  "drop_to_uid": private_uid, "accident_guard": mode == "rlimit" and private_uid is None,
                  "parent_pid": os.getpid() if mode == "rlimit" else None}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "HOME": work_dir, "TMPDIR": work_dir, "OMP_NUM_THREADS": "1"}
        isolation = "bwrap" if mode == "bwrap" else ("rlimit-uid" if private_uid is not None else "rlimit")
        channel = GradingChannel(grading) if grading is not None else None
        try:
            if channel is not None:
                config["grading"] = channel.config
            argv = [interpreter, "-I", "-S", "-c", _RUNNER_SOURCE, json.dumps(config)]
            if mode == "bwrap":
                argv = _bwrap_argv(interpreter, base_dir, work_dir, as_root) + argv
            return _supervise(argv, env, work_dir, timeout_s, memory_mb, max_output_bytes, mode, private_uid,
                              isolation, channel)
        finally:
            if channel is not None:
                channel.close()
    finally:
        _remove_tree(base_dir)


def _supervise(argv: list[str], env: dict[str, str], work_dir: str, timeout_s: float,
               memory_mb: int | None, max_output_bytes: int, mode: str, private_uid: int | None,
               isolation: str, channel: GradingChannel | None = None) -> ExecutionResult:
    stdout, stderr = Capture(max_output_bytes, keep_tail=False), Capture(max_output_bytes, keep_tail=True)
    deadline = time.monotonic() + timeout_s
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   cwd=work_dir, env=env, start_new_session=True, close_fds=True,
                                   pass_fds=channel.pass_fds if channel else ())
    finally:
        if channel is not None:
            channel.close_child_ends()  # the tester holds the only write end of the verdict pipe
    streams = {process.stdout: stdout, process.stderr: stderr}
    if channel is not None:
        streams[channel.reader] = channel.verdict
    try:
        finished = pump(streams, deadline)
        finished = finished and exited(process.pid, deadline)
        try:  # the leader is alive or a zombie, so this group id cannot have been reused
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()
        if private_uid is not None and mode == "rlimit":
            _kill_uid(private_uid)
        if not finished:
            pump(streams, time.monotonic() + _DRAIN_GRACE_S)
    finally:
        process.stdout.close()
        process.stderr.close()
        if process.returncode is None:
            process.kill()
            process.wait()
    result = _result(process.returncode, not finished, stdout, stderr, timeout_s, memory_mb, mode, isolation)
    if channel is not None and result.ok and not channel.passed():
        # status 0 without the token: impossible for the tester unless something forged its exit
        result = dataclasses.replace(result, ok=False, error="the tests did not report completion")
    return result


def _result(returncode: int, timed_out: bool, stdout: Capture, stderr: Capture, timeout_s: float,
            memory_mb: int | None, mode: str, isolation: str) -> ExecutionResult:
    # bwrap reports a program killed by signal N as exit status 128 + N
    signal_number = -returncode if returncode < 0 else (returncode - 128 if mode == "bwrap" and returncode > 128 else 0)
    if signal_number:
        returncode = -signal_number
    err_text = stderr.text()
    last_line = next((line.strip() for line in reversed(err_text.splitlines()) if line.strip()), "")
    cpu_limit = signal_number == signal.SIGXCPU
    memory_exceeded = not timed_out and (returncode == sandbox_runner.EXIT_MEMORY or
                                         (returncode != 0 and last_line.startswith("MemoryError")))
    if timed_out:
        error = f"timed out after {timeout_s:g} s (process group killed)"
    elif cpu_limit:
        error = f"CPU time limit exceeded (limit for a {timeout_s:g} s run)"
    elif memory_exceeded:
        error = f"memory limit of {memory_mb} MB exceeded"
    elif signal_number:
        name = signal.Signals(signal_number).name if signal_number in signal.valid_signals() else str(signal_number)
        error = f"killed by signal {name}"
    elif returncode != 0:
        error = last_line or f"exit status {returncode}"
    else:
        error = None
    return ExecutionResult(ok=returncode == 0 and not timed_out, stdout=stdout.text(), stderr=err_text,
                           returncode=returncode, timed_out=timed_out or cpu_limit, memory_exceeded=memory_exceeded,
                           truncated=stdout.truncated or stderr.truncated, error=error, sandbox=mode,
                           isolation=isolation)


def run_code(code: str, timeout_s: float = 5.0, memory_mb: int | None = 512, max_output_bytes: int = 64_000,
             files: dict[str, str] | None = None, *, mode: str | None = None,
             grading: dict | None = None) -> ExecutionResult:
    """Run `code` as __main__ in a fresh sandboxed interpreter and report what happened.

    files: extra files (relative path -> text) placed in the working directory beforehand.
    memory_mb: address-space limit (None: none). mode: "bwrap" | "rlimit" | None (sandbox_mode()).
    grading: internal, see run_graded. Raises SandboxError only when the sandbox cannot be set up;
    the program's own failures are reported in the result (ok=False, error=...).
    """
    if timeout_s <= 0 or max_output_bytes <= 0:
        raise ValueError(f"timeout_s ({timeout_s}) and max_output_bytes ({max_output_bytes}) must be positive")
    requested = mode
    mode = mode or sandbox_mode()
    if mode not in MODES:
        raise ValueError(f"sandbox mode {mode!r} is not one of {MODES}")
    if mode == "bwrap" and not bwrap_available():
        raise SandboxError(f"bwrap mode requested but bubblewrap does not work here ({_bwrap_status[1]})")
    if requested == "rlimit":  # sandbox_mode() warns for the fallback and for FLAXCHAT_SANDBOX=rlimit
        _warn_degraded("the caller chose rlimit mode explicitly")
    return _execute(code, timeout_s, memory_mb, max_output_bytes, files, mode, grading=grading)


def run_graded(program: str, *, test: str, entry_point: str, setup: str = "", timeout_s: float = 5.0,
               memory_mb: int | None = 512, max_output_bytes: int = 64_000, mode: str | None = None) -> ExecutionResult:
    """Grade `program` against `test`, which defines `check(candidate)`; ok means check() returned.

    The program (untrusted) and the tests (trusted, with the trusted `setup` run before them) run in
    two processes; the program's `entry_point` is called through plain-data pipes and the verdict
    is a per-run token only the tests' process can write (see the module docstring). stdout and
    stderr hold both processes' output; error names the failure (e.g. "AssertionError").
    """
    return run_code(program, timeout_s, memory_mb, max_output_bytes, mode=mode,
                    grading={"test": test, "setup": setup, "entry_point": entry_point})
