"""Hostile-code tests of the PythonInterpreter sandbox. Short limits keep them fast and safe."""

import ast
import os
import resource
import socket
import time

import pytest

from jaxllm.agent import sandbox

HAS_NS = sandbox.namespaces_available()
# Every configuration the host supports: the default ("auto"), and each layer on its own where
# that can be tested (namespace mode with the audit hook off shows the OS layer alone).
CONFIGS = [pytest.param({}, id="default")]
if HAS_NS:
    CONFIGS.append(pytest.param({"isolation": "namespace", "audit": False}, id="os_only"))
CONFIGS.append(pytest.param({"isolation": "process"}, id="process_audit"))


_USED_UIDS: list = []


def run_python(code, **kw):
    """``sandbox.run_python`` that records the throwaway uid each run used."""
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
    bomb = ("import os\nn = 0\nwhile True:\n    try:\n        os.fork()\n        n += 1\n"
            "    except OSError:\n        pass\n")
    t0 = time.monotonic()
    r = run_python(bomb, timeout_s=1.0, max_processes=8, **cfg)
    assert time.monotonic() - t0 < 8
    assert not r.ok and r.error
    # (the autouse fixture checks that no process of the sandbox uid survives)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_huge_allocation_fails_with_memory_error(cfg):
    r = run_python("x = bytearray(10 * 1024**3)\nprint('allocated')", timeout_s=5,
                   memory_mb=256, **cfg)
    assert not r.ok and "MemoryError" in r.error and "allocated" not in r.output


@pytest.mark.parametrize("cfg", CONFIGS)
def test_reading_host_secrets_is_denied(cfg, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    os.chmod(secret, 0o644)
    os.chmod(tmp_path, 0o755)
    for target in (str(secret), "/etc/passwd", os.path.expanduser("~/.ssh/id_rsa"),
                   "/etc/shadow"):
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
    code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "print('connected')")
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
    r = run_python("import sys\nfor _ in range(100):\n    sys.stdout.write('a' * 1_000_000)\n",
                   timeout_s=10, max_output_bytes=cap, **cfg)
    assert not r.ok and r.output_truncated and "output limit exceeded" in r.error
    assert len(r.output) == cap and set(r.output) == {"a"}


def test_disk_filling_is_limited():
    r = run_python("f = open('big', 'wb')\nfor _ in range(64):\n    f.write(b'0' * 1024**2)\n"
                   "f.close()\nprint('wrote')", timeout_s=10, disk_mb=4)
    assert not r.ok and "wrote" not in r.output
    assert "file size limit" in r.error or "No space" in r.error or "Errno" in r.error


@pytest.mark.skipif(not HAS_NS, reason="needs root and unshare")
def test_namespace_mode_hides_the_host_filesystem():
    r = run_python("import os\nprint(sorted(os.listdir('/')))\nprint(os.getcwd(), os.getuid())",
                   timeout_s=5, isolation="namespace", audit=False)
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
    r = run_python(f"import os\nprint({{d: os.listdir(d) for d in {sorted(allowed)!r}}})",
                   timeout_s=5, isolation="namespace", audit=False)
    assert r.ok, r.error
    visible = {d: set(names) for d, names in ast.literal_eval(r.output).items()}
    for d, names in allowed.items():
        assert visible[d] <= names, (d, visible[d] - names)
    assert set(os.listdir("/")) - visible["/"]  # the host has more, and it is hidden


@pytest.mark.skipif(not HAS_NS, reason="needs root and unshare")
def test_background_children_die_with_the_run():
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
            "print('parent done')")
    t0 = time.monotonic()
    r = run_python(code, timeout_s=5, isolation="namespace", audit=False)
    assert r.ok and r.output == "parent done\n" and time.monotonic() - t0 < 4


def test_argument_validation():
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
    code = ("import os, json, re, math, datetime, collections, itertools, fractions, decimal, "
            "statistics, random, hashlib, tempfile, io, csv, threading\n"
            "open(os.devnull, 'w').write('x')\n"
            "with tempfile.NamedTemporaryFile('w', delete=False) as f:\n    f.write('x')\n"
            "t = threading.Thread(target=lambda: print('thread ok'))\nt.start()\nt.join()\n"
            "print(len(os.urandom(8)), statistics.mean([1, 2, 3]), "
            "os.path.dirname(f.name) == os.getcwd())")
    r = run_python(code, timeout_s=5, **cfg)
    assert r.ok, r.error
    assert r.output == "thread ok\n8 2 True\n"


