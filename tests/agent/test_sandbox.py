"""Hostile-code tests of the PythonInterpreter sandbox. Short limits keep them fast and safe."""

import ast
import inspect
import json
import os
import pwd
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from jaxllm.agent import sandbox, syscall_filter

HAS_NS = sandbox.namespaces_available()
HAS_USERNS = sandbox.user_namespaces_available()
AVAILABLE = sandbox.available_isolations()
HAS_SECCOMP = syscall_filter.load_libseccomp() is not None
# Every configuration the host supports: the default ("auto"), and each layer on its own where
# that can be tested (an OS mode with the audit hook off shows the OS layer alone).
OS_CONFIGS = [{"isolation": "namespace"}, {"isolation": "namespace", "audit": False}] * HAS_NS + [
    {"isolation": "userns"},
    {"isolation": "userns", "audit": False},
] * HAS_USERNS
CONFIGS = [pytest.param({}, id="default")] if AVAILABLE else []
if HAS_NS:
    CONFIGS.append(pytest.param({"isolation": "namespace", "audit": False}, id="os_only"))
if HAS_USERNS:
    CONFIGS.append(pytest.param({"isolation": "userns", "audit": False}, id="userns_os_only"))
CONFIGS.append(pytest.param({"isolation": "process"}, id="process_audit"))


def _config_id(cfg: dict) -> str:
    return cfg["isolation"] + ("" if cfg.get("audit", True) else "_os_only")


_USED_UIDS: list = []


def run_python(code, **kw):
    """``sandbox.run_python`` that records the throwaway uid each run used; where this host has
    no OS isolation, runs without ``isolation`` ask for process mode (the refusal of "auto"
    there has its own test)."""
    if "isolation" not in kw and not AVAILABLE:
        kw["isolation"] = "process"
    r = sandbox.run_python(code, **kw)
    _USED_UIDS.append(r.uid)
    return r


@pytest.fixture(autouse=True)
def host_unharmed():
    _USED_UIDS.clear()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    # no live process of any uid this test's runs used (other xdist workers run their own)
    assert [u for u in _USED_UIDS if u is not None and sandbox._live_pids_of_uid(u)] == []
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert grown_mb < 64, f"host RSS grew by {grown_mb:.0f} MB"


def test_runs_ordinary_code_and_captures_output():
    r = run_python("import math\nprint(math.factorial(10))\nprint('x', flush=True)", timeout_s=5)
    assert r.ok and r.error is None and r.output == "3628800\nx\n" and r.exit_code == 0
    assert sandbox.format_observation(r) == "stdout:\n3628800\nx\n"


def test_private_workdir_is_writable_and_fresh():
    code = "import os\nopen('a.txt','w').write('hi')\nprint(sorted(os.listdir('.')), open('a.txt').read())"
    r1 = run_python(code, timeout_s=5)
    r2 = run_python(code, timeout_s=5)
    assert r1.ok and r1.output == "['a.txt'] hi\n"
    assert r2.output == r1.output  # nothing left over from the previous run


def test_errors_are_reported_not_raised():
    r = run_python("raise ValueError('boom')", timeout_s=5)
    assert not r.ok and r.exit_code == 1 and "ValueError: boom" in r.error
    assert "Traceback" in r.stderr
    r = run_python("import sys; sys.exit(3)", timeout_s=5)
    assert not r.ok and r.exit_code == 3 and r.error == "exit status 3"
    r = run_python("def f(:\n pass", timeout_s=5)
    assert not r.ok and "SyntaxError" in r.error
    assert "error: " in sandbox.format_observation(r)
    assert sandbox.format_observation(run_python("x = 1", timeout_s=5)) == "Finished execution."


def test_numpy_is_usable():
    r = run_python("import numpy as np\nprint(int(np.arange(5).sum()))", timeout_s=10)
    assert r.ok, r.error
    assert r.output == "10\n"


@pytest.mark.parametrize("cfg", CONFIGS)
def test_infinite_loop_is_killed_at_the_wall_clock_limit(cfg):
    t0 = time.monotonic()
    r = run_python("while True:\n    pass", timeout_s=1.0, **cfg)
    assert time.monotonic() - t0 < 6
    assert not r.ok and r.timed_out and "timed out" in r.error


@pytest.mark.parametrize("cfg", CONFIGS)
def test_fork_bomb_is_contained(cfg):
    bomb = (
        "import os\nn = 0\nwhile True:\n    try:\n        os.fork()\n        n += 1\n"
        "    except OSError:\n        pass\n"
    )
    t0 = time.monotonic()
    r = run_python(bomb, timeout_s=1.0, max_processes=8, **cfg)
    assert time.monotonic() - t0 < 8
    assert not r.ok and r.error
    # (the autouse fixture checks that no process of the sandbox uid survives)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_huge_allocation_fails_with_memory_error(cfg):
    r = run_python("x = bytearray(10 * 1024**3)\nprint('allocated')", timeout_s=5, memory_mb=256, **cfg)
    assert not r.ok and "MemoryError" in r.error and "allocated" not in r.output


