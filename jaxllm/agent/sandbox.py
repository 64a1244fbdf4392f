"""Run untrusted Python code (the ``PythonInterpreter`` tool) in a contained child process.

``run_python(code, timeout_s=..., memory_mb=...) -> SandboxResult(ok, output, error, ...)``

Layers of containment (see docs/agent.md, "Sandbox"), strongest first:

1. **OS isolation**, one of two modes; ``isolation="auto"`` picks the first available:

   - **namespace** (the host is root and ``unshare`` works): the child starts in fresh network,
     mount, PID, IPC and UTS namespaces. Its root is a new tmpfs holding only read-only bind
     mounts of the Python installation, the shared libraries and ``/dev/{null,zero,urandom}``,
     plus a size-limited tmpfs ``/sandbox`` as its working directory; everything else of the
     host filesystem does not exist for it (``chroot``). The user code runs as a throwaway
     unprivileged uid. The network namespace has only a downed loopback device. When the
     namespace's init (our supervisor) exits or is killed, the kernel kills every process in it.
   - **userns** (no root needed; the kernel allows unprivileged user namespaces): the same
     namespaces and read-only chroot, created inside a new user namespace where the caller's
     uid is mapped to root. The user code runs as that mapped uid with every capability
     dropped (bounding set, securebits locked), so it holds no more rights than the caller.

   Where neither is available, ``"auto"`` raises ``SandboxUnavailableError``: **process** mode
   (the code runs on the host filesystem and network, guarded by the layers below only) must be
   asked for explicitly with ``isolation="process"``.
2. **OS, always**: every capability dropped and ``no_new_privs``; a **seccomp** filter (built with
   libseccomp where it is installed; ``syscall_filter.py``) denying ptrace, mount, keyrings, BPF,
   perf, new namespaces, io_uring, socket families other than ``AF_UNIX`` (every socket in
   process mode) and, in process mode, signals to other processes; a **cgroup** (memory and
   pids) when the host's cgroup tree is writable; ``setrlimit`` on CPU seconds, address space
   (``RLIMIT_AS``), file size, open files, core dumps and the number of processes
   (``RLIMIT_NPROC``; the kernel applies it to non-root uids only). The host kills the child's
   process group at the wall-clock limit and when output exceeds its cap, and reads at most
   ``max_output_bytes`` per stream, so the host's memory is bounded whatever the child prints.
3. **Python audit hook** (``sys.addaudithook``, PEP 578), installed unless ``audit=False``:
   denies ``open`` outside the working directory (reads of the Python installation are allowed
   so imports work), directory listing outside it, sockets, subprocesses, ``os.system``/
   ``exec``/``fork``/``spawn``, ``ctypes``, ``gc`` introspection and constructing code objects;
   in process mode also directory file descriptors (and so ``dir_fd``) and ``marshal.loads``.
   This is defence in depth only: an audit hook is not a security boundary (PEP 578 says so).

Every result reports the isolation mode used and whether seccomp and a cgroup applied.

This file is also the child's entry point (``python -I sandbox.py --child SPEC``); so the child
never imports jax or jaxllm, the module (and ``syscall_filter.py``, which the child loads by
path) uses only the standard library.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time

# Host-only modules (selectors, shutil, subprocess, tempfile) are imported inside the host
# functions: the child runs this file as a script and must not have ``subprocess`` (and with it
# the unaudited ``_posixsubprocess.fork_exec``) loaded when the user code starts. Modules of the
# child's setup (ctypes, resource, _thread, ...) are imported where that setup uses them.


class SandboxUnavailableError(RuntimeError):
    """The requested (or, for "auto", any) OS isolation mode is not available on this host.

    Defined here, not in `jaxllm.errors`: this file is the sandbox child's entry point and imports
    the standard library only."""


__all__ = [
    "SandboxResult",
    "SandboxUnavailableError",
    "run_python",
    "namespaces_available",
    "user_namespaces_available",
    "available_isolations",
    "resolve_isolation",
    "format_observation",
]

_THIS_FILE = os.path.abspath(__file__)
_SYSCALL_FILTER_FILE = os.path.join(os.path.dirname(_THIS_FILE), "syscall_filter.py")
_UID_BASE = 200_000  # throwaway uids are drawn from [_UID_BASE, _UID_BASE + 1_000_000)
_ISOLATIONS = ("auto", "namespace", "userns", "process")
_NAMESPACE_FLAGS = ("--net", "--mount", "--pid", "--ipc", "--uts")
_USERNS_FLAGS = ("--user", "--map-root-user")
_REQUIREMENTS = {
    "namespace": "namespace mode needs root and a working `unshare` (util-linux)",
    "userns": "user-namespace mode needs `unshare` and a kernel that lets unprivileged users "
    "create user namespaces (user.max_user_namespaces > 0, and no container seccomp or "
    "AppArmor profile refusing them)",
}
NO_ISOLATION_MESSAGE = (
    "run_python: no OS isolation is available here, so isolation='auto' refuses to run the code ("
    + "; ".join(_REQUIREMENTS.values())
    + "). To run it anyway, pass isolation='process' "
    "explicitly: the code then runs on the host as the calling user, limited by rlimits, a "
    "seccomp filter and a Python audit hook. That mode does not protect the host's files, network "
    "or processes against deliberate escapes: the audit hook is not a security boundary, and "
    "code that gets past it can read and write whatever the calling user can, open network "
    "connections (without seccomp) and see every process on the host."
)


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one ``run_python`` call.

    ok: the code ran to completion with exit status 0 within every limit.
    output: captured stdout (at most ``max_output_bytes``, decoded as UTF-8 with replacement).
    error: ``None`` when ok; otherwise what went wrong: the limit that was hit, or the tail of
      stderr (e.g. a traceback), or both.
    stderr: captured stderr (capped like stdout).
    exit_code / signal: how the user process ended (``signal`` is 0 unless killed by one).
    timed_out, output_truncated: which host-side limit fired, if any.
    isolation: "namespace", "userns" or "process" (the OS isolation mode the code ran in).
    wall_s: wall-clock seconds the child ran.
    uid: the throwaway uid the code ran as (None: no uid switch, e.g. userns or process mode).
    seccomp: whether the seccomp filter was loaded for the user code.
    cgroup: whether memory and process limits were set through a cgroup (else rlimits only).
    """

    ok: bool
    output: str
    error: str | None
    stderr: str = ""
    exit_code: int | None = None
    signal: int = 0
    timed_out: bool = False
    output_truncated: bool = False
    isolation: str = "process"
    wall_s: float = 0.0
    uid: int | None = None
    seccomp: bool = False
    cgroup: bool = False


