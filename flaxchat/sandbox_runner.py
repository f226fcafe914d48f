"""Child-side bootstrap of the code sandbox: lock the process down, then run the untrusted program.

The parent (flaxchat/sandbox.py) never imports this for execution: it passes this file's *source*
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
    install_seccomp_filter()
    if config["accident_guard"]:
        install_accident_guard()
    return run_program(source)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