def test_symlink_out_of_the_workdir_is_denied(tmp_path):
    secret = tmp_path / "s.txt"
    secret.write_text("TOPSECRET")
    os.chmod(tmp_path, 0o755)
    code = f"import os\nos.symlink({str(secret)!r}, 'link')\nprint(open('link').read())"
    for cfg in ({"isolation": "process"},) + (({"isolation": "namespace", "audit": False},)
                                              if HAS_NS else ()):
        r = run_python(code, timeout_s=5, **cfg)
        assert not r.ok and "TOPSECRET" not in r.output


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uids")
def test_kill_uid_kills_processes_that_left_the_process_group():
    import subprocess

    uid = sandbox._UID_BASE + 999_999
    procs = [subprocess.Popen(["/bin/sh", "-c", "sleep 60"], user=uid, group=uid,
                              extra_groups=[], start_new_session=True, cwd="/")
             for _ in range(3)]
    assert len(sandbox._live_pids_of_uid(uid)) >= 3
    t0 = time.monotonic()
    assert sandbox._kill_uid(uid)
    assert time.monotonic() - t0 < 3
    assert [p.wait(timeout=5) for p in procs] == [-9, -9, -9]
    assert sandbox._live_pids_of_uid(uid) == []


@pytest.mark.skipif(not HAS_NS, reason="needs root and unshare")
def test_user_process_has_no_way_back_to_privileges():
    code = ("import ctypes, os\nlibc = ctypes.CDLL('libc.so.6', use_errno=True)\n"
            "print(libc.prctl(39, 0, 0, 0, 0))\n"           # PR_GET_NO_NEW_PRIVS
            "print(libc.unshare(0x10000000))\n"             # CLONE_NEWUSER: refused when chrooted
            "print(libc.unshare(0x00020000))\n"             # CLONE_NEWNS: needs CAP_SYS_ADMIN
            "try:\n    os.chroot('.')\nexcept PermissionError:\n    print('chroot denied')\n")
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
    code = ("import os\nprint(os.getuid())\n"
            "path = os.path.join(os.environ['TMPDIR'], 'f.txt')\n"
            "with open(path, 'w') as f:\n    f.write('x')\n"
            "print(os.path.dirname(path) == os.getcwd() and os.listdir('.') == ['f.txt'])\n"
            f"try:\n    open({str(secret)!r}).read()\nexcept PermissionError:\n"
            "    print('denied by the OS')\n")
    r = run_python(code, timeout_s=5, isolation="process", audit=False)
    assert r.ok, r.error
    uid, same_dir, denied = r.output.splitlines()
    assert int(uid) == r.uid and r.uid >= sandbox._UID_BASE
    assert same_dir == "True" and denied == "denied by the OS"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uids")
def test_process_mode_fork_bomb_and_escaped_children_are_killed(monkeypatch):
    monkeypatch.setattr(sandbox, "_runtime_world_readable", lambda: True)
    bomb = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
            "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    r = run_python(bomb, timeout_s=1.0, isolation="process", audit=False, max_processes=8)
    assert not r.ok and r.timed_out and r.uid is not None
    # the autouse fixture checks that no process of r.uid is left, the setsid child included


def test_audit_hook_blocks_unaudited_process_spawning():
    # _posixsubprocess.fork_exec raises no audit event: it must be neither loaded nor importable
    code = ("import sys\nprint('_posixsubprocess' in sys.modules, 'subprocess' in sys.modules)\n"
            "for name in ('_posixsubprocess', 'subprocess', 'multiprocessing'):\n"
            "    try:\n        __import__(name)\n        print(name, 'imported')\n"
            "    except PermissionError:\n        print(name, 'denied')\n")
    r = run_python(code, timeout_s=5, isolation="process")
    assert r.ok, r.error
    assert r.output.splitlines() == ["False False", "_posixsubprocess denied",
                                     "subprocess denied", "multiprocessing denied"]


def test_audit_hook_survives_rebinding_globals_and_threads():
    code = ("import sys, threading\nmain = sys.modules['__main__']\n"
            "for name in ('_DENY_PREFIXES', '_PATH_EVENTS', '_DENY_IMPORTS'):\n"
            "    setattr(main, name, type(getattr(main, name))())\n"
            "open('ok.txt', 'w').write('ok')\nleaks, oks = [], []\n"
            "def grab():\n    for _ in range(300):\n        oks.append(open('ok.txt').read())\n"
            "        try:\n            leaks.append(open('/etc/passwd').read())\n"
            "        except PermissionError:\n            pass\n"
            "ts = [threading.Thread(target=grab) for _ in range(3)]\n"
            "[t.start() for t in ts]\n[t.join() for t in ts]\nprint(len(leaks), len(oks))\n"
            "try:\n    import socket\n    socket.socket()\n    print('socket created')\n"
            "except PermissionError:\n    print('socket denied')\n")
    r = run_python(code, timeout_s=10, isolation="process")
    assert r.output.splitlines() == ["0 900", "socket denied"], (r.output, r.error)


def test_audit_hook_fails_closed_when_builtins_are_broken():
    # the stdlib helpers the hook calls (realpath) use builtins; breaking them makes the hook
    # raise, which aborts the audited operation instead of allowing it
    code = ("import builtins\nbuiltins.isinstance = lambda *a: True\n"
            "try:\n    data = open('/etc/passwd').read()\nexcept BaseException:\n    data = ''\n"
            "import os\nos.write(1, b'leaked' if 'root' in data else b'contained')\n")
    r = run_python(code, timeout_s=5, isolation="process")
    assert r.output == "contained", (r.output, r.error)