def format_observation(result: SandboxResult) -> str:
    """A result as PythonInterpreter observation text (``stdout:``/``stderr:``/``error:``)."""
    parts = []
    if result.output:
        parts.append("stdout:\n" + result.output)
    if result.stderr:
        parts.append("stderr:\n" + result.stderr)
    if not result.ok:
        parts.append("error: " + (result.error or "unknown failure"))
    if not parts:
        return "Finished execution."
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

_PROBE_CACHE: dict[str, bool] = {}


def _unshare_command(isolation: str) -> list[str]:
    """The ``unshare`` prefix that starts a child in the namespaces of ``isolation``."""
    import shutil  # noqa: PLC0415 (sandbox: what the child loads is deliberate, see header)

    flags = (*_USERNS_FLAGS, *_NAMESPACE_FLAGS) if isolation == "userns" else _NAMESPACE_FLAGS
    return [shutil.which("unshare") or "unshare", *flags, "--fork", "--kill-child"]


def _unshare_works(isolation: str) -> bool:
    """Whether ``unshare`` with the namespaces of ``isolation`` runs ``true`` (cached)."""
    import shutil  # noqa: PLC0415 (sandbox: what the child loads is deliberate, see header)
    import subprocess  # noqa: PLC0415 (sandbox: what the child loads is deliberate, see header)

    if isolation not in _PROBE_CACHE:
        ok = False
        if shutil.which("unshare"):
            try:
                ok = (
                    subprocess.run(
                        [*_unshare_command(isolation), "true"],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        timeout=10,
                    ).returncode
                    == 0
                )
            except (OSError, subprocess.TimeoutExpired):
                ok = False
        _PROBE_CACHE[isolation] = ok
    return _PROBE_CACHE[isolation]


def namespaces_available() -> bool:
    """True when namespace mode works: this process is root and can start children in new
    net/mount/pid/ipc/uts namespaces."""
    return hasattr(os, "geteuid") and os.geteuid() == 0 and _unshare_works("namespace")


def user_namespaces_available() -> bool:
    """True when userns mode works: this process can create a user namespace (no root needed)
    and, inside it, the other namespaces."""
    return hasattr(os, "geteuid") and _unshare_works("userns")


def available_isolations() -> tuple[str, ...]:
    """The OS isolation modes this host supports, strongest first ("process" is no OS isolation
    and is never listed)."""
    probes = (("namespace", namespaces_available), ("userns", user_namespaces_available))
    return tuple(mode for mode, works in probes if works())


def resolve_isolation(requested: str) -> str:
    """The mode a run uses for ``isolation=requested``; raises ``SandboxUnavailableError`` when
    it (for "auto": every OS isolation mode) is unavailable."""
    if requested not in _ISOLATIONS:
        raise ValueError(f"run_python: isolation must be one of {_ISOLATIONS}, got {requested!r}")
    if requested == "process":
        return "process"
    available = available_isolations()
    if requested == "auto":
        if not available:
            raise SandboxUnavailableError(NO_ISOLATION_MESSAGE)
        return available[0]
    if requested not in available:
        raise SandboxUnavailableError(
            f"run_python: isolation={requested!r} is not available here: {_REQUIREMENTS[requested]}"
        )
    return requested


def _check_positive(name: str, value, kind=(int, float)) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        raise ValueError(f"run_python: {name} must be a positive number, got {value!r}")


def _readonly_paths() -> list[str]:
    """Host paths bind-mounted read-only into the namespace sandbox (the Python runtime)."""
    cands = [
        sys.base_prefix,
        sys.prefix,
        sys.exec_prefix,
        "/usr/lib",
        "/usr/lib64",
        "/lib",
        "/lib64",
        "/usr/local/lib",
        "/etc/ld.so.cache",
    ]
    out: list[str] = []
    for p in cands:
        if not os.path.lexists(p):
            continue
        real = os.path.realpath(p)
        if os.path.exists(real) and real not in out:
            out.append(real)
    # Symlinks such as /lib -> usr/lib are recreated as links so the loader's paths resolve.
    return out


def _world_traversable(path: str) -> bool:
    """True if every directory from / to ``path`` is o+x and ``path`` itself is o+r."""
    import stat  # noqa: PLC0415 (sandbox: what the child loads is deliberate, see header)

    path = os.path.realpath(path)
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        try:
            mode = os.stat("/".join(parts[:i]) or "/").st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def _runtime_world_readable() -> bool:
    return all(_world_traversable(p) for p in {sys.base_prefix, sys.prefix, sys.exec_prefix})


def _symlinks() -> list[tuple[str, str]]:
    links = []
    for p in ("/lib", "/lib64", "/bin"):
        if os.path.islink(p):
            links.append((p, os.readlink(p)))
    return links


