"""Child-side bootstrap of the code sandbox: lock the process down, then run the untrusted program.

The parent (flaxchat/sandbox/execute.py) never imports this for execution: it passes this file's *source*
to a fresh interpreter (`python -I -S -c <source> <config-json>`), optionally inside bubblewrap.
Running the lock-down here, in the child, instead of in a `preexec_fn` keeps the parent safe: a
`preexec_fn` runs Python between fork() and exec() of a multi-threaded (JAX) process and can
deadlock. This file therefore uses the standard library only, and nothing from flaxchat.

Order of the lock-down (each step needs the privileges the next one removes):
1. resource limits (CPU seconds, address space, processes, file size, open files, no core dumps);
2. privileges: as root, either switch to the per-run unprivileged uid chosen by the parent, or,
   when that uid could not reach the interpreter, stay uid 0 but drop every capability, so that
   the limits of step 1 cannot be raised again;
3. death with the parent; no_new_privs, then a seccomp filter that refuses new processes (threads stay allowed), signals
   to any other process, ptrace and prlimit on other processes. This is what bounds a fork bomb
   for root, whom the kernel exempts from RLIMIT_NPROC, and what keeps the parent alive even
   without namespaces;
4. optionally (rlimit mode without any isolation) nanochat's accident guard that disables the
   destructive os/shutil functions: a speed bump against buggy code, not a security boundary.

Graded runs (config "grading", see flaxchat/sandbox/execute.py's docstring for the design): after steps 1-2
the runner marks itself non-dumpable and forks. The child, the *candidate* process, closes every
grading descriptor, locks itself down (step 3-4) and only then executes the untrusted program; it
then answers calls of the entry point over a pipe, values encoded as plain data (`encode`). The
parent, the *tester* process, locks itself down, and only then reads the tests and the run's token
from a descriptor the candidate has already closed; it runs the tests with a proxy for the entry
point and writes the token to the verdict descriptor only when `check(proxy)` returned normally.
"""

import builtins
import json
import os
import resource
import struct
import sys
import traceback

EXIT_MEMORY = 102  # exit status when the program dies of an uncaught MemoryError

# --- seccomp -----------------------------------------------------------------------------------
# struct seccomp_data: int nr at 0, u32 arch at 4, u64 ip at 8, u64 args[6] at 16 (little endian,
# so the low 32 bits of args[i] sit at 16 + 8 * i).
_OFF_NR, _OFF_ARCH, _OFF_ARG0_LOW = 0, 4, 16
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW, _RET_KILL_PROCESS, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_EPERM, _EAGAIN, _ENOSYS = 1, 11, 38
_CLONE_THREAD = 0x00010000
_X32_SYSCALL_BIT = 0x40000000

# Syscall numbers per architecture (the filter is skipped on any other architecture).
_ARCHES = {
    "x86_64": dict(audit=0xC000003E, clone=56, fork=57, vfork=58, clone3=435, kill=62, tkill=200,
                   tgkill=234, prlimit64=302, ptrace=101, process_vm_readv=310,
                   process_vm_writev=311, pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438),
    "aarch64": dict(audit=0xC00000B7, clone=220, fork=None, vfork=None, clone3=435, kill=129,
                    tkill=130, tgkill=131, prlimit64=261, ptrace=117, process_vm_readv=270,
                    process_vm_writev=271, pidfd_open=434, pidfd_send_signal=424,
                    pidfd_getfd=438),
}


def _assemble(program: list) -> bytes:
    """Encode (opcode, k, jump_true_label, jump_false_label) rows and 'label:' strings as BPF."""
    labels, rows = {}, []
    for item in program:
        if isinstance(item, str):
            labels[item.rstrip(":")] = len(rows)
        else:
            rows.append(item)
    def offset(label, index: int) -> int:  # BPF jumps are relative to the next instruction
        return 0 if label is None else labels[label] - index - 1

    return b"".join(struct.pack("=HBBI", code, offset(jt, i), offset(jf, i), k & 0xFFFFFFFF)
                    for i, (code, k, jt, jf) in enumerate(rows))


