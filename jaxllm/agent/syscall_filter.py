"""Seccomp filter of the sandbox's user process, built with libseccomp (through ctypes).

The sandbox child (``sandbox.py --child``) loads this file by path before it chroots, so like
``sandbox.py`` it uses only the standard library. libseccomp (Debian/Ubuntu ``libseccomp2``, the
library behind Docker's and systemd's filters) resolves syscall names for the running
architecture and emits the BPF program, including the architecture check that kills a process
using another syscall ABI (i386 ``int 0x80``, x32) to slip past the rules.

The filter is a deny list on top of the other layers (namespaces, no capabilities, rlimits):
every rule answers with an errno, so Python code sees an ordinary ``OSError`` instead of a
killed process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno

__all__ = ["Rule", "sandbox_rules", "load_libseccomp", "install"]

SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_ACT_ERRNO = 0x00050000
_SCMP_CMP_NE, _SCMP_CMP_EQ, _SCMP_CMP_MASKED_EQ = 1, 4, 7
_SCMP_FLTATR_CTL_NNP, _SCMP_FLTATR_CTL_TSYNC = 3, 4
_NR_SCMP_ERROR = -1  # seccomp_syscall_resolve_name: unknown name

#: syscalls no sandboxed code needs: debugging other processes, (un)mounting, kernel keyrings,
#: BPF and perf (kernel attack surface), new namespaces, modules, kexec, io_uring (its requests
#: bypass seccomp), file handles (the "shocker" container escape), clocks, swap, reboot
DENIED_SYSCALLS = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "mount_setattr",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "fanotify_init",
    "unshare",
    "setns",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "open_by_handle_at",
    "name_to_handle_at",
    "lookup_dcookie",
    "quotactl",
    "nfsservctl",
    "uselib",
    "acct",
    "syslog",
    "vhangup",
    "iopl",
    "ioperm",
    "swapon",
    "swapoff",
    "reboot",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "sethostname",
    "setdomainname",
)
#: clone flags that create namespaces (clone's first argument on x86-64, arm64, riscv)
NAMESPACE_CLONE_FLAGS = (
    0x00020000,
    0x02000000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
    0x00000080,
)  # NS UTS IPC USER PID NET CGROUP TIME
_AF_UNIX = 1
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C  # fake terminal input, console control


@dataclasses.dataclass(frozen=True)
class Rule:
    """Answer ``syscall`` with errno ``err`` when every comparison holds (none: always).

    ``compare`` holds ``(argument index, op, a, b)`` with op one of "ne", "eq", "masked_eq"
    (``arg & a == b``), as libseccomp's ``struct scmp_arg_cmp``.
    """

    syscall: str
    err: int
    compare: tuple = ()


def sandbox_rules(*, allow_unix_sockets: bool, own_pid: int | None) -> list[Rule]:
    """The deny rules of one sandbox run.

    allow_unix_sockets: let ``socket(AF_UNIX, ...)`` through (namespace modes: the chroot and the
      network namespace leave nothing to connect to); otherwise every ``socket`` call fails.
    own_pid: when given (process mode, where the host's processes are visible), signals may only
      go to this pid (the user process itself); in the namespace modes the PID namespace hides
      every other process anyway.
    """
    rules = [Rule(name, errno.EPERM) for name in DENIED_SYSCALLS]
    rules += [Rule("clone", errno.EPERM, ((0, "masked_eq", flag, flag),)) for flag in NAMESPACE_CLONE_FLAGS]
    # clone3 passes its flags in memory, out of the filter's sight; ENOSYS makes glibc fall back
    # to clone, whose flags are checked above
    rules.append(Rule("clone3", errno.ENOSYS))
    if allow_unix_sockets:
        rules.append(Rule("socket", errno.EAFNOSUPPORT, ((0, "ne", _AF_UNIX, 0),)))
    else:
        rules.append(Rule("socket", errno.EACCES))
    # the kernel reads ioctl's request as 32 bits: compare those only, whatever the upper half
    rules += [
        Rule("ioctl", errno.EPERM, ((1, "masked_eq", 0xFFFFFFFF, req),)) for req in (_TIOCSTI, _TIOCLINUX)
    ]
    if own_pid is not None:
        _check_pid(own_pid)
        rules += [
            Rule(name, errno.EPERM, ((0, "ne", own_pid, 0),))
            for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")
        ]
        rules += [Rule(name, errno.EPERM) for name in ("tkill", "pidfd_send_signal", "pidfd_open")]
    return rules


def _check_pid(pid) -> None:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ValueError(f"syscall_filter: own_pid must be a positive int, got {pid!r}")


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


_OPS = {"ne": _SCMP_CMP_NE, "eq": _SCMP_CMP_EQ, "masked_eq": _SCMP_CMP_MASKED_EQ}


def load_libseccomp():
    """libseccomp as a ctypes library with typed functions, or None where it is not installed."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    return lib


def _checked(rc: int, what: str) -> None:
    if rc < 0:  # libseccomp returns -errno
        raise OSError(-rc, f"seccomp: {what} failed: {errno.errorcode.get(-rc, -rc)}")


def install(lib, rules: list[Rule]) -> int:
    """Load ``rules`` into the kernel for this process (and its future children and threads).

    Also sets ``no_new_privs`` (a kernel requirement for unprivileged filters). Returns the
    number of rules loaded; syscalls this architecture or libseccomp version does not know are
    skipped (nothing can call them). Raises ``OSError`` if the filter cannot be loaded.
    """
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp: seccomp_init failed")
    try:
        _checked(lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_NNP, 1), "setting no_new_privs")
        _checked(lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_TSYNC, 1), "thread sync")
        loaded = 0
        for rule in rules:
            nr = lib.seccomp_syscall_resolve_name(rule.syscall.encode())
            if nr == _NR_SCMP_ERROR:
                continue
            cmps = (_ArgCmp * max(len(rule.compare), 1))(
                *[_ArgCmp(i, _OPS[op], a, b) for i, op, a, b in rule.compare]
            )
            _checked(
                lib.seccomp_rule_add_array(ctx, _SCMP_ACT_ERRNO | rule.err, nr, len(rule.compare), cmps),
                f"rule {rule}",
            )
            loaded += 1
        _checked(lib.seccomp_load(ctx), "loading the filter")
        return loaded
    finally:
        lib.seccomp_release(ctx)