def _live_pids_of_uid(uid: int) -> list[int]:
    """PIDs (host view) of non-zombie processes whose real uid is ``uid``."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                fields = dict(ln.split(":", 1) for ln in f if ln.startswith(("State:", "Uid:")))
        except (OSError, ValueError):
            continue
        alive = fields.get("State", "X").split()[0] != "Z"
        if alive and int(fields.get("Uid", "-1").split()[0]) == uid:
            pids.append(int(d))
    return pids


def _kill_uid(uid: int, wait_s: float = 5.0) -> bool:
    """Kill every process owned by ``uid``; wait until none is left (zombies aside).

    A helper process started as ``uid`` calls kill(-1, SIGKILL), which reaches every process of
    that uid, including stragglers that left the process group and processes of a PID namespace
    still being torn down. The helper is spawned with ``subprocess`` (fork+exec in C), not
    ``os.fork``, because the host process may be multi-threaded (JAX). Returns True when none
    is left.
    """
    import subprocess  # noqa: PLC0415 (sandbox: what the child loads is deliberate, see header)

    if os.geteuid() != 0:
        return True
    killer = ["/bin/sh", "-c", "kill -9 -1"]  # the shell's builtin kill: kill(-1, SIGKILL)
    deadline = time.monotonic() + wait_s
    while _live_pids_of_uid(uid):
        if time.monotonic() > deadline:
            return False
        subprocess.run(
            killer,
            user=uid,
            group=uid,
            extra_groups=[],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            env={},
            cwd="/",
        )
        time.sleep(0.01)
    return True


_CGROUP_CONTROLLERS = ("memory", "pids")
_CGROUP_PREFIX = "jaxllm-sandbox-"
_CGROUP_SLACK_MB = 64  # the supervisor and the interpreter itself, on top of the user's memory


def _unescape_mountinfo(field: str) -> str:
    """Undo mountinfo's octal escapes (a space is written as ``\\040``)."""
    import re  # noqa: PLC0415 (sandbox: what the child loads is deliberate, see header)

    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _cgroup_mounts(mountinfo: str) -> list[tuple[str, str, str, frozenset]]:
    """(mount root, mount point, fstype, super options) of each cgroup and cgroup2 mount."""
    mounts = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if sep and len(fields) >= 5 and len(rest) >= 3 and rest[0] in ("cgroup", "cgroup2"):
            mounts.append(
                (
                    _unescape_mountinfo(fields[3]),
                    _unescape_mountinfo(fields[4]),
                    rest[0],
                    frozenset(rest[2].split(",")),
                )
            )
    return mounts


def cgroup_dirs(mountinfo: str, proc_cgroup: str) -> dict[str, str]:
    """Directories of this process's cgroup for the memory and pids controllers, given the text
    of /proc/self/mountinfo and /proc/self/cgroup: cgroup v1 when both controllers have a v1
    hierarchy, else the unified (v2) directory for both; {} when there is neither."""
    memberships = {}  # controller ("" for the unified hierarchy) -> cgroup path
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                memberships[controller] = parts[2]
    mounts = _cgroup_mounts(mountinfo)

    def directory(fstype: str, controller: str) -> str | None:
        path = memberships.get(controller)
        for root, point, fs, options in mounts:
            if path is None or fs != fstype or (fs == "cgroup" and controller not in options):
                continue
            rel = os.path.relpath(path, root)
            if rel != ".." and not rel.startswith("../"):  # else mounted from another subtree
                return os.path.normpath(os.path.join(point, rel))
        return None

    v1 = {c: directory("cgroup", c) for c in _CGROUP_CONTROLLERS}
    if all(v1.values()):
        return v1
    unified = directory("cgroup2", "")
    return {c: unified for c in _CGROUP_CONTROLLERS} if unified else {}


def _writable_cgroup_dirs() -> dict[str, str]:
    """``cgroup_dirs`` of this process where a child cgroup can be made with both controllers
    (the directory is writable; on v2 the parent already delegates memory and pids to its
    children: we never change the parent's own settings)."""
    try:
        with open("/proc/self/mountinfo") as f, open("/proc/self/cgroup") as g:
            dirs = cgroup_dirs(f.read(), g.read())
        for d in set(dirs.values()):
            if not os.access(d, os.W_OK):
                return {}
            if os.path.exists(os.path.join(d, "cgroup.controllers")):  # v2
                with open(os.path.join(d, "cgroup.subtree_control")) as f:
                    if not set(_CGROUP_CONTROLLERS) <= set(f.read().split()):
                        return {}
    except OSError:
        return {}
    return dirs


def _limit_files(memory_bytes: int, max_tasks: int) -> dict[str, tuple[str, int]]:
    """cgroup file -> (controller, value) for v1 and v2 alike; a directory has only its own."""
    return {
        "memory.limit_in_bytes": ("memory", memory_bytes),
        "memory.memsw.limit_in_bytes": ("memory", memory_bytes),  # swap included (v1)
        "memory.max": ("memory", memory_bytes),
        "memory.swap.max": ("memory", 0),
        "pids.max": ("pids", max_tasks),
    }


def _create_run_cgroup(memory_bytes: int, max_tasks: int) -> list[str]:
    """A fresh cgroup below this process's own, with memory and task limits; returns its
    directories (one per v1 hierarchy, or one v2 directory), or [] when the cgroup tree is not
    writable here or a limit could not be set."""
    parents = list(dict.fromkeys(_writable_cgroup_dirs().values()))
    name = _CGROUP_PREFIX + os.urandom(6).hex()
    created: list[str] = []
    limited: set[str] = set()
    try:
        for parent in parents:
            d = os.path.join(parent, name)
            os.mkdir(d)
            created.append(d)
            for fname, (controller, value) in _limit_files(memory_bytes, max_tasks).items():
                if os.path.exists(os.path.join(d, fname)):
                    with open(os.path.join(d, fname), "w") as f:
                        f.write(str(value))
                    limited.add(controller)
    except OSError:
        limited.clear()
    if created and limited == set(_CGROUP_CONTROLLERS):
        return created
    _remove_run_cgroup(created)
    return []