def _seccomp_program(nr: dict, own_pid: int) -> bytes:
    deny_eperm = ["ptrace", "process_vm_readv", "process_vm_writev", "pidfd_open",
                  "pidfd_send_signal", "pidfd_getfd", "tkill"]
    p: list = [(_LD_ABS, _OFF_ARCH, None, None), (_JEQ, nr["audit"], "arch_ok", "kill"), "arch_ok:",
               (_LD_ABS, _OFF_NR, None, None)]
    if nr["fork"] is not None:  # x86_64: refuse the x32 ABI, whose numbers bypass the table below
        p.append((_JGE, _X32_SYSCALL_BIT, "eperm", None))
        p += [(_JEQ, nr["fork"], "eagain", None), (_JEQ, nr["vfork"], "eagain", None)]
    p += [(_JEQ, nr["clone3"], "enosys", None),  # glibc falls back to clone(), which we can inspect
          (_JEQ, nr["clone"], "clone", None), (_JEQ, nr["kill"], "kill_target", None),
          (_JEQ, nr["tgkill"], "tgkill_target", None), (_JEQ, nr["prlimit64"], "prlimit_target", None)]
    p += [(_JEQ, nr[name], "eperm", None) for name in deny_eperm]
    p += [(_RET, _RET_ALLOW, None, None),
          "clone:", (_LD_ABS, _OFF_ARG0_LOW, None, None), (_JSET, _CLONE_THREAD, "allow", "eagain"),
          # kill(pid, sig): only ourselves, our own group (we are its only member) or pid 0
          "kill_target:", (_LD_ABS, _OFF_ARG0_LOW, None, None), (_JEQ, own_pid, "allow", None),
          (_JEQ, 0, "allow", None), (_JEQ, -own_pid, "allow", "eperm"),
          "tgkill_target:", (_LD_ABS, _OFF_ARG0_LOW, None, None), (_JEQ, own_pid, "allow", "eperm"),
          "prlimit_target:", (_LD_ABS, _OFF_ARG0_LOW, None, None), (_JEQ, 0, "allow", None),
          (_JEQ, own_pid, "allow", "eperm"),
          "allow:", (_RET, _RET_ALLOW, None, None),
          "eagain:", (_RET, _RET_ERRNO | _EAGAIN, None, None),
          "eperm:", (_RET, _RET_ERRNO | _EPERM, None, None),
          "enosys:", (_RET, _RET_ERRNO | _ENOSYS, None, None),
          "kill:", (_RET, _RET_KILL_PROCESS, None, None)]
    return _assemble(p)


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    libc.prctl.restype = ctypes.c_int
    return ctypes, libc


def install_seccomp_filter() -> bool:
    """Set no_new_privs and install the filter described above; False where unsupported."""
    nr = _ARCHES.get(os.uname().machine)
    try:
        ctypes, libc = _libc()
    except OSError:
        return False
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: also blocks setuid binaries
        return False
    if nr is None:
        return False
    code = _seccomp_program(nr, os.getpid())

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]  # noqa: RUF012 - ctypes API

    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = SockFprog(len(code) // 8, ctypes.addressof(buffer))
    return libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0) == 0  # PR_SET_SECCOMP, FILTER


