"""Run untrusted Python code (the ``PythonInterpreter`` tool) in a contained child process.

``run_python(code, timeout_s=..., memory_mb=...) -> SandboxResult(ok, output, error, ...)``

Layers of containment (see docs/agent.md, "Sandbox"), strongest first:

1. **OS, namespace mode** (``isolation="namespace"``; used by ``"auto"`` when the host is root and
   ``unshare`` works): the child starts in fresh network, mount, PID, IPC and UTS namespaces. Its
   root is a new tmpfs holding only read-only bind mounts of the Python installation, the shared
   libraries and ``/dev/{null,zero,urandom}``, plus a size-limited tmpfs ``/sandbox`` as its
   working directory; everything else of the host filesystem does not exist for it (``chroot``).
   The user code runs as a throwaway unprivileged uid (no capabilities, ``no_new_privs``). The
   network namespace has only a downed loopback device. When the namespace's init (our
   supervisor) exits or is killed, the kernel kills every process left in it.
2. **OS, always**: ``setrlimit`` on CPU seconds, address space (``RLIMIT_AS``), file size, open
   files, core dumps and the number of processes (``RLIMIT_NPROC``; the kernel only applies it to
   non-root uids, hence the throwaway uid); the host kills the child's process group at the
   wall-clock limit and when output exceeds its cap, and reads at most ``max_output_bytes`` per
   stream, so the host's memory is bounded whatever the child prints.
3. **Python audit hook** (``sys.addaudithook``, PEP 578), always installed unless ``audit=False``:
   denies ``open`` outside the working directory (reads of the Python installation are allowed so
   imports work), directory listing outside it, sockets, subprocesses, ``os.system``/``exec``/
   ``fork``/``spawn``, ``ctypes`` and ``gc`` introspection. This is defence in depth only: an audit
   hook is not a security boundary (PEP 578 says so), and in ``isolation="process"`` mode (no
   namespaces available) it is the *only* guard of the filesystem and the network, so that mode is
   best-effort against deliberate escapes.

This file is also the child's entry point (``python -I sandbox.py --child SPEC``); so the child
never imports jax or jaxllm, the module uses only the standard library.
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
# the unaudited ``_posixsubprocess.fork_exec``) loaded when the user code starts.

__all__ = ["SandboxResult", "run_python", "namespaces_available", "format_observation"]

_THIS_FILE = os.path.abspath(__file__)
_UID_BASE = 200_000  # throwaway uids are drawn from [_UID_BASE, _UID_BASE + 1_000_000)
_ISOLATIONS = ("auto", "namespace", "process")


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
    isolation: "namespace" or "process" (which layer 1 applied; see the module docstring).
    wall_s: wall-clock seconds the child ran.
    uid: the throwaway uid the code ran as (None: no uid switch was possible).
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

_NS_CACHE: dict[str, bool] = {}


def namespaces_available() -> bool:
    """True when this process can start children in new net/mount/pid namespaces."""
    import shutil
    import subprocess

    if "ok" not in _NS_CACHE:
        unshare = shutil.which("unshare")
        ok = False
        if unshare and hasattr(os, "geteuid") and os.geteuid() == 0:
            try:
                probe = subprocess.run(
                    [unshare, "--net", "--mount", "--pid", "--ipc", "--uts", "--fork", "true"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    timeout=10,
                )
                ok = probe.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
        _NS_CACHE["ok"] = ok
    return _NS_CACHE["ok"]


def _check_positive(name: str, value, kind=(int, float)) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        raise ValueError(f"run_python: {name} must be a positive number, got {value!r}")


def _readonly_paths() -> list[str]:
    """Host paths bind-mounted read-only into the namespace sandbox (the Python runtime)."""
    cands = [sys.base_prefix, sys.prefix, sys.exec_prefix, "/usr/lib", "/usr/lib64", "/lib",
             "/lib64", "/usr/local/lib", "/etc/ld.so.cache"]
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
    import stat

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
    import subprocess

    if os.geteuid() != 0:
        return True
    killer = ["/bin/sh", "-c", "kill -9 -1"]  # the shell's builtin kill: kill(-1, SIGKILL)
    deadline = time.monotonic() + wait_s
    while _live_pids_of_uid(uid):
        if time.monotonic() > deadline:
            return False
        subprocess.run(killer, user=uid, group=uid, extra_groups=[], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                       env={}, cwd="/")
        time.sleep(0.01)
    return True


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
      memory_mb: address-space limit (``RLIMIT_AS``) of the user process.
      max_output_bytes: cap per stream (stdout, stderr); more output kills the child.
      max_processes: process limit of the throwaway uid (fork bombs hit it).
      disk_mb: size of the private working directory (tmpfs in namespace mode) and the per-file
        size limit (``RLIMIT_FSIZE``) in both modes.
      isolation: "auto" (namespace if available, else process), "namespace" (fail if
        unavailable), or "process".
      audit: install the Python audit hook in the child (layer 3).

    Never raises for anything the code does; raises ``ValueError`` for bad arguments and
    ``RuntimeError`` if ``isolation="namespace"`` is requested where it is unavailable.
    """
    import shutil
    import subprocess
    import tempfile

    if not isinstance(code, str):
        raise ValueError(f"run_python: code must be a str, got {type(code).__name__}")
    _check_positive("timeout_s", timeout_s)
    for name, val in (("memory_mb", memory_mb), ("max_output_bytes", max_output_bytes),
                      ("max_processes", max_processes), ("disk_mb", disk_mb)):
        _check_positive(name, val, int)
    if isolation not in _ISOLATIONS:
        raise ValueError(f"run_python: isolation must be one of {_ISOLATIONS}, got {isolation!r}")
    if isolation == "auto":
        isolation = "namespace" if namespaces_available() else "process"
    elif isolation == "namespace" and not namespaces_available():
        raise RuntimeError("run_python: isolation='namespace' needs root and a working `unshare`")

    # A throwaway uid needs root to switch to, and (in process mode, where the child sees the
    # host filesystem) a Python runtime that other users can read.
    can_drop = os.geteuid() == 0 and (isolation == "namespace" or _runtime_world_readable())
    uid = _UID_BASE + int.from_bytes(os.urandom(4), "little") % 1_000_000 if can_drop else None
    jobdir = tempfile.mkdtemp(prefix="jaxllm-sandbox-")
    try:
        # traversable but not listable, so a throwaway uid (process mode) reaches its workdir
        os.chmod(jobdir, 0o711)
        workdir = os.path.join(jobdir, "work")
        os.mkdir(workdir, 0o700)
        if uid is not None:
            os.chown(workdir, uid, uid)
        status_path = os.path.join(jobdir, "status.json")
        spec = {
            "code": code,
            "isolation": isolation,
            "workdir": workdir,
            "newroot": os.path.join(jobdir, "root"),
            "status_path": status_path,
            "uid": uid,
            "cpu_s": int(timeout_s) + 1,
            "memory_bytes": memory_mb * 1024 * 1024,
            "fsize_bytes": disk_mb * 1024 * 1024,
            "disk_mb": disk_mb,
            # RLIMIT_NPROC counts every process of the real uid, so it is only meaningful for
            # the throwaway uid; for a shared uid it would count unrelated processes.
            "nproc": max_processes if uid is not None else None,
            "audit": audit,
            "readonly": _readonly_paths(),
            "symlinks": _symlinks(),
        }
        spec_path = os.path.join(jobdir, "spec.json")
        with open(os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump(spec, f)
        cmd = [sys.executable, "-I", _THIS_FILE, "--child", spec_path]
        if isolation == "namespace":
            cmd = [shutil.which("unshare"), "--net", "--mount", "--pid", "--ipc", "--uts",
                   "--fork", "--kill-child", *cmd]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                                env=env, cwd=jobdir)
        out, err, timed_out, truncated = _collect(proc, timeout_s, max_output_bytes)
        wall = time.monotonic() - t0
        if uid is not None:
            _kill_uid(uid)  # stragglers that left the process group (process mode)
        status = None
        try:
            with open(status_path) as f:
                status = json.load(f)
        except (OSError, ValueError):
            status = None
        result = _result(proc.returncode, status, out, err, timed_out, truncated, isolation,
                         wall, timeout_s, max_output_bytes, memory_mb)
        return dataclasses.replace(result, uid=uid)
    finally:
        shutil.rmtree(jobdir, ignore_errors=True)