def _remove_run_cgroup(dirs: list[str], wait_s: float = 5.0) -> bool:
    """Kill every process left in the run's cgroup, then remove it; True when all are gone."""
    deadline = time.monotonic() + wait_s
    for d in dirs:
        while os.path.isdir(d):
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    pids = [int(p) for p in f.read().split()]
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                os.rmdir(d)
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.01)
    return True


def _nproc_limit(isolation: str, uid: int | None, max_processes: int) -> int | None:
    """``RLIMIT_NPROC`` of the user process. The kernel counts every process of the real uid
    (in userns mode: of the mapped uid in the run's own user namespace, the supervisor
    included), so a limit is only meaningful for a uid no one else uses."""
    if uid is not None:
        return max_processes
    if isolation == "userns":
        return max_processes + 1
    return None


def run_python(
    code: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    max_output_bytes: int = 64_000,
    max_processes: int = 8,
    disk_mb: int = 32,
    isolation: str = "auto",
    audit: bool = True,
) -> SandboxResult:
    """Run ``code`` in a contained child process and capture what it prints.

    Args:
      code: Python source; runs as ``__main__`` in the private working directory.
      timeout_s: wall-clock limit of the whole child (CPU time is limited to the same, rounded up).
      memory_mb: address-space limit (``RLIMIT_AS``) of each user process; with a cgroup, the
        whole run's memory is also limited (to ``memory_mb + disk_mb`` plus a small slack).
      max_output_bytes: cap per stream (stdout, stderr); more output kills the child.
      max_processes: process (and thread) limit of the user code (fork bombs hit it).
      disk_mb: size of the private working directory (tmpfs in the namespace modes) and the
        per-file size limit (``RLIMIT_FSIZE``) in every mode.
      isolation: "auto" (the strongest OS isolation available: "namespace", else "userns"; raises
        ``SandboxUnavailableError`` when there is none), "namespace", "userns" (raise when
        unavailable), or "process" (no OS isolation; must be asked for explicitly).
      audit: install the Python audit hook in the child (layer 3).

    Never raises for anything the code does; raises ``ValueError`` for bad arguments and
    ``SandboxUnavailableError`` (a ``RuntimeError``) when the isolation asked for is unavailable.
    """
    import shutil  # noqa: PLC0415 (sandbox: what the child loads is deliberate, see header)
    import subprocess  # noqa: PLC0415 (sandbox: what the child loads is deliberate, see header)
    import tempfile  # noqa: PLC0415 (sandbox: what the child loads is deliberate, see header)

    if not isinstance(code, str):
        raise ValueError(f"run_python: code must be a str, got {type(code).__name__}")
    _check_positive("timeout_s", timeout_s)
    for name, val in (
        ("memory_mb", memory_mb),
        ("max_output_bytes", max_output_bytes),
        ("max_processes", max_processes),
        ("disk_mb", disk_mb),
    ):
        _check_positive(name, val, int)
    if not isinstance(audit, bool):
        raise ValueError(f"run_python: audit must be a bool, got {audit!r}")
    isolation = resolve_isolation(isolation)

    # A throwaway uid needs root to switch to, and (in process mode, where the child sees the
    # host filesystem) a Python runtime that other users can read.
    root = os.geteuid() == 0
    can_drop = root and (isolation == "namespace" or (isolation == "process" and _runtime_world_readable()))
    uid = _UID_BASE + int.from_bytes(os.urandom(4), "little") % 1_000_000 if can_drop else None
    jobdir = tempfile.mkdtemp(prefix="jaxllm-sandbox-")
    cgroup: list[str] = []
    try:
        # traversable but not listable, so a throwaway uid (process mode) reaches its workdir
        os.chmod(jobdir, 0o711)
        workdir = os.path.join(jobdir, "work")
        os.mkdir(workdir, 0o700)
        if uid is not None:
            os.chown(workdir, uid, uid)
        status_path = os.path.join(jobdir, "status.json")
        cgroup = _create_run_cgroup(
            (memory_mb + disk_mb + _CGROUP_SLACK_MB) * 1024 * 1024, max_processes + 1
        )  # + 1: the supervisor
        spec = {
            "code": code,
            "isolation": isolation,
            "workdir": workdir,
            "newroot": os.path.join(jobdir, "root"),
            "status_path": status_path,
            "stop_pid_path": os.path.join(jobdir, "stop.pid"),
            "uid": uid,
            "cpu_s": int(timeout_s) + 1,
            "memory_bytes": memory_mb * 1024 * 1024,
            "fsize_bytes": disk_mb * 1024 * 1024,
            "disk_mb": disk_mb,
            "nproc": _nproc_limit(isolation, uid, max_processes),
            "cgroup_procs": [os.path.join(d, "cgroup.procs") for d in cgroup],
            "audit": audit,
            "readonly": _readonly_paths(),
            "symlinks": _symlinks(),
        }
        spec_path = os.path.join(jobdir, "spec.json")
        with open(os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump(spec, f)
        cmd = [sys.executable, "-I", _THIS_FILE, "--child", spec_path]
        if isolation != "process":
            cmd = [*_unshare_command(isolation), *cmd]
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            env=env,
            cwd=jobdir,
        )
        out, err, timed_out, truncated = _collect(
            proc, timeout_s, max_output_bytes, lambda: _stop(proc, spec["stop_pid_path"])
        )
        wall = time.monotonic() - t0
        if uid is not None:
            _kill_uid(uid)  # stragglers that left the process group (process mode)
        status = None
        try:
            with open(status_path) as f:
                status = json.load(f)
        except (OSError, ValueError):
            status = None
        result = _result(
            proc.returncode,
            status,
            out,
            err,
            timed_out,
            truncated,
            isolation,
            wall,
            timeout_s,
            max_output_bytes,
            memory_mb,
        )
        return dataclasses.replace(result, uid=uid, cgroup=bool(cgroup))
    finally:
        _remove_run_cgroup(cgroup)  # kills stragglers the uid kill cannot name (no own uid)
        shutil.rmtree(jobdir, ignore_errors=True)