# --- limits and privileges ---------------------------------------------------------------------
def _tasks_of_uid(uid: int) -> int:
    """Threads owned by `uid` that this process can see: RLIMIT_NPROC counts them too."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1 ").split()[0]) == uid:
            total += int(fields.get("Threads", "1").strip())
    return total


def set_limits(config: dict) -> None:
    cpu = config["cpu_seconds"]
    uid = config["drop_to_uid"]
    # A fresh per-run uid starts from zero tasks; otherwise leave room above what already runs.
    nproc = config["extra_processes"] + (0 if uid is not None else _tasks_of_uid(os.getuid()))
    limits = [(resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_NPROC, (nproc, nproc)),
              (resource.RLIMIT_FSIZE, (config["file_bytes"],) * 2),
              (resource.RLIMIT_NOFILE, (config["open_files"],) * 2), (resource.RLIMIT_CORE, (0, 0))]
    if config["memory_bytes"]:
        limits.append((resource.RLIMIT_AS, (config["memory_bytes"],) * 2))
    for which, (soft, hard) in limits:
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:  # only ever lower: raising would be refused
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(which, (soft, hard))


def drop_privileges(uid) -> None:
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # from uid 0 to non-zero: the kernel clears all capabilities
    elif os.geteuid() == 0:
        _drop_all_capabilities()


def _drop_all_capabilities() -> None:
    """Stay uid 0 (the interpreter may live under /root) but without a single capability."""
    ctypes, libc = _libc()
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP: exec can never grant it back
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (x2 words), all zero
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed while dropping root capabilities")


def die_with_parent(parent_pid) -> None:
    """SIGKILL this process when the thread that started it dies (bwrap does this itself).

    Set after the privilege drop, which clears it; the ppid check closes the race of a parent
    that died before the call.
    """
    try:
        _, libc = _libc()
        libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    except OSError:
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(137)


def install_accident_guard() -> None:
    """nanochat/HumanEval's guard: no deleting, renaming or chmod-ing files by mistake."""
    import shutil

    for name in ("remove", "removedirs", "rmdir", "unlink", "rename", "renames", "replace",
                 "truncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot",
                 "putenv", "system"):
        if hasattr(os, name):
            setattr(os, name, None)
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, None)


# --- graded runs: plain-data codec and framing -------------------------------------------------
class ProtocolError(Exception):
    """The candidate process sent something that is not a well-formed message."""


def encode(value, depth: int = 0):
    """A plain value as JSON-able data: only these types cross from the candidate to the tester, so
    the tester never holds an object of the program's classes (no `__eq__` that is always True)."""
    if depth > 100:
        raise TypeError("value nested more than 100 levels deep")
    if value is None or isinstance(value, bool):
        return None if value is None else bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return ["i", format(int.__index__(value), "x")]
    if isinstance(value, float):
        return ["f", float.hex(float(value))]
    if isinstance(value, complex):
        return ["c", float.hex(value.real), float.hex(value.imag)]
    if isinstance(value, (bytes, bytearray)):
        return ["b", bytes(value).hex()]
    tags = ((list, "l"), (tuple, "t"), (set, "S"), (frozenset, "F"))
    for kind, tag in tags:
        if isinstance(value, kind):
            return [tag, [encode(item, depth + 1) for item in list(value)]]
    if isinstance(value, dict):
        return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in list(value.items())]]
    raise TypeError(f"a value of type {type(value).__name__} cannot be passed between the program and the tests")


def decode(data):
    """The inverse of `encode`; ProtocolError for anything else (the tester decodes untrusted data)."""
    if data is None or type(data) is bool or type(data) is str:
        return data
    if type(data) is not list or not data or type(data[0]) is not str:
        raise ProtocolError(f"malformed value {str(data)[:80]!r}")
    tag, rest = data[0], data[1:]
    try:
        if tag == "i" and len(rest) == 1 and type(rest[0]) is str:
            return int(rest[0], 16)
        if tag == "f" and len(rest) == 1 and type(rest[0]) is str:
            return float.fromhex(rest[0])
        if tag == "c" and len(rest) == 2 and all(type(r) is str for r in rest):
            return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
        if tag == "b" and len(rest) == 1 and type(rest[0]) is str:
            return bytes.fromhex(rest[0])
        if len(rest) == 1 and type(rest[0]) is list:
            items = rest[0]
            if tag == "l":
                return [decode(item) for item in items]
            if tag == "t":
                return tuple(decode(item) for item in items)
            if tag == "S":
                return {decode(item) for item in items}
            if tag == "F":
                return frozenset(decode(item) for item in items)
            if tag == "d" and all(type(pair) is list and len(pair) == 2 for pair in items):
                return {decode(k): decode(v) for k, v in items}
    except (ValueError, TypeError, OverflowError, RecursionError) as error:
        raise ProtocolError(f"malformed value: {error}") from None
    raise ProtocolError(f"malformed value with tag {tag[:20]!r}")