def _killpg(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(proc, timeout_s: float, cap: int):
    """Read stdout/stderr up to ``cap`` bytes each until exit, timeout, or overflow."""
    import selectors
    import subprocess

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
            _killpg(proc)
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
            buf += chunk[:max(room, 0)]
            if len(chunk) > room:
                truncated = True
        if truncated:
            _killpg(proc)
            break
    sel.close()
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()) if not (timed_out or truncated)
                  else 5.0)
    except subprocess.TimeoutExpired:
        timed_out = True
        _killpg(proc)
        proc.wait()
    _killpg(proc)  # stragglers still in the group
    for f in bufs:
        f.close()
    return (bytes(bufs[proc.stdout]).decode("utf-8", "replace"),
            bytes(bufs[proc.stderr]).decode("utf-8", "replace"), timed_out, truncated)


_SIGNAL_REASONS = {
    signal.SIGXCPU: "CPU time limit exceeded",
    signal.SIGXFSZ: "file size limit exceeded",
    signal.SIGKILL: "killed (SIGKILL; memory or CPU hard limit)",
    signal.SIGSEGV: "segmentation fault",
}


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def _result(returncode, status, out, err, timed_out, truncated, isolation, wall, timeout_s,
            cap, memory_mb) -> SandboxResult:
    exit_code = status.get("exit_code") if status else None
    sig = status.get("signal", 0) if status else 0
    setup_error = status.get("setup_error") if status else None
    reasons = []
    if setup_error:
        reasons.append(f"sandbox setup failed: {setup_error}")
    if timed_out:
        reasons.append(f"timed out after {timeout_s:g} s wall clock; the process group was killed")
    if truncated:
        reasons.append(f"output limit exceeded (more than {cap} bytes on one stream); output "
                       "truncated and the process killed")
    if sig:
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
    return SandboxResult(ok=ok, output=out, error=None if ok else "; ".join(reasons), stderr=err,
                         exit_code=exit_code, signal=sig, timed_out=timed_out,
                         output_truncated=truncated, isolation=isolation, wall_s=wall)