def _stop(proc, stop_pid_path: str) -> None:
    """Kill a run at its timeout or output cap, so that the host's wait for its child covers
    the whole teardown. ``stop_pid_path`` holds the pid to kill (host view), written by the
    supervisor. Namespace modes: the namespace's init (the supervisor): the kernel kills every
    process in the namespace, and ``unshare``, still alive, reaps the init once they are all
    gone, then exits. (Killing ``unshare`` too would leave the init to the host's pid 1, a
    zombie where that does not reap.) Process mode: the user process, which the supervisor
    reaps and reports. Before that pid is written: the whole process group."""
    try:
        with open(stop_pid_path) as f:
            os.kill(int(f.read()), signal.SIGKILL)
    except (OSError, ValueError):
        _killpg(proc)


def _killpg(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(proc, timeout_s: float, cap: int, stop):
    """Read stdout/stderr up to ``cap`` bytes each until exit, timeout, or overflow; ``stop()``
    kills the run at the timeout or on overflow."""
    import selectors  # noqa: PLC0415 (sandbox: what the child loads is deliberate, see header)
    import subprocess  # noqa: PLC0415 (sandbox: what the child loads is deliberate, see header)

    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for f in bufs:
        os.set_blocking(f.fileno(), False)
        sel.register(f, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    timed_out = truncated = False
    open_streams = 2
    while open_streams:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            stop()
            break
        for key, _ in sel.select(timeout=min(left, 0.25)):
            f = key.fileobj
            try:
                chunk = os.read(f.fileno(), 65536)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(f)
                open_streams -= 1
                continue
            buf = bufs[f]
            room = cap - len(buf)
            buf += chunk[: max(room, 0)]
            if len(chunk) > room:
                truncated = True
        if truncated:
            stop()
            break
    sel.close()
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()) if not (timed_out or truncated) else 5.0)
    except subprocess.TimeoutExpired:
        timed_out = True
        stop()
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            _killpg(proc)
            proc.wait()
    _killpg(proc)  # stragglers still in the group
    for f in bufs:
        f.close()
    return (
        bytes(bufs[proc.stdout]).decode("utf-8", "replace"),
        bytes(bufs[proc.stderr]).decode("utf-8", "replace"),
        timed_out,
        truncated,
    )


_SIGNAL_REASONS = {
    signal.SIGXCPU: "CPU time limit exceeded",
    signal.SIGXFSZ: "file size limit exceeded",
    signal.SIGKILL: "killed (SIGKILL; memory or CPU hard limit)",
    signal.SIGSEGV: "segmentation fault",
}


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def _result(
    returncode, status, out, err, timed_out, truncated, isolation, wall, timeout_s, cap, memory_mb
) -> SandboxResult:
    exit_code = status.get("exit_code") if status else None
    sig = status.get("signal", 0) if status else 0
    setup_error = status.get("setup_error") if status else None
    reasons = []
    if setup_error:
        reasons.append(f"sandbox setup failed: {setup_error}")
    if timed_out:
        reasons.append(f"timed out after {timeout_s:g} s wall clock; the run was killed")
    if truncated:
        reasons.append(
            f"output limit exceeded (more than {cap} bytes on one stream); output "
            "truncated and the process killed"
        )
    if sig and not (sig == signal.SIGKILL and (timed_out or truncated)):  # not the host's kill
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        reasons.append(f"{_SIGNAL_REASONS.get(sig, 'killed by signal')} ({name})")
    if not (timed_out or truncated or sig or setup_error):
        if status is None:
            reasons.append(f"sandbox supervisor ended without a status (exit {returncode})")
        elif exit_code != 0:
            tail = _last_line(err)
            if "MemoryError" in tail:
                tail += f" (memory limit {memory_mb} MB)"
            reasons.append(f"exit status {exit_code}" + (f": {tail}" if tail else ""))
    ok = not reasons
    return SandboxResult(
        ok=ok,
        output=out,
        error=None if ok else "; ".join(reasons),
        stderr=err,
        exit_code=exit_code,
        signal=sig,
        timed_out=timed_out,
        output_truncated=truncated,
        isolation=isolation,
        wall_s=wall,
        seccomp=bool(status and status.get("seccomp")),
    )


# --------------------------------------------------------------------------------------------
# Child side (runs as ``python -I sandbox.py --child SPEC``; standard library only)
# --------------------------------------------------------------------------------------------

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = (
    1,
    2,
    4,
    32,
    4096,
    16384,
    1 << 18,
)
_MS_NOEXEC, _MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 8, 1024, 2048, 1 << 21
#: statvfs f_flag bit -> mount flag, for the flags a user namespace may not clear on a remount
_LOCKED_MOUNT_FLAGS = {
    2: _MS_NOSUID,
    4: _MS_NODEV,
    8: _MS_NOEXEC,
    1024: _MS_NOATIME,
    2048: _MS_NODIRATIME,
    4096: _MS_RELATIME,
}
_READONLY_REMOUNT = _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV


def kept_mount_flags(statvfs_flags: int) -> int:
    """Mount flags of an existing mount that a read-only remount must repeat: inside a user
    namespace the kernel refuses (EPERM) a remount that would clear nosuid, nodev, noexec or
    the atime mode of a mount made outside it."""
    return sum(ms for st, ms in _LOCKED_MOUNT_FLAGS.items() if statvfs_flags & st)