def send(fd: int, message) -> None:
    data = json.dumps(message, ensure_ascii=True).encode()
    payload = len(data).to_bytes(4, "big") + data
    while payload:
        payload = payload[os.write(fd, payload):]


def receive(fd: int, limit: int):
    """One message, or None at end of file; ProtocolError when it is malformed or over `limit`."""
    header = _read_exactly(fd, 4)
    if header is None:
        return None
    size = int.from_bytes(header, "big")
    if size > limit:
        raise ProtocolError(f"message of {size} bytes exceeds the {limit}-byte limit")
    data = _read_exactly(fd, size)
    if data is None:
        raise ProtocolError("the candidate process closed the channel mid-message")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:
        raise ProtocolError(f"malformed message: {error}") from None


def _read_exactly(fd: int, size: int):
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            if remaining == size:
                return None
            raise ProtocolError("the candidate process closed the channel mid-message")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _describe(error: BaseException) -> str:
    try:
        text = str(error)
    except BaseException:  # noqa: BLE001 - the program's own __str__ may raise anything
        text = "<unprintable>"
    name = type(error).__name__ if isinstance(type(error).__name__, str) else "Exception"
    return f"{name}: {text}"[:2000] if text else name[:2000]


# --- graded runs: the two processes -------------------------------------------------------------
class CandidateError(Exception):
    """The program could not answer a call: it raised, exited, or sent something malformed."""


def serve_candidate(source: str, entry_point: str, requests: int, replies: int, limit: int) -> int:
    """The candidate process: run the untrusted program, then answer calls of its entry point."""
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(source, "<program>", "exec"), namespace)  # noqa: S102 - running it is the point
    except BaseException as error:  # noqa: BLE001 - exits included: an exit is not a pass
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)
        send(replies, ["failed", f"the program raised {_describe(error)} before the tests ran"])
        return 1
    candidate = namespace.get(entry_point)
    if not callable(candidate):
        send(replies, ["failed", f"the program does not define a function {entry_point!r}"])
        return 1
    send(replies, ["ready"])
    while True:
        request = receive(requests, limit)
        if request is None:
            return 0
        args, kwargs = decode(request[0]), decode(request[1])
        try:
            reply = ["value", encode(candidate(*args, **kwargs))]
        except Exception as error:  # noqa: BLE001 - reported to the tester as a raise
            traceback.print_exception(type(error), error, error.__traceback__.tb_next)
            reply = ["raised", type(error).__name__, _describe(error)]
        except BaseException as error:  # SystemExit, KeyboardInterrupt: no answer, then stop
            send(replies, ["failed", f"the program raised {_describe(error)} inside {entry_point}()"])
            return 1
        send(replies, reply)


def _candidate_proxy(entry_point: str, requests: int, replies: int, limit: int):
    """What the tests call instead of the program's function: plain data in, plain data out."""
    state = {"broken": None}

    def exchange():
        try:
            message = receive(replies, limit)
        except ProtocolError as error:
            raise CandidateError(str(error)) from None
        if message is None:
            raise CandidateError(f"the program exited before {entry_point}() returned")
        return message

    def candidate(*args, **kwargs):
        if state["broken"]:
            raise CandidateError(state["broken"])
        try:
            send(requests, [encode(list(args)), encode(dict(kwargs))])
        except BrokenPipeError:
            raise CandidateError(f"the program exited before {entry_point}() was called") from None
        message = exchange()
        if type(message) is list and len(message) == 2 and message[0] == "value":
            try:
                return decode(message[1])
            except ProtocolError as error:
                raise CandidateError(str(error)) from None
        if type(message) is list and len(message) == 3 and message[0] == "raised" and type(message[2]) is str:
            kind = getattr(builtins, str(message[1]), None)
            if isinstance(kind, type) and issubclass(kind, Exception) and kind is not AssertionError:
                try:
                    error = kind(message[2])
                except Exception:  # noqa: BLE001 - exception classes with other signatures
                    error = CandidateError(message[2])
            else:
                error = CandidateError(message[2])
            raise error
        state["broken"] = str(message[1])[:2000] if type(message) is list and len(message) == 2 else \
            f"malformed reply {str(message)[:80]!r}"
        raise CandidateError(state["broken"])

    candidate.__name__ = candidate.__qualname__ = entry_point
    return candidate