# --------------------------------------------------------------------------------------------
# Child side (runs as ``python -I sandbox.py --child SPEC``; standard library only)
# --------------------------------------------------------------------------------------------

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = (
    1, 2, 4, 32, 4096, 16384, 1 << 18)


def _libc():
    import ctypes

    return ctypes.CDLL("libc.so.6", use_errno=True)


def _mount(libc, src, target, fstype, flags, data=None):
    import ctypes

    rc = libc.mount(src.encode() if src else None, target.encode(),
                    fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                    data.encode() if data else None)
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
        _mount(libc, None, target, None,
               _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    for link, dest in spec["symlinks"]:
        if not os.path.lexists(root + link):
            os.symlink(dest, root + link)
    os.makedirs(root + "/dev", exist_ok=True)
    for dev in ("null", "zero", "urandom"):
        open(f"{root}/dev/{dev}", "w").close()
        _mount(libc, f"/dev/{dev}", f"{root}/dev/{dev}", None, _MS_BIND)
    os.makedirs(root + "/sandbox")
    _mount(libc, "tmpfs", root + "/sandbox", "tmpfs", _MS_NOSUID | _MS_NODEV,
           f"size={spec['disk_mb']}m,mode=0700")
    if spec["uid"] is not None:
        os.chown(root + "/sandbox", spec["uid"], spec["uid"])
    os.makedirs(root + "/tmp", exist_ok=True)  # exists already when the runtime lives under /tmp
    os.chmod(root + "/tmp", 0o1777)  # read-only below: present for libraries that probe it
    os.chroot(root)
    os.chdir("/sandbox")
    _mount(libc, None, "/", None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)


def _set_limits(spec) -> None:
    import resource

    def lim(which, value):
        resource.setrlimit(which, (value, value))

    lim(resource.RLIMIT_CPU, spec["cpu_s"])
    lim(resource.RLIMIT_AS, spec["memory_bytes"])
    lim(resource.RLIMIT_FSIZE, spec["fsize_bytes"])
    lim(resource.RLIMIT_NOFILE, 64)
    lim(resource.RLIMIT_CORE, 0)
    if spec["nproc"] is not None:
        lim(resource.RLIMIT_NPROC, spec["nproc"])


def _drop_privileges(spec) -> None:
    uid = spec["uid"]
    if uid is None:
        return
    libc = _libc()  # loaded while the runtime is still readable (process mode may lose that)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError("prctl(PR_SET_NO_NEW_PRIVS) failed")


_DENY_PREFIXES = ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
                  "os.forkpty", "os.system", "os.kill", "os.killpg", "os.setuid", "ctypes.",
                  "gc.get_", "sys.addaudithook", "pty.", "os.chroot",
                  "webbrowser.", "urllib.Request", "http.client.", "ftplib.", "smtplib.",
                  "poplib.", "imaplib.", "nntplib.", "telnetlib.", "signal.pthread_kill",
                  "resource.setrlimit", "resource.prlimit", "sys._current_frames")