def _libc():
    import ctypes  # noqa: PLC0415 (sandbox: what the child loads is deliberate, see header)

    return ctypes.CDLL("libc.so.6", use_errno=True)


def _mount(libc, src, target, fstype, flags, data=None):
    import ctypes  # noqa: PLC0415 (sandbox: what the child loads is deliberate, see header)

    rc = libc.mount(
        src.encode() if src else None,
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount({src!r} -> {target!r}, {fstype!r}): {os.strerror(e)}")


def _build_root(spec) -> None:
    """Namespace mode: a tmpfs root with read-only binds of the runtime, then chroot into it."""
    libc = _libc()
    root = spec["newroot"]
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
    os.makedirs(root, exist_ok=True)
    _mount(libc, "tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=4m,mode=0755")
    for path in spec["readonly"]:
        target = root + path
        if os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "w").close()
        _mount(libc, path, target, None, _MS_BIND | _MS_REC)
        _mount(libc, None, target, None, _READONLY_REMOUNT | kept_mount_flags(os.statvfs(target).f_flag))
    for link, dest in spec["symlinks"]:
        if not os.path.lexists(root + link):
            os.symlink(dest, root + link)
    os.makedirs(root + "/dev", exist_ok=True)
    for dev in ("null", "zero", "urandom"):
        open(f"{root}/dev/{dev}", "w").close()
        _mount(libc, f"/dev/{dev}", f"{root}/dev/{dev}", None, _MS_BIND)
    os.makedirs(root + "/sandbox")
    _mount(
        libc,
        "tmpfs",
        root + "/sandbox",
        "tmpfs",
        _MS_NOSUID | _MS_NODEV,
        f"size={spec['disk_mb']}m,mode=0700",
    )
    if spec["uid"] is not None:
        os.chown(root + "/sandbox", spec["uid"], spec["uid"])
    os.makedirs(root + "/tmp", exist_ok=True)  # exists already when the runtime lives under /tmp
    os.chmod(root + "/tmp", 0o1777)  # read-only below: present for libraries that probe it
    os.chroot(root)
    os.chdir("/sandbox")
    _mount(libc, None, "/", None, _READONLY_REMOUNT)


def _set_limits(spec) -> None:
    import resource  # noqa: PLC0415 (sandbox: what the child loads is deliberate, see header)

    def lim(which, value):
        resource.setrlimit(which, (value, value))

    lim(resource.RLIMIT_CPU, spec["cpu_s"])
    lim(resource.RLIMIT_AS, spec["memory_bytes"])
    lim(resource.RLIMIT_FSIZE, spec["fsize_bytes"])
    lim(resource.RLIMIT_NOFILE, 64)
    lim(resource.RLIMIT_CORE, 0)
    if spec["nproc"] is not None:
        lim(resource.RLIMIT_NPROC, spec["nproc"])


_PR_CAPBSET_DROP, _PR_SET_SECUREBITS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 28, 47, 4
_PR_SET_NO_NEW_PRIVS = 38
#: SECBIT_NOROOT, NO_SETUID_FIXUP, NO_CAP_AMBIENT_RAISE, each with its lock, and KEEP_CAPS_LOCKED:
#: uid 0 (userns mode, or process mode as root) gains no capabilities by exec, ever again
_SECUREBITS_LOCKED_NOROOT = 0b11101111
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _capability_sets(libc) -> list[int]:
    """(effective, permitted, inheritable) of this process, 64 bits each, via capget."""
    import ctypes  # noqa: PLC0415 (sandbox: what the child loads is deliberate, see header)

    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    return [data[i] | data[i + 3] << 32 for i in range(3)]


def _drop_capabilities(libc) -> None:
    """Give up every capability for good (no exec regains one) and set ``no_new_privs``.

    After a uid switch the kernel has cleared the capability sets already; the bounding set and
    securebits need CAP_SETPCAP, which only uid 0 (userns mode, or process mode as root) still
    has here. Raises if any capability is left.
    """
    import ctypes  # noqa: PLC0415 (sandbox: what the child loads is deliberate, see header)

    if libc.prctl(_PR_SET_SECUREBITS, _SECUREBITS_LOCKED_NOROOT, 0, 0, 0) == 0:
        cap = 0
        while libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:  # EINVAL past the last one
            cap += 1
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL on old kernels
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:
        raise OSError(ctypes.get_errno(), "capset (dropping every capability) failed")
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if any(_capability_sets(libc)):
        raise RuntimeError(f"capabilities left after dropping them: {_capability_sets(libc)}")


def _drop_privileges(spec, libc) -> None:
    """Switch to the throwaway uid when there is one, then drop every capability."""
    uid = spec["uid"]
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _drop_capabilities(libc)


def _install_seccomp(seccomp_lib, isolation: str) -> None:
    """Load the sandbox's seccomp filter into this (the user) process; raises on failure, so
    the user code never runs without the filter the supervisor announced."""
    syscall_filter = _load_syscall_filter()
    own_pid = os.getpid() if isolation == "process" else None  # other pids hidden otherwise
    rules = syscall_filter.sandbox_rules(allow_unix_sockets=isolation != "process", own_pid=own_pid)
    syscall_filter.install(seccomp_lib, rules)


def _load_syscall_filter():
    """``syscall_filter.py`` beside this file, loaded by path (the child does not import jaxllm;
    cached in ``sys.modules`` so the supervisor can load it before it chroots)."""
    import importlib.util  # noqa: PLC0415 (sandbox: what the child loads is deliberate, see header)

    name = "_jaxllm_sandbox_syscall_filter"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _SYSCALL_FILTER_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


