"""The chunk op's backward on XLA:CPU: no YNNPACK reduce fusion inside a conditional branch.

jaxlib 0.10.x runs reduce fusions through YNNPACK, and one that sits in a `lax.cond` branch
crashes the process (SIGSEGV in YNNPACK's transpose) on some x86 CPUs (seen on AMD Zen 2 and
Zen 3, not on the Intel machines the suite first ran on). The chunk op's VJP runs under
`lax.cond` (`_select_by_span`), so its reductions are written as dots (docs/kda.md, "XLA:CPU").

Two checks: the reproducer runs in a subprocess and must exit 0 (a crash would otherwise take the
test worker down with it), and the compiled HLO -- the same on every CPU -- must hold no YNN
fusion with a reduce in any computation reachable from a conditional branch, so a regression is
caught on machines that would not crash.
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

YNN_KIND = '"kind":"__ynn_fusion"'
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$")
_CALLEE = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_OPCODE = re.compile(r"= \S+ ([\w\-]+)\(")


def computations(hlo_text: str) -> dict[str, list[str]]:
    """Instruction lines of each computation of an HLO module's text, by name."""
    out, current = {}, None
    for line in hlo_text.splitlines():
        m = _HEADER.match(line)
        if m:
            current = out.setdefault(m.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    return out


def _callees(line: str) -> list[str]:
    names = _CALLEE.findall(line)
    for group in _BRANCHES.findall(line):
        names += [b.strip().lstrip("%") for b in group.split(",")]
    return names


def reduce_fusions_under_conditionals(hlo_text: str) -> list[str]:
    """YNN fusions that contain a reduce and run inside a conditional branch (at any depth)."""
    comps = computations(hlo_text)
    todo = [
        b for lines in comps.values() for line in lines if " conditional(" in line for b in _callees(line)
    ]
    seen, bad = set(), []
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            callees = _callees(line)
            if YNN_KIND in line and any(
                "reduce" in _OPCODE.findall(body_line) for c in callees for body_line in comps.get(c, [])
            ):
                op = re.search(r'op_name="([^"]*)"', line)
                bad.append(f"{line.split('=')[0].strip()} in {name}: {op.group(1) if op else line.strip()}")
            todo += callees
    return bad


# The crash report's reproducer: the jitted VJP of the varlen golden case, with the gates scaled
# by a traced factor so that one compiled program runs both span tiers (x30 pushes every chunk past
# SAFE_SPAN onto the sub-chunk and pairwise paths). It writes the compiled HLO before running it.
REPRODUCER = """
import sys, numpy as np, jax, jax.numpy as jnp
from pallas_kernels.kda import kda
case, hlo_path = np.load(sys.argv[1]), sys.argv[2]
cu = jnp.asarray(case["cu_seqlens"])

def f(scale, q, k, v, g, beta, h0):
    return kda(q, k, v, g * scale, beta, initial_state=h0, output_final_state=True,
               cu_seqlens=cu, use_qk_l2norm=True, impl="chunk")

def grads(scale, args, do, dht):
    return jax.vjp(lambda *a: f(scale, *a), *args)[1]((do, dht))

args = [jnp.asarray(case[n]) for n in ("q", "k", "v", "g", "beta", "h0")]
rest = (args, jnp.asarray(case["do"]), jnp.asarray(case["dht"]))
compiled = jax.jit(grads).lower(jnp.float32(1.0), *rest).compile()
with open(hlo_path, "w") as fh:
    fh.write(compiled.as_text())
for scale in (1.0, 30.0):
    out = compiled(jnp.float32(scale), *rest)
    assert all(np.isfinite(np.asarray(x)).all() for x in out), scale
print("ok")
"""


def test_hlo_scan_finds_a_reduce_fusion_in_a_branch():
    """The scanner itself: a reduce inside a cond branch is found whenever this jaxlib fuses
    reduces through YNNPACK, and nothing is reported for the same sum written as a dot."""
    x = jnp.ones((4, 16, 64))

    def with_reduce(x):
        return jax.lax.cond(
            x[0, 0, 0] > 0, lambda y: jnp.sum(y * 2.0, axis=1), lambda y: jnp.sum(y, axis=1), x
        )

    def with_dot(x):
        ones = jnp.ones(x.shape[1], x.dtype)
        return jax.lax.cond(
            x[0, 0, 0] > 0,
            lambda y: jnp.einsum("bcx,c->bx", y * 2.0, ones),
            lambda y: jnp.einsum("bcx,c->bx", y, ones),
            x,
        )

    reduce_text = jax.jit(with_reduce).lower(x).compile().as_text()
    assert reduce_fusions_under_conditionals(jax.jit(with_dot).lower(x).compile().as_text()) == []
    if YNN_KIND not in reduce_text:
        pytest.skip(f"jaxlib {jax.__version__} does not fuse reduces through YNNPACK here")
    assert reduce_fusions_under_conditionals(reduce_text)


def test_backward_runs_and_has_no_reduce_fusion_in_a_branch(golden_dir, tmp_path):
    hlo = tmp_path / "kda_bwd.hlo.txt"
    # With the XLA flags the user started the suite with, not the suite's -O0 (tests/conftest.py).
    env = dict(os.environ, XLA_FLAGS=os.environ.get("JAXLLM_USER_XLA_FLAGS", os.environ.get("XLA_FLAGS", "")))
    proc = subprocess.run(
        [sys.executable, "-c", REPRODUCER, str(golden_dir / "kda" / "kda_varlen.npz"), str(hlo)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # The HLO holds for every CPU: checked first, so a regression is named even where it crashes.
    assert hlo.exists(), f"did not compile (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    bad = reduce_fusions_under_conditionals(hlo.read_text())
    assert not bad, "YNN reduce fusions inside conditional branches:\n" + "\n".join(bad[:10])
    assert proc.returncode == 0 and "ok" in proc.stdout, (
        f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