_PATH_EVENTS = {  # event -> indices of path arguments, whether they write
    "os.remove": ((0,), True), "os.rmdir": ((0,), True), "os.mkdir": ((0,), True),
    "os.rename": ((0, 1), True), "os.link": ((0, 1), True), "os.symlink": ((0, 1), True),
    "os.chmod": ((0,), True), "os.chown": ((0,), True), "os.truncate": ((0,), True),
    "os.utime": ((0,), True), "os.chflags": ((0,), True), "os.mkfifo": ((0,), True),
    "os.mknod": ((0,), True), "os.setxattr": ((0,), True), "os.removexattr": ((0,), True),
    "os.listdir": ((0,), False), "os.scandir": ((0,), False), "os.chdir": ((0,), False),
    "os.getxattr": ((0,), False), "os.listxattr": ((0,), False), "shutil.rmtree": ((0,), True),
    "shutil.copyfile": ((0, 1), True), "shutil.move": ((0, 1), True),
}


#: modules whose import the audit hook refuses (process spawning without audit events, native
#: code); the child makes sure none of them is loaded before the user code starts
_DENY_IMPORTS = frozenset({"_posixsubprocess", "subprocess", "multiprocessing", "_ctypes",
                           "pty", "_xxsubinterpreters", "_testcapi", "_testinternalcapi"})


def _install_audit_hook(workdir: str, read_prefixes: list[str]) -> None:
    """Layer 3: deny file access outside ``workdir`` and process/network/ctypes escapes.

    Everything the hook uses is bound in its closure at install time (functions, builtins, the
    deny lists), so user code cannot switch it off by rebinding module globals or builtins. The
    re-entrancy guard is per thread, so one thread inside the hook does not let another through.
    """
    import _thread

    realpath, fspath, normcase = os.path.realpath, os.fspath, os.path.normcase
    get_ident, _isinstance, _any, _len, _str = _thread.get_ident, isinstance, any, len, str
    _bytes, _int, _denied = bytes, int, PermissionError
    deny_prefixes, deny_imports = tuple(_DENY_PREFIXES), frozenset(_DENY_IMPORTS)
    path_events = {k: (tuple(v[0]), bool(v[1])) for k, v in _PATH_EVENTS.items()}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
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
                check(resolve(path) if path is not None else None, write, "open")
            elif event in path_events:
                idxs, write = path_events[event]
                for i in idxs:
                    if i < _len(args) and args[i] is not None and not _isinstance(args[i], _int):
                        check(resolve(args[i]), write, event)
        finally:
            busy.discard(me)

    sys.addaudithook(hook)


def _child_main(spec_path: str) -> None:  # pragma: no cover - exercised through run_python
    with open(spec_path) as f:
        spec = json.load(f)
    status_fd = os.open(spec["status_path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def write_status(**kw):
        os.write(status_fd, json.dumps(kw).encode())
        os.close(status_fd)

    try:
        if spec["isolation"] == "namespace":
            _build_root(spec)
            workdir = "/sandbox"
        else:
            workdir = spec["workdir"]
            os.chdir(workdir)
    except Exception as e:  # noqa: BLE001 - reported to the host, never to the user code
        write_status(setup_error=f"{type(e).__name__}: {e}")
        os._exit(70)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        os.close(status_fd)
        try:
            import traceback  # noqa: F401  loaded before any uid switch, for error reports

            _set_limits(spec)
            _drop_privileges(spec)
            os.environ.clear()
            os.environ.update({"HOME": workdir, "TMPDIR": workdir, "PATH": "/usr/bin:/bin",
                               "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
                               "OMP_NUM_THREADS": "1"})
            if sys.path and os.path.dirname(_THIS_FILE) == os.path.abspath(sys.path[0] or "."):
                sys.path.pop(0)
            import ctypes  # noqa: F401  pre-imported: numpy probes it; later ctypes use is denied
            if spec["audit"]:
                loaded = sorted(_DENY_IMPORTS.intersection(sys.modules) - {"_ctypes"})
                if loaded:  # imported already, they would bypass the import check
                    raise RuntimeError(f"modules loaded before the user code: {loaded}")
                _install_audit_hook(workdir, [sys.base_prefix, sys.prefix, sys.exec_prefix])
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
            import traceback

            traceback.print_exc()
            rc = 1
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            rc = rc or 1
        os._exit(rc & 0xFF)
    # Supervisor: wait for the user process (and reap anything reparented to us as PID 1).
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
    write_status(exit_code=exit_code, signal=sig)
    os._exit(0)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    _child_main(sys.argv[2])