_DENY_PREFIXES = (
    "socket.",
    "subprocess.",
    "os.exec",
    "os.spawn",
    "os.posix_spawn",
    "os.fork",
    "os.forkpty",
    "os.system",
    "os.kill",
    "os.killpg",
    "os.setuid",
    "ctypes.",
    "gc.get_",
    "sys.addaudithook",
    "pty.",
    "os.chroot",
    "webbrowser.",
    "urllib.Request",
    "http.client.",
    "ftplib.",
    "smtplib.",
    "poplib.",
    "imaplib.",
    "nntplib.",
    "telnetlib.",
    "signal.pthread_kill",
    "resource.setrlimit",
    "resource.prlimit",
    "sys._current_frames",
    # hand-made bytecode (types.CodeType, code.replace) can corrupt the
    # interpreter's memory and so run native code past every check here
    "code.__new__",
)
#: denied too where the hook is the only guard (process mode): code objects from bytes; the
#: child makes the importer compile sources instead of reading .pyc files, which need this
_STRICT_DENY_PREFIXES = ("marshal.load",)
_PATH_EVENTS = {  # event -> indices of path arguments, whether they write, indices of dir_fds
    "os.remove": ((0,), True, (1,)),
    "os.rmdir": ((0,), True, (1,)),
    "os.mkdir": ((0,), True, (2,)),
    "os.rename": ((0, 1), True, (2, 3)),
    "os.link": ((0, 1), True, (2, 3)),
    "os.symlink": ((0, 1), True, (2,)),
    "os.chmod": ((0,), True, (2,)),
    "os.chown": ((0,), True, (3,)),
    "os.truncate": ((0,), True, ()),
    "os.utime": ((0,), True, (3,)),
    "os.chflags": ((0,), True, ()),
    "os.mkfifo": ((0,), True, (2,)),
    "os.mknod": ((0,), True, (3,)),
    "os.setxattr": ((0,), True, ()),
    "os.removexattr": ((0,), True, ()),
    "os.listdir": ((0,), False, ()),
    "os.scandir": ((0,), False, ()),
    "os.chdir": ((0,), False, ()),
    "os.getxattr": ((0,), False, ()),
    "os.listxattr": ((0,), False, ()),
    "shutil.rmtree": ((0,), True, ()),
    "shutil.copyfile": ((0, 1), True, ()),
    "shutil.move": ((0, 1), True, ()),
}
_NO_DIR_FD = -1  # how audit events report a dir_fd that was not given


#: modules whose import the audit hook refuses (process spawning without audit events, native
#: code); the child makes sure none of them is loaded before the user code starts
_DENY_IMPORTS = frozenset(
    {
        "_posixsubprocess",
        "subprocess",
        "multiprocessing",
        "_ctypes",
        "pty",
        "_xxsubinterpreters",
        "_testcapi",
        "_testinternalcapi",
    }
)


def _install_audit_hook(workdir: str, read_prefixes: list[str], strict: bool) -> None:
    """Layer 3: deny file access outside ``workdir`` and process/network/ctypes escapes.

    strict (process mode, where nothing else guards the filesystem): also deny file descriptors
    of directories and ``dir_fd`` arguments. A path relative to a ``dir_fd`` is resolved by the
    kernel against that directory, but the ``open`` event does not carry the ``dir_fd``, so the
    hook can only check such a path against the current directory; without directory fds a
    ``dir_fd`` can point nowhere. Also deny ``marshal.loads`` (code objects from bytes).

    Everything the hook uses is bound in its closure at install time (functions, builtins, the
    deny lists), so user code cannot switch it off by rebinding module globals or builtins. The
    re-entrancy guard is per thread, so one thread inside the hook does not let another through.
    """
    import _thread  # noqa: PLC0415 (sandbox: what the child loads is deliberate, see header)

    realpath, fspath, normcase, isdir = (os.path.realpath, os.fspath, os.path.normcase, os.path.isdir)
    get_ident, _isinstance, _any, _len, _str = _thread.get_ident, isinstance, any, len, str
    _bytes, _int, _denied = bytes, int, PermissionError
    deny_prefixes = tuple(_DENY_PREFIXES) + (tuple(_STRICT_DENY_PREFIXES) if strict else ())
    deny_imports = frozenset(_DENY_IMPORTS)
    path_events = {k: (tuple(v[0]), bool(v[1]), tuple(v[2])) for k, v in _PATH_EVENTS.items()}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    no_dir_fd = _NO_DIR_FD
    work = realpath(workdir)
    reads = tuple(realpath(p) for p in read_prefixes) + ("/dev/urandom", "/dev/zero")
    writes = (work, "/dev/null")
    busy: set = set()

    def within(path, roots):
        return _any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

    def resolve(p):
        if _isinstance(p, _int):
            return None  # already-open descriptor: its open was checked
        p = fspath(p)
        if _isinstance(p, _bytes):
            p = p.decode("utf-8", "surrogateescape")
        return normcase(realpath(p))

    def check(path, write, event):
        if path is None:
            return
        if within(path, writes) or (not write and within(path, reads)):
            return
        raise _denied(f"sandbox: {event} of {path!r} denied (outside the working directory)")

    def check_no_directory_fd(path, event):
        if strict and path is not None and isdir(path):
            raise _denied(
                f"sandbox: {event} of directory {path!r} denied (no directory file "
                "descriptors, so no dir_fd, in process mode)"
            )

    def hook(event, args):
        me = get_ident()
        if me in busy:
            return
        busy.add(me)
        try:
            if event.startswith(deny_prefixes):
                raise _denied(f"sandbox: {event} is not allowed")
            if event == "import" and args and _str(args[0]).split(".")[0] in deny_imports:
                raise _denied(f"sandbox: import of {args[0]} is not allowed")
            if event == "open":
                path, mode, flags = args
                write = _isinstance(flags, _int) and (flags & write_flags) != 0
                if _isinstance(mode, _str) and _any(c in mode for c in "wax+"):
                    write = True
                resolved = resolve(path) if path is not None else None
                check(resolved, write, "open")
                if mode is None:  # os.open; io.open refuses directories itself (EISDIR)
                    check_no_directory_fd(resolved, "open")
            elif event in path_events:
                idxs, write, dir_fd_idxs = path_events[event]
                for i in idxs:
                    if i < _len(args) and args[i] is not None and not _isinstance(args[i], _int):
                        check(resolve(args[i]), write, event)
                for i in dir_fd_idxs:
                    if strict and i < _len(args) and args[i] not in (None, no_dir_fd):
                        raise _denied(f"sandbox: {event} with dir_fd denied in process mode")
        finally:
            busy.discard(me)

    sys.addaudithook(hook)