@pytest.mark.parametrize("cfg", CONFIGS)
def test_reading_host_secrets_is_denied(cfg, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    os.chmod(secret, 0o644)
    os.chmod(tmp_path, 0o755)
    for target in (str(secret), "/etc/passwd", os.path.expanduser("~/.ssh/id_rsa"), "/etc/shadow"):
        r = run_python(f"print(open({target!r}).read())", timeout_s=5, **cfg)
        assert not r.ok, target
        assert "TOPSECRET" not in r.output and "root:" not in r.output
        assert "Error" in r.error, r.error


@pytest.mark.parametrize("cfg", CONFIGS)
def test_listing_the_host_filesystem_reveals_nothing(cfg, tmp_path):
    (tmp_path / "marker_file_xyz").write_text("x")
    r = run_python(f"import os\nprint(os.listdir({str(tmp_path)!r}))", timeout_s=5, **cfg)
    assert not r.ok and "marker_file_xyz" not in r.output


@pytest.mark.parametrize("cfg", CONFIGS)
def test_writing_outside_the_workdir_is_denied(cfg, tmp_path):
    os.chmod(tmp_path, 0o777)
    target = tmp_path / "pwned.txt"
    for t in (str(target), "/tmp/jaxllm_sandbox_pwned.txt", "../escape.txt"):
        r = run_python(f"open({t!r}, 'w').write('x')", timeout_s=5, **cfg)
        assert not r.ok, t
    assert not target.exists() and not os.path.exists("/tmp/jaxllm_sandbox_pwned.txt")


@pytest.mark.parametrize("cfg", CONFIGS)
def test_network_is_unreachable_even_to_a_host_listener(cfg):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    code = (
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')"
    )
    r = run_python(code, timeout_s=5, **cfg)
    srv.setblocking(False)
    try:  # a completed connection would wait in the backlog
        conn, _ = srv.accept()
        conn.close()
        accepted = True
    except BlockingIOError:
        accepted = False
    finally:
        srv.close()
    assert not r.ok and "connected" not in r.output and not accepted


@pytest.mark.parametrize("cfg", CONFIGS)
def test_printing_100_mb_is_truncated_and_killed(cfg):
    cap = 10_000
    r = run_python(
        "import sys\nfor _ in range(100):\n    sys.stdout.write('a' * 1_000_000)\n",
        timeout_s=10,
        max_output_bytes=cap,
        **cfg,
    )
    assert not r.ok and r.output_truncated and "output limit exceeded" in r.error
    assert len(r.output) == cap and set(r.output) == {"a"}


def test_disk_filling_is_limited():
    r = run_python(
        "f = open('big', 'wb')\nfor _ in range(64):\n    f.write(b'0' * 1024**2)\nf.close()\nprint('wrote')",
        timeout_s=10,
        disk_mb=4,
    )
    assert not r.ok and "wrote" not in r.output
    assert "file size limit" in r.error or "No space" in r.error or "Errno" in r.error


@pytest.mark.skipif(not HAS_NS, reason="needs root and unshare")
def test_namespace_mode_hides_the_host_filesystem():
    r = run_python(
        "import os\nprint(sorted(os.listdir('/')))\nprint(os.getcwd(), os.getuid())",
        timeout_s=5,
        isolation="namespace",
        audit=False,
    )
    assert r.ok and r.isolation == "namespace"
    listing, cwd_uid = r.output.splitlines()
    runtime_tops = {p.split("/")[1] for p in sandbox._readonly_paths()}
    allowed = runtime_tops | {"dev", "sandbox", "tmp", "lib", "lib64", "bin"}
    assert set(ast.literal_eval(listing)) <= allowed
    cwd, uid = cwd_uid.split()
    assert cwd == "/sandbox" and int(uid) >= sandbox._UID_BASE


def _runtime_ancestors():
    """{directory above a read-only runtime path: the names the sandbox may show in it}: the next
    component towards each runtime path, plus, at /, the sandbox's own entries. Directories that
    are themselves inside a bind-mounted runtime path show the host's content and are left out."""
    readonly = sandbox._readonly_paths()
    inside = lambda d: any(d == p or d.startswith(p.rstrip("/") + "/") for p in readonly)
    allowed: dict[str, set[str]] = {}
    for p in readonly:
        parts = p.strip("/").split("/")
        for i in range(len(parts)):
            d = "/" + "/".join(parts[:i])
            if not inside(d):
                allowed.setdefault(d, set()).add(parts[i])
    allowed["/"] |= {"dev", "sandbox", "tmp"} | {link[1:] for link, _ in sandbox._symlinks()}
    return allowed


@pytest.mark.skipif(not HAS_NS, reason="needs root and unshare")
def test_only_the_runtime_is_visible_below_its_parents():
    # Every directory above the runtime (/, the venv's parent, /usr, ...) shows only the way to
    # the runtime, never the host's other entries there. Checked on all of them at once: one
    # alone may hold nothing else on the host (a venv alone in its folder, /tmp/x/.venv), which
    # would make its check vacuous; / always holds more on the host (/proc at least).
    allowed = _runtime_ancestors()
    venv_parent = os.path.dirname(os.path.realpath(sandbox.sys.prefix))
    assert venv_parent in allowed
    r = run_python(
        f"import os\nprint({{d: os.listdir(d) for d in {sorted(allowed)!r}}})",
        timeout_s=5,
        isolation="namespace",
        audit=False,
    )
    assert r.ok, r.error
    visible = {d: set(names) for d, names in ast.literal_eval(r.output).items()}
    for d, names in allowed.items():
        assert visible[d] <= names, (d, visible[d] - names)
    assert set(os.listdir("/")) - visible["/"]  # the host has more, and it is hidden


@pytest.mark.skipif(not HAS_NS, reason="needs root and unshare")
def test_background_children_die_with_the_run():
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')"
    t0 = time.monotonic()
    r = run_python(code, timeout_s=5, isolation="namespace", audit=False)
    assert r.ok and r.output == "parent done\n" and time.monotonic() - t0 < 4


def test_argument_validation():
    with pytest.raises(ValueError, match="audit must be a bool"):
        run_python("print(1)", audit="no")
    with pytest.raises(ValueError, match="timeout_s"):
        run_python("print(1)", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_python("print(1)", memory_mb=1.5)
    with pytest.raises(ValueError, match="isolation"):
        run_python("print(1)", isolation="vm")
    with pytest.raises(ValueError, match="code must be a str"):
        run_python(b"print(1)")


@pytest.mark.parametrize("cfg", CONFIGS)
def test_common_stdlib_use_works(cfg):
    code = (
        "import os, json, re, math, datetime, collections, itertools, fractions, decimal, "
        "statistics, random, hashlib, tempfile, io, csv, threading\n"
        "open(os.devnull, 'w').write('x')\n"
        "with tempfile.NamedTemporaryFile('w', delete=False) as f:\n    f.write('x')\n"
        "t = threading.Thread(target=lambda: print('thread ok'))\nt.start()\nt.join()\n"
        "print(len(os.urandom(8)), statistics.mean([1, 2, 3]), "
        "os.path.dirname(f.name) == os.getcwd())"
    )
    r = run_python(code, timeout_s=5, **cfg)
    assert r.ok, r.error
    assert r.output == "thread ok\n8 2 True\n"


def test_symlink_out_of_the_workdir_is_denied(tmp_path):
    secret = tmp_path / "s.txt"
    secret.write_text("TOPSECRET")
    os.chmod(tmp_path, 0o755)
    code = f"import os\nos.symlink({str(secret)!r}, 'link')\nprint(open('link').read())"
    for cfg in ({"isolation": "process"},) + (
        ({"isolation": "namespace", "audit": False},) if HAS_NS else ()
    ):
        r = run_python(code, timeout_s=5, **cfg)
        assert not r.ok and "TOPSECRET" not in r.output


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uids")
def test_kill_uid_kills_processes_that_left_the_process_group():
    uid = sandbox._UID_BASE + 999_999
    procs = [
        subprocess.Popen(
            ["/bin/sh", "-c", "sleep 60"],
            user=uid,
            group=uid,
            extra_groups=[],
            start_new_session=True,
            cwd="/",
        )
        for _ in range(3)
    ]
    assert len(sandbox._live_pids_of_uid(uid)) >= 3
    t0 = time.monotonic()
    assert sandbox._kill_uid(uid)
    assert time.monotonic() - t0 < 3
    assert [p.wait(timeout=5) for p in procs] == [-9, -9, -9]
    assert sandbox._live_pids_of_uid(uid) == []


@pytest.mark.skipif(not HAS_NS, reason="needs root and unshare")
def test_user_process_has_no_way_back_to_privileges():
    code = (
        "import ctypes, os\nlibc = ctypes.CDLL('libc.so.6', use_errno=True)\n"
        "print(libc.prctl(39, 0, 0, 0, 0))\n"  # PR_GET_NO_NEW_PRIVS
        "print(libc.unshare(0x10000000))\n"  # CLONE_NEWUSER: refused when chrooted
        "print(libc.unshare(0x00020000))\n"  # CLONE_NEWNS: needs CAP_SYS_ADMIN
        "try:\n    os.chroot('.')\nexcept PermissionError:\n    print('chroot denied')\n"
    )
    r = run_python(code, timeout_s=5, isolation="namespace", audit=False)
    assert r.ok, r.error
    assert r.output.split("\n")[:4] == ["1", "-1", "-1", "chroot denied"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uids")
def test_process_mode_with_a_throwaway_uid(monkeypatch, tmp_path):
    # Here the Python runtime lives under a 0700 /root, so "auto" process mode cannot switch
    # uids; pretend it can and run code that needs no further imports.
    monkeypatch.setattr(sandbox, "_runtime_world_readable", lambda: True)
    secret = tmp_path / "root_only.txt"
    secret.write_text("TOPSECRET")
    os.chmod(secret, 0o600)
    os.chmod(tmp_path, 0o755)
    code = (
        "import os\nprint(os.getuid())\n"
        "path = os.path.join(os.environ['TMPDIR'], 'f.txt')\n"
        "with open(path, 'w') as f:\n    f.write('x')\n"
        "print(os.path.dirname(path) == os.getcwd() and os.listdir('.') == ['f.txt'])\n"
        f"try:\n    open({str(secret)!r}).read()\nexcept PermissionError:\n"
        "    print('denied by the OS')\n"
    )
    r = run_python(code, timeout_s=5, isolation="process", audit=False)
    assert r.ok, r.error
    uid, same_dir, denied = r.output.splitlines()
    assert int(uid) == r.uid and r.uid >= sandbox._UID_BASE
    assert same_dir == "True" and denied == "denied by the OS"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uids")
def test_process_mode_fork_bomb_and_escaped_children_are_killed(monkeypatch):
    monkeypatch.setattr(sandbox, "_runtime_world_readable", lambda: True)
    bomb = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
        "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    r = run_python(bomb, timeout_s=1.0, isolation="process", audit=False, max_processes=8)
    assert not r.ok and r.timed_out and r.uid is not None
    # the autouse fixture checks that no process of r.uid is left, the setsid child included


def test_audit_hook_blocks_unaudited_process_spawning():
    # _posixsubprocess.fork_exec raises no audit event: it must be neither loaded nor importable
    code = (
        "import sys\nprint('_posixsubprocess' in sys.modules, 'subprocess' in sys.modules)\n"
        "for name in ('_posixsubprocess', 'subprocess', 'multiprocessing'):\n"
        "    try:\n        __import__(name)\n        print(name, 'imported')\n"
        "    except PermissionError:\n        print(name, 'denied')\n"
    )
    r = run_python(code, timeout_s=5, isolation="process")
    assert r.ok, r.error
    assert r.output.splitlines() == [
        "False False",
        "_posixsubprocess denied",
        "subprocess denied",
        "multiprocessing denied",
    ]


def test_audit_hook_survives_rebinding_globals_and_threads():
    code = (
        "import sys, threading\nmain = sys.modules['__main__']\n"
        "for name in ('_DENY_PREFIXES', '_PATH_EVENTS', '_DENY_IMPORTS'):\n"
        "    setattr(main, name, type(getattr(main, name))())\n"
        "open('ok.txt', 'w').write('ok')\nleaks, oks = [], []\n"
        "def grab():\n    for _ in range(300):\n        oks.append(open('ok.txt').read())\n"
        "        try:\n            leaks.append(open('/etc/passwd').read())\n"
        "        except PermissionError:\n            pass\n"
        "ts = [threading.Thread(target=grab) for _ in range(3)]\n"
        "[t.start() for t in ts]\n[t.join() for t in ts]\nprint(len(leaks), len(oks))\n"
        "try:\n    import socket\n    socket.socket()\n    print('socket created')\n"
        "except PermissionError:\n    print('socket denied')\n"
    )
    r = run_python(code, timeout_s=10, isolation="process")
    assert r.output.splitlines() == ["0 900", "socket denied"], (r.output, r.error)


def test_audit_hook_fails_closed_when_builtins_are_broken():
    # the stdlib helpers the hook calls (realpath) use builtins; breaking them makes the hook
    # raise, which aborts the audited operation instead of allowing it
    code = (
        "import builtins\nbuiltins.isinstance = lambda *a: True\n"
        "try:\n    data = open('/etc/passwd').read()\nexcept BaseException:\n    data = ''\n"
        "import os\nos.write(1, b'leaked' if 'root' in data else b'contained')\n"
    )
    r = run_python(code, timeout_s=5, isolation="process")
    assert r.output == "contained", (r.output, r.error)


# --------------------------------------------------------------------------------------------
# Fail closed: mode selection
# --------------------------------------------------------------------------------------------


def test_auto_refuses_to_run_without_os_isolation(monkeypatch):
    monkeypatch.setattr(sandbox, "available_isolations", lambda: ())
    with pytest.raises(sandbox.SandboxUnavailableError) as err:
        sandbox.run_python("print('ran')")
    message = str(err.value)
    assert "isolation='process'" in message and "not a security boundary" in message
    assert "does not protect the host's files, network or processes" in message
    for mode in ("namespace", "userns"):
        with pytest.raises(sandbox.SandboxUnavailableError, match=f"isolation='{mode}'"):
            sandbox.run_python("print('ran')", isolation=mode)
    r = run_python("print('ran')", isolation="process", timeout_s=5)  # explicit: it runs
    assert r.ok and r.output == "ran\n" and r.isolation == "process"


@pytest.mark.skipif(not AVAILABLE, reason="no OS isolation on this host")
def test_auto_picks_the_strongest_available_mode(monkeypatch):
    assert sandbox.resolve_isolation("auto") == ("namespace" if HAS_NS else "userns")
    if HAS_USERNS:  # as an unprivileged user would see it: namespace mode (root) unavailable
        monkeypatch.setattr(sandbox, "namespaces_available", lambda: False)
        r = run_python("print('ran')", timeout_s=5)
        assert r.ok and r.isolation == "userns" and r.uid is None


@pytest.mark.skipif(not AVAILABLE, reason="no OS isolation on this host")
def test_every_result_reports_the_mode_it_ran_in():
    for cfg in OS_CONFIGS + [{"isolation": "process"}]:
        r = run_python("print('ran')", timeout_s=5, **cfg)
        assert r.ok and r.isolation == cfg["isolation"], (cfg, r)
        assert r.seccomp == HAS_SECCOMP
    assert run_python("print('ran')", timeout_s=5).isolation == AVAILABLE[0]


# --------------------------------------------------------------------------------------------
# The hostile set: run in every available mode, as root and as an unprivileged user
# --------------------------------------------------------------------------------------------

_PRELUDE = """\
import os, sys
def attempt(what, action):
    try:
        value = action()
    except BaseException as e:
        print('blocked:', what, type(e).__name__, flush=True)
        return None
    print('done:', what, repr(value)[:300], flush=True)
    return value
print('ATTEMPTED', flush=True)
"""
# Placeholders filled per run: SECRET_PATH (a file the host user can read), TARGET_PATH (in an
# empty world-writable folder that must stay empty), SENTINEL_PID (a host process that must
# survive; its environment holds the secret). Each case prints ESCAPED where success itself
# is the escape; the checks also look for the secret, a listing of the host's / and new files.
HOSTILE = {
    # a dir_fd on a runtime directory, and a relative path that from the working directory
    # (where the audit hook resolves it) stays inside, but from the fd climbs to the host's /
    "dir_fd": """
R = os.path.dirname(os.__file__)
name = sorted(n for n in os.listdir(R) if os.path.isdir(os.path.join(R, n)))[0]
depth = len(R.strip('/').split('/'))
deep = '/'.join(['d'] * (depth + 2))
os.makedirs(deep)
os.symlink(deep, name)
up = '/'.join(['..'] * (depth + 1))
def via_dir_fd(rel, flags=os.O_RDONLY):
    return os.open(name + '/' + up + rel, flags, 0o644, dir_fd=os.open(R, os.O_RDONLY))
attempt('list / through a dir_fd', lambda: os.listdir(via_dir_fd('')))
attempt('read the secret through a dir_fd', lambda: os.read(via_dir_fd('SECRET_PATH'), 200))
attempt('create a file outside through a dir_fd',
        lambda: os.write(via_dir_fd('TARGET_PATH', os.O_WRONLY | os.O_CREAT), b'x'))
""",
    "proc_self": """
attempt('read the secret via /proc/self/root',
        lambda: open('/proc/self/root' + 'SECRET_PATH').read())
attempt('read the secret via /proc/self/cwd',
        lambda: open('/proc/self/cwd/' + '../' * 40 + 'SECRET_PATH'[1:]).read())
attempt("read the sentinel's environment", lambda: open('/proc/SENTINEL_PID/environ').read())
attempt('list / via /proc/self/root', lambda: os.listdir('/proc/self/root/'))
if attempt('open /proc/self/mem for writing', lambda: open('/proc/self/mem', 'r+b')):
    print('ESCAPED: /proc/self/mem is writable')
attempt('write outside via /proc/self/cwd',
        lambda: open('/proc/self/cwd/' + '../' * 40 + 'TARGET_PATH'[1:], 'w').write('x'))
""",
    "ctypes": """
import ctypes
libc = attempt('load libc with ctypes', lambda: ctypes.CDLL(None, use_errno=True))
if libc is not None:
    fd = libc.open(b'SECRET_PATH', 0)
    if fd >= 0:
        buf = ctypes.create_string_buffer(200)
        libc.read(fd, buf, 200)
        print('read:', buf.value)
    if libc.ptrace(16, SENTINEL_PID, 0, 0) == 0:
        print('ESCAPED: ptrace attached to a host process')
    if libc.mount(b'none', b'.', b'tmpfs', 0, None) == 0:
        print('ESCAPED: mounted a filesystem')
    if libc.unshare(0x10000000) == 0:
        print('ESCAPED: made a new user namespace')
    libc.kill(SENTINEL_PID, 9)
    libc.open(b'TARGET_PATH', 0o101, 0o644)
""",
    "fork_flood": """
import time
while True:
    try:
        if os.fork() == 0:
            os.setsid()
            time.sleep(60)
            os._exit(0)
    except OSError:
        pass
""",
    "thread_flood": """
import threading, time
started = 0
try:
    for _ in range(10000):
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        started += 1
except RuntimeError as e:
    print('blocked: thread', e)
print('threads started:', started, flush=True)
os._exit(0)
""",
    "write_outside": """
open('inside.txt', 'w').write('x')
attempt('open for writing', lambda: open('TARGET_PATH', 'w').write('x'))
attempt('os.open O_CREAT', lambda: os.open('TARGET_PATH' + '_os', os.O_CREAT | os.O_WRONLY, 0o644))
attempt('rename out', lambda: os.rename('inside.txt', 'TARGET_PATH' + '_renamed'))
attempt('hard link out', lambda: os.link('inside.txt', 'TARGET_PATH' + '_link'))
attempt('symlink out', lambda: os.symlink('/etc/passwd', 'TARGET_PATH' + '_sym'))
attempt('mkdir out', lambda: os.mkdir('TARGET_PATH' + '_dir'))
attempt('write through ../', lambda: open('../' * 40 + 'TARGET_PATH'[1:] + '_rel', 'w').write('x'))
""",
    "signal_parent": """
import signal, time
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGKILL):
    attempt(f'signal {sig.name} to the parent', lambda: os.kill(os.getppid(), sig))
attempt('SIGKILL a host process', lambda: os.kill(SENTINEL_PID, signal.SIGKILL))
time.sleep(0.3)
print('SURVIVED', flush=True)
""",
}
_FLOODS = ("fork_flood", "thread_flood")


def run_hostile_set(run_python, configs, cases, target_dir, sentinel_env):
    """Run every case in every config; record each result with the host's state after it.

    Standard library only: the unprivileged test runs this function's source as ``nobody``.
    The sentinel is a process of the calling user that the code tries to kill and ptrace.
    """
    import os  # noqa: PLC0415 (this function's source runs standalone)
    import subprocess  # noqa: PLC0415 (this function's source runs standalone)

    def own_pids():  # live processes of this user; zombies wait for pid 1 and run nothing
        pids = set()
        for d in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{d}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                if os.stat(f"/proc/{d}").st_uid == os.geteuid() and state not in "ZX":
                    pids.add(int(d))
            except (OSError, IndexError):
                continue
        return pids

    sentinel = subprocess.Popen(["sleep", "300"], env=sentinel_env, stdin=subprocess.DEVNULL)
    records = []
    try:
        for cfg in configs:
            for name, code in cases.items():
                before = own_pids()
                r = run_python(
                    code.replace("SENTINEL_PID", str(sentinel.pid)), timeout_s=3, max_processes=8, **cfg
                )
                leftover = sorted(own_pids() - before - {sentinel.pid}) if os.geteuid() else []
                records.append(
                    {
                        "config": cfg,
                        "case": name,
                        "ok": r.ok,
                        "output": r.output,
                        "error": r.error,
                        "isolation": r.isolation,
                        "uid": r.uid,
                        "seccomp": r.seccomp,
                        "cgroup": r.cgroup,
                        "timed_out": r.timed_out,
                        "sentinel_alive": sentinel.poll() is None,
                        "leftover": leftover,
                        "target_dir": sorted(os.listdir(target_dir)),
                    }
                )
    finally:
        sentinel.kill()
        sentinel.wait()
    return records


@pytest.fixture
def hostile_host():
    """A world-readable secret and an empty world-writable folder, readable by ``nobody`` too
    (under /tmp, not pytest's 0700 tmp_path); the hostile cases with their paths filled in."""
    base = tempfile.mkdtemp(prefix="jaxllm-hostile-")
    os.chmod(base, 0o755)
    secret_text = "TOPSECRET-" + os.urandom(8).hex()
    secret = os.path.join(base, "secret.txt")
    with open(secret, "w") as f:
        f.write(secret_text)
    os.chmod(secret, 0o644)
    target_dir = os.path.join(base, "target")
    os.mkdir(target_dir)
    os.chmod(target_dir, 0o777)
    cases = {
        name: _PRELUDE
        + code.replace("SECRET_PATH", secret).replace("TARGET_PATH", os.path.join(target_dir, "pwned"))
        for name, code in HOSTILE.items()
    }
    yield {
        "base": base,
        "secret_text": secret_text,
        "target_dir": target_dir,
        "cases": cases,
        "sentinel_env": {"PATH": "/usr/bin:/bin", "SENTINEL_SECRET": secret_text},
    }
    shutil.rmtree(base, ignore_errors=True)


def _assert_contained(rec: dict, host: dict, max_processes: int = 8) -> None:
    where = f"{_config_id(rec['config'])}/{rec['case']}"
    out = rec["output"]
    assert rec["isolation"] == rec["config"]["isolation"], where
    assert out.startswith("ATTEMPTED\n"), (where, out, rec["error"])  # the code did run
    assert "ESCAPED" not in out, (where, out)
    assert host["secret_text"] not in out, (where, out)
    assert "'proc'" not in out, (where, out)  # a listing of the host's /
    assert rec["target_dir"] == [], (where, rec["target_dir"])
    assert rec["sentinel_alive"], where
    assert rec["leftover"] == [], (where, rec["leftover"])
    assert rec["uid"] is None or sandbox._live_pids_of_uid(rec["uid"]) == [], where
    if rec["case"] in _FLOODS:
        assert rec["timed_out"] or not rec["ok"] or rec["case"] == "thread_flood", where
    else:
        assert not rec["timed_out"], (where, rec["error"])
    if rec["case"] == "signal_parent":  # the supervisor survived to report the exit status
        assert rec["ok"] and out.endswith("SURVIVED\n"), (where, out, rec["error"])
    if rec["case"] == "thread_flood" and (rec["cgroup"] or rec["isolation"] != "process"):
        started = int(out.split("threads started:")[1].split()[0])
        assert started < max_processes, (where, started)


ROOT_CONFIGS = [pytest.param(c, id=_config_id(c)) for c in OS_CONFIGS] + [
    pytest.param({"isolation": "process"}, id="process")
]


@pytest.mark.parametrize("cfg", ROOT_CONFIGS)
def test_hostile_set_is_contained(cfg, hostile_host):
    records = run_hostile_set(
        run_python, [cfg], hostile_host["cases"], hostile_host["target_dir"], hostile_host["sentinel_env"]
    )
    assert [r["case"] for r in records] == list(HOSTILE)
    for rec in records:
        _assert_contained(rec, hostile_host)


_UNPRIVILEGED_DRIVER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("sandbox_copy", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules["sandbox_copy"] = sandbox
spec.loader.exec_module(sandbox)
job = json.load(sys.stdin)
try:
    auto = sandbox.run_python("print(1)", timeout_s=5).isolation
except sandbox.SandboxUnavailableError as e:
    auto = "refused: " + str(e)
configs = [c for c in job["configs"]
           if c["isolation"] == "process" or c["isolation"] in sandbox.available_isolations()]
records = run_hostile_set(sandbox.run_python, configs, job["cases"], job["target_dir"],
                          job["sentinel_env"])
print(json.dumps({"uid": __import__("os").geteuid(), "auto": auto, "records": records,
                  "available": list(sandbox.available_isolations())}))
"""


def _nobody_python(uid: int) -> str | None:
    """An interpreter that ``nobody`` can run (this one lives under /root, 0700, here)."""
    for cand in dict.fromkeys([sys.executable, "/usr/bin/python3", shutil.which("python3")]):
        try:
            if (
                cand
                and subprocess.run(
                    [cand, "-c", "import ctypes, dataclasses, json"],
                    user=uid,
                    group=uid,
                    extra_groups=[],
                    cwd="/",
                    env={},
                    capture_output=True,
                ).returncode
                == 0
            ):
                return cand
        except PermissionError:  # the interpreter itself is out of nobody's reach
            continue
    return None


@pytest.mark.skipif(
    os.geteuid() != 0,
    reason="needs root to become nobody; unprivileged already, the other tests run as this user",
)
def test_hostile_set_is_contained_as_an_unprivileged_user(hostile_host):
    # The repository and this venv may not be readable by nobody (here: under /root, 0700):
    # the two stdlib-only sandbox files are copied to a world-readable folder and run with an
    # interpreter nobody can read (the machine's python3 where this one is not).
    uid = pwd.getpwnam("nobody").pw_uid
    python = _nobody_python(uid)
    if python is None:
        pytest.skip("no Python interpreter readable by nobody")
    code_dir = os.path.join(hostile_host["base"], "code")
    os.mkdir(code_dir)
    for src in (sandbox._THIS_FILE, sandbox._SYSCALL_FILTER_FILE):
        shutil.copy(src, code_dir)
    os.chmod(code_dir, 0o755)
    configs = [{"isolation": "userns"}, {"isolation": "userns", "audit": False}, {"isolation": "process"}]
    driver = inspect.getsource(run_hostile_set) + _UNPRIVILEGED_DRIVER
    job = {
        "configs": configs,
        "cases": hostile_host["cases"],
        "target_dir": hostile_host["target_dir"],
        "sentinel_env": hostile_host["sentinel_env"],
    }
    proc = subprocess.run(
        [python, "-I", "-c", driver, os.path.join(code_dir, "sandbox.py")],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        user=uid,
        group=uid,
        extra_groups=[],
        cwd="/",
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["uid"] == uid != 0
    userns = "userns" in report["available"]
    assert userns == HAS_USERNS  # the kernel allows unprivileged user namespaces, or not
    if userns:
        assert report["auto"] == "userns"
    else:  # fail closed: nothing but process mode, and auto refuses
        assert report["auto"].startswith("refused: ") and "isolation='process'" in report["auto"]
    ran = [_config_id(r["config"]) for r in report["records"][:: len(HOSTILE)]]
    assert ran == (["userns", "userns_os_only"] if userns else []) + ["process"]
    for rec in report["records"]:
        _assert_contained(rec, hostile_host)


# --------------------------------------------------------------------------------------------
# The layers one by one
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [{"isolation": "process"}] + OS_CONFIGS[::2], ids=lambda c: c["isolation"])
def test_audit_hook_denies_constructing_code_objects(cfg):
    # hand-made bytecode can corrupt the interpreter's memory; compile() is the way to code
    fields = (
        "argcount posonlyargcount kwonlyargcount nlocals stacksize flags code consts names "
        "varnames filename name qualname firstlineno linetable exceptiontable freevars "
        "cellvars"
    )
    code = _PRELUDE + (
        "import marshal, types\nc = compile('1', 'x', 'eval')\n"
        "attempt('replace', lambda: c.replace(co_consts=(2,)) and None)\n"
        f"attempt('CodeType', lambda: types.CodeType(*[getattr(c, 'co_' + n) for n in "
        f"{fields!r}.split()]) and None)\n"
        "attempt('marshal', lambda: marshal.loads(marshal.dumps(c)) and None)\n"
        "import json, numpy\nprint(eval(c), json.dumps([1]))\n"
    )
    r = run_python(code, timeout_s=10, **cfg)
    assert r.ok, r.error
    # marshal.loads only where the hook is the only guard (process mode compiles sources then)
    marshal = "blocked: marshal PermissionError" if cfg["isolation"] == "process" else "done: marshal None"
    assert r.output.splitlines() == [
        "ATTEMPTED",
        "blocked: replace PermissionError",
        "blocked: CodeType PermissionError",
        marshal,
        "1 [1]",
    ]


def test_process_mode_denies_directory_file_descriptors():
    # inside the working directory too: the other checks would allow each of these
    code = _PRELUDE + (
        "os.mkdir('sub')\nfd = os.open('inside.txt', os.O_CREAT | os.O_WRONLY)\n"
        "attempt('open dir', lambda: os.open('sub', os.O_RDONLY))\n"
        "attempt('open runtime dir', lambda: os.open(os.path.dirname(os.__file__), os.O_RDONLY))\n"
        "attempt('mkdir dir_fd', lambda: os.mkdir('x', dir_fd=fd))\n"
        "attempt('tempdir', lambda: __import__('tempfile').mkdtemp() and None)\n"
    )
    r = run_python(code, timeout_s=5, isolation="process")
    assert r.ok, r.error
    assert r.output.splitlines() == [
        "ATTEMPTED",
        "blocked: open dir PermissionError",
        "blocked: open runtime dir PermissionError",
        "blocked: mkdir dir_fd PermissionError",
        "done: tempdir None",
    ]


SECCOMP_PROBE = (
    "import ctypes, errno, socket\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "def err(rc):\n    return 'ok' if rc == 0 else errno.errorcode[ctypes.get_errno()]\n"
    "print('ptrace', err(libc.ptrace(0, 0, 0, 0)))\n"  # PTRACE_TRACEME
    "print('keyctl', err(libc.syscall(250 if ctypes.sizeof(ctypes.c_void_p) == 8 else 288, "
    "0, -3, 0)))\n"  # KEYCTL_GET_KEYRING_ID
    "try:\n    socket.socket(socket.AF_INET)\n    print('inet ok')\n"
    "except OSError as e:\n    print('inet', errno.errorcode[e.errno])\n"
    "socket.socketpair()\nprint('unix ok')\n"
)


@pytest.mark.skipif(not (HAS_SECCOMP and OS_CONFIGS), reason="needs libseccomp and namespaces")
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="keyctl's number is x86-64's")
@pytest.mark.parametrize("cfg", OS_CONFIGS[1::2], ids=lambda c: c["isolation"])
def test_seccomp_filter_denies_what_the_namespaces_allow(cfg):
    # each probe succeeds in the namespaces without the filter (a new network namespace still
    # makes AF_INET sockets; a process may always ask to be traced)
    r = run_python(SECCOMP_PROBE, timeout_s=5, **cfg)
    assert r.ok and r.seccomp, (r.error, r.output)
    assert r.output.splitlines() == ["ptrace EPERM", "keyctl EPERM", "inet EAFNOSUPPORT", "unix ok"]


def test_seccomp_rules_depend_on_the_mode():
    ns = syscall_filter.sandbox_rules(allow_unix_sockets=True, own_pid=None)
    proc = syscall_filter.sandbox_rules(allow_unix_sockets=False, own_pid=1234)
    by_name = lambda rules, name: [r for r in rules if r.syscall == name]  # noqa: E731
    assert by_name(ns, "socket") == [syscall_filter.Rule("socket", 97, ((0, "ne", 1, 0),))]
    assert by_name(proc, "socket") == [syscall_filter.Rule("socket", 13)]  # EACCES: every one
    assert by_name(ns, "kill") == [] and by_name(proc, "kill") == [
        syscall_filter.Rule("kill", 1, ((0, "ne", 1234, 0),))
    ]
    assert {"ptrace", "mount", "keyctl", "bpf", "perf_event_open", "unshare", "setns"} <= {
        r.syscall for r in ns
    }
    with pytest.raises(ValueError, match="own_pid"):
        syscall_filter.sandbox_rules(allow_unix_sockets=False, own_pid=0)


def test_cgroup_dirs_are_found_for_v1_and_v2():
    v1_mounts = (
        "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
        "35 31 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "38 31 0:34 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
    )
    v1_own = "8:pids:/\n4:memory:/job/a b\n0::/\n"
    assert sandbox.cgroup_dirs(v1_mounts, v1_own) == {
        "memory": "/sys/fs/cgroup/memory/job/a b",
        "pids": "/sys/fs/cgroup/pids",
    }
    v2_mounts = "30 23 0:26 /outer /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"
    assert sandbox.cgroup_dirs(v2_mounts, "0::/outer/user.slice\n") == {
        "memory": "/sys/fs/cgroup/user.slice",
        "pids": "/sys/fs/cgroup/user.slice",
    }
    assert sandbox.cgroup_dirs(v2_mounts, "0::/elsewhere\n") == {}  # not below the mount
    assert sandbox.cgroup_dirs("", v1_own) == {}


def test_remounts_keep_the_flags_a_user_namespace_cannot_clear():
    assert sandbox.kept_mount_flags(0) == 0
    nosuid_nodev_noexec_relatime = 2 | 4 | 8 | 4096
    assert sandbox.kept_mount_flags(nosuid_nodev_noexec_relatime | 1) == 2 | 4 | 8 | (1 << 21)


HAS_CGROUP = bool(sandbox._writable_cgroup_dirs())


@pytest.mark.skipif(not (HAS_CGROUP and OS_CONFIGS), reason="needs a writable cgroup tree")
def test_cgroup_limits_the_memory_of_all_processes_together(monkeypatch):
    created = []
    make = sandbox._create_run_cgroup
    monkeypatch.setattr(sandbox, "_create_run_cgroup", lambda *a: created.extend(make(*a)) or list(created))
    # four processes of 150 MB each stay under RLIMIT_AS (256 MB each) but not under the run's
    # cgroup (256 + 32 + 64 MB in all): the kernel kills one of them
    code = (
        "import os, time\npids = []\nfor _ in range(4):\n    pid = os.fork()\n"
        "    if pid == 0:\n        b = b'x' * (150 * 1024 * 1024)\n        time.sleep(1)\n"
        "        os._exit(0)\n    pids.append(pid)\n"
        "print(sorted(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids))\n"
    )
    r = run_python(code, timeout_s=10, memory_mb=256, isolation=OS_CONFIGS[0]["isolation"], audit=False)
    assert r.ok and r.cgroup, r.error
    assert ast.literal_eval(r.output)[0] == -9, r.output  # SIGKILL from the cgroup's OOM killer
    assert created and not any(os.path.exists(d) for d in created)  # removed after the run


@pytest.mark.skipif(
    not (HAS_CGROUP and HAS_USERNS and os.geteuid() == 0),
    reason="needs root, user namespaces and a writable cgroup tree",
)
def test_cgroup_limits_processes_where_rlimit_nproc_cannot():
    # userns mode as root maps to the host's root, which RLIMIT_NPROC never limits: the pids
    # controller is what stops the flood here
    code = (
        "import os, time\nn = 0\nfor _ in range(50):\n    try:\n        if os.fork() == 0:\n"
        "            time.sleep(5)\n            os._exit(0)\n        n += 1\n"
        "    except OSError:\n        pass\nprint(n, flush=True)\nos._exit(0)\n"
    )
    r = run_python(code, timeout_s=10, max_processes=8, isolation="userns", audit=False)
    assert r.ok and r.cgroup, r.error
    assert int(r.output) < 8, r.output


CAPABILITY_PROBE = (
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "header = (ctypes.c_uint32 * 2)(0x20080522, 0)\ndata = (ctypes.c_uint32 * 6)()\n"
    "assert libc.capget(header, data) == 0\n"
    "print([data[i] | data[i + 3] << 32 for i in range(3)], libc.prctl(39, 0, 0, 0, 0))\n"
)


@pytest.mark.parametrize("cfg", OS_CONFIGS[1::2] + [{"isolation": "process", "audit": False}], ids=_config_id)
def test_user_code_holds_no_capabilities(cfg):
    # effective, permitted, inheritable all empty, and no_new_privs set: in userns mode the code
    # runs as the namespace's uid 0, and in process mode possibly as the host's root
    r = run_python(CAPABILITY_PROBE, timeout_s=5, **cfg)
    assert r.ok, r.error
    assert r.output == "[0, 0, 0] 1\n"
