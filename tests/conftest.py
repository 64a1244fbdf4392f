import os
import pathlib

# Compiling, not running, is most of this suite's time on CPU: the programs are small but many.
# LLVM -O0 compiles them about 3x faster (the HLO passes, fusions included, are unchanged). Set
# before JAX starts, and inherited by the subprocesses tests start (they append their own flags).
# Two checks keep the default optimization level, as users run it: the XLA:CPU crash reproducer
# (tests/kernels/test_kda_xla_cpu.py) and the quickstart notebook. A level the user set is kept.
USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
os.environ["JAXLLM_USER_XLA_FLAGS"] = USER_XLA_FLAGS
if "--xla_backend_optimization_level" not in USER_XLA_FLAGS:
    os.environ["XLA_FLAGS"] = f"{USER_XLA_FLAGS} --xla_backend_optimization_level=0".strip()

# libtpu (the `[tpu-aot]` extra: TPU compile checks without a chip) holds /tmp/libtpu_lockfile for
# the life of the process that loads it; a second process (another xdist worker, another session's
# run) then fails with "ABORTED: ... libtpu multi-process lockfile". Compiling needs no chip, so
# let several processes load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402

# The README runs the suite with `-n 2 --dist loadscope`: each module stays on one worker, so a
# costly module fixture (multi-host runs, CLI workdirs) is built once, not once per worker.
# (`--dist loadgroup` with xdist_group marks would be narrower, but pytest-xdist 3.8 under
# pytest 9.2 ignores the marks.)

GOLDEN = pathlib.Path(__file__).parent / "golden"
FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture
def golden_dir():
    return GOLDEN