_SIGNALS_THE_SUPERVISOR_IGNORES = (
    "SIGINT",
    "SIGTERM",
    "SIGHUP",
    "SIGQUIT",
    "SIGUSR1",
    "SIGUSR2",
    "SIGALRM",
    "SIGPIPE",
    "SIGTSTP",
    "SIGTTIN",
    "SIGTTOU",
)


def _ignore_signals() -> dict:
    """Ignore the catchable signals the user process could send its parent, the supervisor
    (userns mode: same uid); returns the previous handlers for the user process to restore.
    As the PID namespace's init it receives no SIGKILL or SIGSTOP from inside anyway."""
    previous = {}
    for name in _SIGNALS_THE_SUPERVISOR_IGNORES:
        sig = getattr(signal, name)
        previous[sig] = signal.signal(sig, signal.SIG_IGN)
    return previous


def _write_stop_pid(spec, pid: str) -> None:
    """Tell the host which pid to kill to stop the run (see ``_stop``)."""
    with open(spec["stop_pid_path"], "w") as f:
        f.write(pid)


def _join_cgroup(procs_files: list[str]) -> None:
    """Move this process (and so every process it starts) into the run's cgroup."""
    for path in procs_files:
        with open(path, "w") as f:
            f.write("0")  # "0": the writing process


def _child_main(spec_path: str) -> None:  # pragma: no cover - exercised through run_python
    with open(spec_path) as f:
        spec = json.load(f)
    status_fd = os.open(spec["status_path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def write_status(**kw):
        os.write(status_fd, json.dumps(kw).encode())
        os.close(status_fd)

    isolation = spec["isolation"]
    try:
        _join_cgroup(spec["cgroup_procs"])
        if isolation != "process":  # our pid as the host sees it (/proc is still the host's)
            _write_stop_pid(spec, os.readlink("/proc/self"))
        # everything the user process needs from the host filesystem, loaded before the chroot
        libc = _libc()
        _load_syscall_filter()
        seccomp_lib = sys.modules["_jaxllm_sandbox_syscall_filter"].load_libseccomp()
        if isolation == "process":
            workdir = spec["workdir"]
            os.chdir(workdir)
        else:
            _build_root(spec)
            workdir = "/sandbox"
        saved_handlers = _ignore_signals()
    except Exception as e:  # noqa: BLE001 - reported to the host, never to the user code
        write_status(setup_error=f"{type(e).__name__}: {e}")
        os._exit(70)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        os.close(status_fd)
        try:
            import traceback  # noqa: F401, PLC0415 - loaded before any uid switch, for error reports

            for sig, handler in saved_handlers.items():
                signal.signal(sig, handler)
            _set_limits(spec)
            _drop_privileges(spec, libc)
            if seccomp_lib is not None:
                _install_seccomp(seccomp_lib, isolation)
            os.environ.clear()
            os.environ.update(
                {
                    "HOME": workdir,
                    "TMPDIR": workdir,
                    "PATH": "/usr/bin:/bin",
                    "LANG": "C.UTF-8",
                    "OPENBLAS_NUM_THREADS": "1",
                    "OMP_NUM_THREADS": "1",
                }
            )
            if sys.path and os.path.dirname(_THIS_FILE) == os.path.abspath(sys.path[0] or "."):
                sys.path.pop(0)
            sys.dont_write_bytecode = True
            import ctypes  # noqa: F401, PLC0415 - pre-imported: numpy probes it; later ctypes use is denied

            if spec["audit"]:
                loaded = sorted(_DENY_IMPORTS.intersection(sys.modules) - {"_ctypes"})
                if loaded:  # imported already, they would bypass the import check
                    raise RuntimeError(f"modules loaded before the user code: {loaded}")
                strict = isolation == "process"
                if strict:  # .pyc files would need marshal.loads, which the strict hook denies
                    sys.pycache_prefix = os.path.join(os.devnull, "pycache")  # never exists
                _install_audit_hook(workdir, [sys.base_prefix, sys.prefix, sys.exec_prefix], strict)
        except BaseException as e:  # noqa: BLE001
            os.write(2, f"sandbox setup failed in the user process: {e!r}\n".encode())
            os._exit(71)
        code = spec["code"]
        del spec
        glb = {"__name__": "__main__", "__builtins__": __builtins__}
        rc = 0
        try:
            exec(compile(code, "<sandbox>", "exec"), glb)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001
            import traceback  # noqa: PLC0415 (sandbox: what the child loads is deliberate, see header)

            traceback.print_exc()
            rc = 1
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            rc = rc or 1
        os._exit(rc & 0xFF)
    # Supervisor: wait for the user process (and reap anything reparented to us as PID 1).
    if isolation == "process":
        _write_stop_pid(spec, str(pid))
    exit_code, sig = None, 0
    while True:
        try:
            wpid, wstatus = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if wpid == pid:
            if os.WIFSIGNALED(wstatus):
                sig = os.WTERMSIG(wstatus)
            else:
                exit_code = os.WEXITSTATUS(wstatus)
            break
    write_status(exit_code=exit_code, signal=sig, seccomp=seccomp_lib is not None)
    os._exit(0)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    _child_main(sys.argv[2])