def run_tests(secret: dict, verdict_fd: int, requests: int, replies: int, limit: int) -> int:
    """The tester process: the trusted setup and tests, then the token only if check() returned."""
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    entry_point = secret["entry_point"]
    try:
        status = receive(replies, limit)
        if status is None:
            raise CandidateError("the program exited before the tests ran")
        if status != ["ready"]:
            raise CandidateError(str(status[1])[:2000] if type(status) is list and len(status) == 2
                                 else f"malformed status {str(status)[:80]!r}")
        import linecache  # a failing assert shows its line (the output goes to the parent only)

        for name in ("setup", "test"):
            lines = secret[name].splitlines(keepends=True)
            linecache.cache[f"<{name}>"] = (len(secret[name]), None, lines, f"<{name}>")
            exec(compile(secret[name], f"<{name}>", "exec"), namespace)  # noqa: S102 - trusted code
        proxy = _candidate_proxy(entry_point, requests, replies, limit)
        namespace[entry_point] = proxy  # helpers of the setup that call it by name get the proxy
        namespace["check"](proxy)
    except ProtocolError as error:
        print(f"CandidateError: {error}", file=sys.stderr)
        return 1
    except CandidateError as error:
        print(f"CandidateError: {error}", file=sys.stderr)
        return 1
    except BaseException as error:  # noqa: BLE001 - any failure of the tests is a failed grade
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)
        return 1
    os.write(verdict_fd, (secret["token"] + "\n").encode())
    return 0


def _read_secret(fd: int) -> dict:
    chunks, offset = [], 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    os.close(fd)
    return json.loads(b"".join(chunks))


def run_graded(source: str, config: dict) -> int:
    grading = config["grading"]
    secret_fd, verdict_fd, limit = grading["secret_fd"], grading["verdict_fd"], grading["max_message_bytes"]
    _, libc = _libc()
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0: no /proc/<pid>/mem, fd or environ for
        raise OSError("could not make the tester process non-dumpable")  # the candidate (inherited)
    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    tester_pid = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the candidate process: nothing of the tests is in its memory or descriptors
        code = 1
        try:
            for fd in (secret_fd, verdict_fd, request_w, reply_r):
                os.close(fd)
            die_with_parent(tester_pid)
            install_seccomp_filter()
            if config["accident_guard"]:
                install_accident_guard()
            code = serve_candidate(source, grading["entry_point"], request_r, reply_w, limit)
        except BaseException as error:  # noqa: BLE001
            try:
                traceback.print_exception(type(error), error, error.__traceback__)
            except BaseException:  # noqa: BLE001
                pass
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(request_r)
    os.close(reply_w)
    install_seccomp_filter()
    secret = _read_secret(secret_fd)  # only now: the candidate closed its copy before running anything
    code = run_tests(secret, verdict_fd, request_w, reply_r, limit)
    os.close(verdict_fd)
    os.close(request_w)  # the candidate sees end of file and stops; it also dies with this process
    return code


# --- run ---------------------------------------------------------------------------------------
def run_program(source: str) -> int:
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(source, "<program>", "exec"), namespace)  # noqa: S102 - running it is the point
    except SystemExit:
        raise
    except MemoryError as error:
        namespace.clear()  # free what the program still holds so the traceback can be printed
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)
        return EXIT_MEMORY
    except BaseException as error:  # noqa: BLE001 - report anything the program raised
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)
        return 1
    return 0


def main(argv: list) -> int:
    config = json.loads(argv[1])
    with open(config["program"], encoding="utf-8") as f:
        source = f.read()
    set_limits(config)
    drop_privileges(config["drop_to_uid"])
    die_with_parent(config["parent_pid"])
    if config.get("grading"):
        return run_graded(source, config)
    install_seccomp_filter()
    if config["accident_guard"]:
        install_accident_guard()
    return run_program(source)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
