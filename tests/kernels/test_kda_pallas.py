"""KDA Pallas kernels (TPU/Mosaic and GPU/Triton) in interpret mode against golden data and the
lax.scan recurrence: outputs, final state and all six gradients.

One test class, run once per kernel (the way JAX's own Pallas suite re-runs a class in interpret
mode). Accuracy as fla reports it: rms(ref - impl) / rms(ref), float32 bound 1e-4.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import importlib.util
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import topologies
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AbstractDevice, AbstractMesh, SingleDeviceSharding, use_abstract_mesh

from pallas_kernels.kda import _pallas_math as pm
from pallas_kernels.kda import kda, tpu
from pallas_kernels.kda.gpu import kda_pallas_gpu, state_block_v
from pallas_kernels.kda.reference import kda_recurrent
from pallas_kernels.kda.tpu import VMEM_LIMIT as TPU_VMEM_LIMIT
from pallas_kernels.kda.tpu import head_block as tpu_head_block
from pallas_kernels.kda.tpu import kda_pallas_tpu

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOL = 1e-4  # float32
TOL_BF16_OUT = 8e-3  # values that are rounded to bfloat16 on the way out (2^-8 = 3.9e-3)
# precision="default" (bf16 matmul operands, f32 accumulation): every value, f32 ones included
# (final state, dg, dbeta, dh0), within this of the f32 reference; measured 1.8e-3 .. 5e-3
# (docs/kernels.md), 2e-7 .. 2e-6 for the f32 values under "highest"
TOL_DEFAULT_PRECISION = 1e-2

# Through the public dispatcher, so the impl= / interpret= wiring is what is tested.
KERNELS = {
    "pallas_tpu": functools.partial(kda, impl="pallas_tpu", interpret=True),
    "pallas_gpu": functools.partial(kda, impl="pallas_gpu", interpret=True),
}
GRAD_NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0")


def rel_err(ref, got):
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    assert ref.shape == got.shape, (ref.shape, got.shape)
    assert np.all(np.isfinite(got)), "non-finite values"
    return float(np.sqrt(np.mean((ref - got) ** 2)) / (np.sqrt(np.mean(ref**2)) + 1e-30))


def value_and_grads(fn, inputs, do, dht, cu_seqlens=None, segment_ids=None, **kw):
    """(o, ht, grads of sum(o*do) + sum(ht*dht) w.r.t. q,k,v,g,beta,h0), jitted; cu_seqlens traced."""

    def loss(q, k, v, g, beta, h0, cu, seg):
        o, ht = fn(
            q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu, segment_ids=seg, **kw
        )
        val = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)) + jnp.sum(ht * dht)
        return val, (o, ht)

    grad_fn = jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True))
    grads, (o, ht) = grad_fn(*inputs, cu_seqlens, segment_ids)
    return o, ht, grads


def random_case(seed, B, T, H, K, V, *, n_seq=None, min_log_decay=-1.0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    N = B if n_seq is None else n_seq
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    q, k = f(B, T, H, K), f(B, T, H, K)
    v = f(B, T, H, V)
    # per-step log decay in [min_log_decay, 0], a quarter of the entries at the extreme end
    u = rng.uniform(size=(B, T, H, K)).astype(np.float32)
    g = np.where(rng.uniform(size=u.shape) < 0.25, min_log_decay * (0.9 + 0.1 * u), -0.1 * u)
    beta = (1.0 / (1.0 + np.exp(-f(B, T, H)))).astype(np.float32)
    h0 = 0.5 * f(N, H, K, V)
    do, dht = f(B, T, H, V), f(N, H, K, V)
    cast = lambda x: jnp.asarray(x).astype(dtype)
    inputs = (
        cast(q),
        cast(k),
        cast(v),
        jnp.asarray(g.astype(np.float32)),
        jnp.asarray(beta),
        jnp.asarray(h0),
    )
    return inputs, cast(do), jnp.asarray(dht)


@pytest.fixture(params=sorted(KERNELS))
def kernel_name(request):
    return request.param


@pytest.fixture
def kernel(kernel_name):
    return KERNELS[kernel_name]


class TestKDAPallas:
    """Each test runs for `pallas_tpu` and `pallas_gpu`, both in Pallas interpret mode."""

    @pytest.mark.parametrize("case", ["kda_basic", "kda_nonorm_zero_state", "kda_varlen"])
    def test_golden(self, kernel, golden_dir, case):
        d = dict(np.load(golden_dir / "kda" / f"{case}.npz"))
        inputs = tuple(jnp.asarray(d[n]) for n in ("q", "k", "v", "g", "beta", "h0"))
        cu = jnp.asarray(d["cu_seqlens"]) if "cu_seqlens" in d else None
        o, ht, grads = value_and_grads(
            kernel,
            inputs,
            jnp.asarray(d["do"]),
            jnp.asarray(d["dht"]),
            cu,
            scale=float(d["scale"]),
            use_qk_l2norm=bool(d["use_qk_l2norm"]),
        )
        assert rel_err(d["o"], o) <= TOL
        assert rel_err(d["ht"], ht) <= TOL
        for name, grad in zip(GRAD_NAMES, grads):
            assert rel_err(d[name], grad) <= TOL, name

    def _check_against_recurrent(
        self, kernel, inputs, do, dht, cu=None, seg=None, tol_out=TOL, tol_f32=TOL, precision="highest", **kw
    ):
        """tol_out bounds o and the gradients of bf16 inputs, tol_f32 the float32 values; `precision`
        goes to the kernel only (the reference is the float32 recurrence)."""
        ref = value_and_grads(kda_recurrent, inputs, do, dht, cu, seg, **kw)
        got = value_and_grads(kernel, inputs, do, dht, cu, seg, precision=precision, **kw)
        assert got[0].dtype == inputs[2].dtype and got[0].shape == ref[0].shape
        assert got[1].dtype == jnp.float32
        assert rel_err(ref[0], got[0]) <= tol_out, "o"
        assert rel_err(ref[1], got[1]) <= tol_f32, "final state"
        for name, x, r, g in zip(GRAD_NAMES, inputs, ref[2], got[2]):
            assert g.dtype == x.dtype, name
            bound = tol_out if x.dtype == jnp.bfloat16 else tol_f32
            assert rel_err(r, g) <= bound, name

    def test_extreme_gates_ragged_length(self, kernel):
        # per-step log decay down to -20 (exp(-20*16) underflows: any exp(+G) would overflow),
        # T = 80: one full chunk plus a padded one
        inputs, do, dht = random_case(1, B=2, T=80, H=2, K=32, V=16, min_log_decay=-20.0)
        self._check_against_recurrent(kernel, inputs, do, dht, use_qk_l2norm=True)

    def test_short_sequence_odd_dims(self, kernel):
        # T < 64 (a single padded chunk); K, V not powers of two (the GPU kernel pads them)
        inputs, do, dht = random_case(2, B=1, T=37, H=2, K=24, V=20, min_log_decay=-5.0)
        q, k = inputs[0] / 5.0, inputs[1] / 5.0  # no L2 norm: keep |k| ~ 1
        self._check_against_recurrent(kernel, (q, k) + inputs[2:], do, dht, scale=0.3)

    def test_varlen(self, kernel):
        # 5 packed sequences (one empty, one spanning 2 chunks), cu_seqlens traced under jit
        cu = jnp.asarray([0, 9, 9, 79, 100, 130], jnp.int32)
        inputs, do, dht = random_case(3, B=1, T=130, H=2, K=16, V=32, n_seq=5, min_log_decay=-8.0)
        self._check_against_recurrent(kernel, inputs, do, dht, cu, use_qk_l2norm=True)

    def test_segment_ids(self, kernel):
        # in-row resets: mid-chunk, exactly at the chunk boundary (t=64), a 1-token segment,
        # none in row 1; ids traced under jit
        seg = np.zeros((2, 100), np.int32)
        seg[0, 10:] += 1
        seg[0, 64:] += 1
        seg[0, 65:] += 1
        seg[0, 90:] += 1
        inputs, do, dht = random_case(7, B=2, T=100, H=2, K=16, V=16, min_log_decay=-6.0)
        self._check_against_recurrent(kernel, inputs, do, dht, seg=jnp.asarray(seg), use_qk_l2norm=True)

    @pytest.mark.parametrize("precision", ["highest", "default"])
    def test_bf16_inputs(self, kernel, precision):
        # bf16 q/k/v (f32 gates, beta, state): o and dq/dk/dv come back in bf16. precision="default"
        # (bf16 matmul operands) has its own bound, for the f32 values too
        inputs, do, dht = random_case(4, B=1, T=70, H=2, K=16, V=16, min_log_decay=-3.0, dtype=jnp.bfloat16)
        tol = {"highest": (TOL_BF16_OUT, TOL), "default": (TOL_DEFAULT_PRECISION, TOL_DEFAULT_PRECISION)}
        tol_out, tol_f32 = tol[precision]
        self._check_against_recurrent(
            kernel, inputs, do, dht, tol_out=tol_out, tol_f32=tol_f32, precision=precision, use_qk_l2norm=True
        )

    def test_without_final_state(self, kernel):
        inputs, _, _ = random_case(5, B=1, T=20, H=1, K=16, V=16)
        o, ht = kernel(*inputs[:5], use_qk_l2norm=True)
        o_ref, _ = kda_recurrent(*inputs[:5], use_qk_l2norm=True)
        assert ht is None
        assert rel_err(o_ref, o) <= TOL

    def test_bad_input_is_rejected(self, kernel):
        inputs, _, _ = random_case(6, B=1, T=8, H=1, K=16, V=16)
        with pytest.raises(ValueError, match="beta"):
            kernel(*inputs[:4], inputs[4][..., None])
        with pytest.raises(ValueError, match="precision must be one of"):
            kernel(*inputs[:5], precision="bf16")

    @pytest.mark.parametrize("mode", ["segment_ids", "cu_seqlens"])
    def test_lowers_for_hardware(self, kernel_name, mode):
        """Forward+backward lower through the real Pallas lowering (Mosaic TPU / Triton) on CPU,
        and each launch has the grid, order and tiles the kernel is designed for.

        `jax.export` for platform tpu / cuda runs the kernel lowering to Mosaic / Triton IR, which
        interpret mode skips. The launches are read back from the lowered module: per Mosaic
        kernel the grid, its dimension semantics, the VMEM windows (so a VMEM budget can be
        checked); per Triton kernel the name and grid. Where libtpu is importable the TPU kernels
        are also compiled for a v5e through its compile-only AOT path (real Mosaic: layouts and
        VMEM limits); PTX still needs a GPU.

        The Triton lowering needs a GPU's compute capability. With no GPU present, jax 0.10 falls
        back to 9.0 on its own; jax >= 0.12 raises "No supported GPU devices found" unless the
        target is named by an abstract GPU device in the current abstract mesh, which is JAX's AOT
        route (`jax.sharding.use_abstract_mesh`). We name an H100 (compute capability 9.0, the
        same target jax 0.10 falls back to), so both versions lower the same kernels for the
        same target. (The capability only changes float8 casts, which these kernels do not use.)
        """
        # Distinct B, H and chunk counts so a transposed or shortened grid shows.
        B, T, H, K, V = (2, 256, 3, 128, 128) if mode == "segment_ids" else (1, 200, 2, 128, 128)
        # cu_seqlens is traced, so the chunk-aligned layout is sized for the worst case: every one
        # of the N sequences may waste up to 63 slots of its last chunk.
        N = B if mode == "segment_ids" else 3
        # bf16 matmul operands (and bf16 saved states) in one mode, float32 ones in the other
        precision = "default" if mode == "segment_ids" else "highest"
        NC = T // 64 if mode == "segment_ids" else (T + N * 63) // 64
        S = min(tpu.STATE_STRIDE, NC)  # the TPU kernels: whole groups of chunks that share a saved state
        if kernel_name == "pallas_tpu":
            NC = -(-NC // S) * S
        platform = {"pallas_tpu": "tpu", "pallas_gpu": "cuda"}[kernel_name]
        fn = {"pallas_tpu": kda_pallas_tpu, "pallas_gpu": kda_pallas_gpu}[kernel_name]
        disabled = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        sds = jax.ShapeDtypeStruct
        bf16, f32 = jnp.bfloat16, jnp.float32

        def loss(q, k, v, g, beta, h0, ids):
            kw = {mode: ids}
            o, ht = fn(
                q,
                k,
                v,
                g,
                beta,
                initial_state=h0,
                output_final_state=True,
                use_qk_l2norm=True,
                precision=precision,
                **kw,
            )
            return jnp.sum(o.astype(f32)) + jnp.sum(ht)

        ids = sds((B, T), jnp.int32) if mode == "segment_ids" else sds((N + 1,), jnp.int32)
        args = (
            sds((B, T, H, K), bf16),
            sds((B, T, H, K), bf16),
            sds((B, T, H, V), bf16),
            sds((B, T, H, K), f32),
            sds((B, T, H), f32),
            sds((N, H, K, V), f32),
            ids,
        )
        grad_fn = jax.jit(jax.grad(loss, argnums=tuple(range(6))))
        target = contextlib.nullcontext()
        if platform == "cuda":
            h100 = AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
            target = use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=h100))
        with target:
            exported = export.export(grad_fn, platforms=[platform], disabled_checks=disabled)(*args)
        text = exported.mlir_module()
        if platform == "tpu":
            launches = {kern["name"]: kern for kern in _mosaic_kernels(text)}
            assert sorted(launches) == ["kda_chunk_bwd_tpu", "kda_chunk_fwd_tpu"]
            HB = tpu_head_block(H)
            for kern in launches.values():
                assert kern["grid"] == [B, H // HB, NC], kern["name"]
                # the state is carried along the chunk axis: it must run in order on one core
                assert kern["semantics"] == ["parallel", "parallel", "arbitrary"], kern["name"]
                # q/k/v windows: one chunk of HB heads, read from the token-major [B,T,H,K] layout
                assert [64, HB, K] in [w[-3:] for w in kern["windows"]], kern["name"]
                if kern["name"] == "kda_chunk_bwd_tpu":  # and the group's q/k/v/g for the recompute
                    assert [64 * S, HB, K] in [w[-3:] for w in kern["windows"]]
                # double-buffered windows + scratch within the scoped VMEM the kernels ask for
                assert kern["vmem_bytes"] < TPU_VMEM_LIMIT, (kern["name"], kern["vmem_bytes"])
            if importlib.util.find_spec("libtpu") is not None:
                _compile_for_v5e(grad_fn, args)
        else:
            launches = _triton_kernels(text)
            BV = 16  # B * H <= 6: V split as finely as Triton's dots allow (gpu.state_block_v)
            want = [
                ("kda_chunk_intra_gpu", [B, H, NC]),
                ("kda_state_fwd_gpu", [B, H, V // BV]),
                ("kda_chunk_intra_gpu", [B, H, NC]),
                ("kda_state_bwd_gpu", [B, H, V // BV]),
                ("kda_state_grads_gpu", [B, H, NC]),
                ("kda_chunk_grads_gpu", [B, H, NC]),
            ]
            assert sorted(launches) == sorted(want)


def _mosaic_kernels(module_text):
    """The Mosaic kernels of a lowered module: name, grid, dimension semantics, VMEM windows and an
    estimate of their VMEM use (windows twice for double buffering, scratch once)."""
    # JAX internals (the Mosaic dialect and its payload format), so imported only here
    from jax._src.interpreters import mlir  # noqa: PLC0415 (JAX internals: only this helper breaks if they move)
    from jax._src.lib import tpu  # noqa: PLC0415 (JAX internals, as above)
    from jaxlib.mlir import ir  # noqa: PLC0415 (JAX internals, as above)
    from jaxlib.mlir.passmanager import PassManager  # noqa: PLC0415 (JAX internals, as above)

    out = []
    for m in re.finditer(r'backend_config = "(\{\\22custom_call_config.*?)"', module_text):
        config = json.loads(m.group(1).replace("\\22", '"'))
        body = base64.b64decode(config["custom_call_config"]["body"])
        ctx = mlir.make_ir_context()
        tpu.register_dialect(ctx)
        with ctx, ir.Location.unknown():
            ctx.allow_unregistered_dialects = True  # the serialised payload says `stable_mosaic`
            kernel = ir.Module.parse(body)
            # the payload is versioned (serialised); upgrade it to the current dialect to read it
            PassManager.parse("builtin.module(mosaic-serde{serialize=false})").run(kernel.operation)
            head = next(line for line in str(kernel).splitlines() if "iteration_bounds" in line)
        itemsize = {"bf16": 2, "f32": 4, "i32": 4}
        nbytes = [
            math.prod(int(d) for d in dims.rstrip("x").split("x")) * itemsize[dt]
            for dims, dt in re.findall(r"memref<((?:\d+x)+)(\w+), #tpu.memory_space<vmem>>", head)
        ]
        n_scratch = int(re.search(r"scratch_operands = (\d+)", head).group(1))
        out.append(
            {
                "name": re.search(r"func\.func @(\w+)\(", head).group(1),
                "grid": [
                    int(x)
                    for x in re.search(r"iteration_bounds = array<i64: ([\d, ]+)>", head).group(1).split(",")
                ],
                "semantics": re.findall(r"#tpu\.dimension_semantics<(\w+)>", head),
                "windows": [
                    [int(x) for x in w.split(",")]
                    for w in re.findall(r"window_bounds = array<i64: ([\d, ]+)>", head)
                ],
                "vmem_bytes": 2 * sum(nbytes[: len(nbytes) - n_scratch])
                + sum(nbytes[len(nbytes) - n_scratch :]),
            }
        )
    return out


def _triton_kernels(module_text):
    """(name, [grid_x, grid_y, grid_z]) of every Triton launch in a lowered module."""
    out = []
    for m in re.finditer(r"xla\.gpu\.triton.*", module_text):
        call = m.group(0)
        grid = [int(re.search(rf"grid_{a} = (\d+)", call).group(1)) for a in "xyz"]
        out.append((re.search(r'name = "(\w+)"', call).group(1), grid))
    return out


def _compile_for_v5e(fn, args):
    """Compile for a TPU v5e without a chip (libtpu's compile-only devices): runs Mosaic itself, so
    layout errors and VMEM overflows fail here."""
    dev = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices[0]
    placed = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=SingleDeviceSharding(dev)) for a in args]
    text = fn.lower(*placed).compile().as_text()
    assert "kda_chunk_fwd_tpu" in text and "kda_chunk_bwd_tpu" in text


def test_tpu_megacore_no_races(golden_dir):
    """TPU only (megacore has no GPU counterpart): two simulated TensorCores share the "parallel"
    batch/head axes; the interpreter's race detector must find nothing, results must not change."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret  # noqa: PLC0415 (JAX internals)

    params = pltpu.InterpretParams(num_cores_or_threads=2, detect_races=True)
    fn = functools.partial(kda_pallas_tpu, interpret=params)
    d = dict(np.load(golden_dir / "kda" / "kda_varlen.npz"))
    inputs = tuple(jnp.asarray(d[n]) for n in ("q", "k", "v", "g", "beta", "h0"))
    o, ht, grads = value_and_grads(
        fn,
        inputs,
        jnp.asarray(d["do"]),
        jnp.asarray(d["dht"]),
        jnp.asarray(d["cu_seqlens"]),
        scale=float(d["scale"]),
        use_qk_l2norm=bool(d["use_qk_l2norm"]),
    )
    assert not tpu_interpret.races.races_found
    assert rel_err(d["o"], o) <= TOL and rel_err(d["ht"], ht) <= TOL
    for name, grad in zip(GRAD_NAMES, grads):
        assert rel_err(d[name], grad) <= TOL, name


def test_tpu_head_blocks(monkeypatch):
    """TPU only: a grid step walks a block of heads (`tpu.head_block`); with HEAD_BLOCK = 2 and
    H = 4 each row has two head blocks, so every index map's head-block term and the in-kernel
    head loop are exercised (two chunks, initial and final state, f32; K = V = 128 is
    test_kda_head128's). Mild gates (per-step log decay >= -0.1): a chunk's decay exp(gl) stays
    ~0.05, so its gradient reaches dg visibly (at the other tests' gates it is below 1e-7)."""
    monkeypatch.setattr(tpu, "HEAD_BLOCK", 2)
    assert tpu.head_block(4) == 2
    inputs, do, dht = random_case(11, B=1, T=128, H=4, K=32, V=32, min_log_decay=-0.02)
    kernel = functools.partial(kda_pallas_tpu, interpret=True)
    TestKDAPallas()._check_against_recurrent(kernel, inputs, do, dht, use_qk_l2norm=True)


def test_tpu_state_stride_varlen(monkeypatch):
    """TPU only: the forward saves the state entering every `state_stride`-th chunk, the backward
    recomputes the others from it with the forward's chunk step (issue 19 part 3). Stride 3, two
    head blocks (HEAD_BLOCK = 2, H = 4), packed sequences laid out as chunks [0 | 1 2 | 3 | 4 5 6]
    (one empty): sequences start inside a group (chunks 1 and 4, whose states come from h0 by
    DMA) and cross a group boundary (chunk 6 restarts from a saved state of a running
    sequence). Mild gates, so a wrong recomputed state shows in every gradient. A stride below 1,
    or one whose backward windows fit VMEM at no head block (32 at Kimi's shape), is refused."""
    cu = jnp.asarray([0, 40, 40, 150, 170, 300], jnp.int32)
    inputs, do, dht = random_case(12, B=1, T=300, H=4, K=16, V=16, n_seq=5, min_log_decay=-0.02)
    with pytest.raises(ValueError, match="state_stride"):
        kda_pallas_tpu(*inputs[:5], state_stride=0)
    assert tpu.head_block(32, 16) == 8  # fewer heads per step for a wide group
    with pytest.raises(ValueError, match="state_stride=32 needs"):
        tpu.head_block(32, 32)
    monkeypatch.setattr(tpu, "HEAD_BLOCK", 2)
    kernel = functools.partial(kda_pallas_tpu, interpret=True, state_stride=3)
    TestKDAPallas()._check_against_recurrent(kernel, inputs, do, dht, cu, use_qk_l2norm=True)


@pytest.mark.parametrize("precision", ["highest", "default"])
def test_tpu_state_stride_segment_ids(precision):
    """TPU only: stride 2 with in-row resets (mid-chunk, at a chunk boundary, in a recomputed
    chunk), ragged T (5 chunks padded to a whole group), initial state per row (dh0); under
    "default" the saved states are bf16 and the recomputed ones start from them."""
    seg = np.zeros((2, 300), np.int32)
    seg[0, 10:] += 1
    seg[0, 128:] += 1
    seg[1, 200:] += 1
    inputs, do, dht = random_case(13, B=2, T=300, H=2, K=16, V=16, min_log_decay=-0.02)
    kernel = functools.partial(kda_pallas_tpu, interpret=True, state_stride=2)
    tol = TOL if precision == "highest" else TOL_DEFAULT_PRECISION
    TestKDAPallas()._check_against_recurrent(
        kernel,
        inputs,
        do,
        dht,
        seg=jnp.asarray(seg),
        tol_out=tol,
        tol_f32=tol,
        precision=precision,
        use_qk_l2norm=True,
    )


def test_gpu_state_passes_fill_the_card():
    """The GPU state passes split V so that B * H * V / slice reaches ~one program per SM of an
    H100 (132): 128 programs at Kimi's B = 1, H = 32, V = 128 (64-wide slices gave 64)."""
    assert state_block_v(1, 32, 128) == 32
    assert state_block_v(8, 16, 128) == 64  # enough rows: the widest slice
    assert state_block_v(1, 2, 128) == 16 and state_block_v(1, 1, 16) == 16


def test_diagonal_block_form_choice():
    """The kernels factorise a chunk's 16x16 diagonal blocks into matmuls only where the log decay
    within every sub-chunk spans at most SAFE_SPAN (factors up to exp(60)); stronger gates
    (per-step log decays of -20, as in test_extreme_gates_ragged_length) take the exact form."""
    B, H, K, NC = 1, 2, 8, 3
    g = np.full((B, NC * 64, H, K), -1.0, np.float32)
    g[:, 64:128] = -4.0  # 15 steps of -4 after a sub-chunk's first row: exactly SAFE_SPAN
    g[:, 128 + 20, 1, 3] = -61.0  # one step, one head, one channel
    g[:, 128 + 16, 0, 0] = -100.0  # a sub-chunk's first row: its own reference, spans nothing
    flags = pm.factorisable_flags(jnp.asarray(g), NC, time_axis=1)
    assert flags.tolist() == [pm.FAST, pm.FAST, 0]
    g[:, 64 + 17] = -4.1
    heads_major = jnp.asarray(g).transpose(0, 2, 1, 3)
    assert pm.factorisable_flags(heads_major, NC, time_axis=2).tolist() == [pm.FAST, 0, 0]


def _op_counts_tool():
    spec = importlib.util.spec_from_file_location("kda_op_counts", ROOT / "tools" / "kda_op_counts.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize("fn", [kda_pallas_tpu, kda_pallas_gpu], ids=["pallas_tpu", "pallas_gpu"])
def test_default_precision_feeds_bf16_operands(fn):
    """precision="default": at least 90% of every kernel's matmul FLOPs take bf16 operands; the
    products of gate values (cumsums, the sub-chunk reference rows G_r, which the exp(SAFE_SPAN)
    clamp needs exact) stay float32 in every kernel that has them (all but the GPU state passes);
    "highest": no bf16 operands (traced bodies, K = V = 64)."""
    tool = _op_counts_tool()
    for r in tool.kernel_counts(fn, K=64, V=64, precision="default"):
        assert r["bf16_matmul_mflop"] >= 0.9 * r["matmul_mflop"], r
        if not r["kernel"].startswith("kda_state_"):
            assert r["bf16_matmul_mflop"] < r["matmul_mflop"], r
        if r["kernel"].endswith("_tpu"):  # the in-kernel cumsum tril @ g [64,64]x[64,K] is float32
            assert r["matmul_mflop"] - r["bf16_matmul_mflop"] >= 2 * 64 * 64 * 64 / 1e6, r
    for r in tool.kernel_counts(fn, K=64, V=64, precision="highest"):
        assert r["bf16_matmul_mflop"] == 0, r


def test_precision_applies_to_the_pallas_kernels_only():
    inputs, _, _ = random_case(6, B=1, T=8, H=1, K=16, V=16)
    with pytest.raises(ValueError, match="applies to the Pallas kernels only"):
        kda(*inputs[:5], impl="chunk", precision="default")
    o, _ = kda(*inputs[:5], impl="chunk", precision=jax.lax.Precision.HIGHEST)
    assert o.shape == inputs[2].shape


def test_tpu_kernel_work_is_matmul_shaped():
    """Issue 19: per chunk and head at K = V = 128, the TPU kernels' elementwise ops (counted from
    the traced kernel bodies by tools/kda_op_counts.py, factorised diagonal blocks) are at most
    twice their matmul FLOPs; the per-column diagonal loops were ~18M / 42M ops, 0.7-0.8x.

    Counted at state_stride=1: the tool counts a `pl.when` body at every grid step, so the
    backward's recompute of a group's states (once per `state_stride` chunks) would be counted
    `state_stride` times. Its true share is checked from the difference instead: per chunk it is
    (S-1)/S of a state-only forward step (the unused chunk output is dead code), under a fifth of
    the stride-1 forward+backward matmul FLOPs (docs/kernels.md: +15.6% at S = 4)."""
    counts = lambda S: {
        r["kernel"]: r
        for r in _op_counts_tool().kernel_counts(
            functools.partial(kda_pallas_tpu, state_stride=S), K=128, V=128
        )
    }
    rows = counts(1)
    assert sorted(rows) == ["kda_chunk_bwd_tpu", "kda_chunk_fwd_tpu"]
    for r in rows.values():
        assert r["elementwise_mop"] <= 2 * r["matmul_mflop"], r
        assert r["elementwise_mop"] < 5.0, r  # the column loops alone were > 10M
    S = tpu.STATE_STRIDE
    bwd_S = counts(S)["kda_chunk_bwd_tpu"]
    per_step = {
        key: (bwd_S[key] - rows["kda_chunk_bwd_tpu"][key]) / (S - 1)
        for key in ("matmul_mflop", "elementwise_mop")
    }
    fwd = rows["kda_chunk_fwd_tpu"]
    assert 0.5 * fwd["matmul_mflop"] < per_step["matmul_mflop"] < fwd["matmul_mflop"], per_step  # state only
    total = fwd["matmul_mflop"] + rows["kda_chunk_bwd_tpu"]["matmul_mflop"]
    assert (S - 1) / S * per_step["matmul_mflop"] < 0.2 * total, (per_step, total)
    # the tool's own figure at stride S counts that recompute once per S chunks, as it runs
    amortised = {r["kernel"]: r for r in _op_counts_tool().tpu_kernel_counts(S, K=128, V=128)}
    extra = amortised["kda_chunk_bwd_tpu"]["matmul_mflop"] - rows["kda_chunk_bwd_tpu"]["matmul_mflop"]
    share = (S - 1) / S
    assert share * 0.5 * fwd["matmul_mflop"] < extra < share * fwd["matmul_mflop"], (extra, fwd)
    assert amortised["kda_chunk_fwd_tpu"] == fwd


def test_kda_passes_state_stride_to_the_tpu_kernel_only():
    """`kda(..., state_stride=)` reaches the Pallas TPU kernel (its own check refuses 0) and is refused
    by name for the implementations that save no per-chunk states."""
    inputs, _, _ = random_case(14, B=1, T=64, H=1, K=16, V=16)
    with pytest.raises(ValueError, match="state_stride must be a positive int"):
        kda(*inputs[:5], impl="pallas_tpu", interpret=True, state_stride=0)
    for impl in ("chunk", "recurrent", "pallas_gpu"):
        with pytest.raises(ValueError, match="state_stride applies to the Pallas TPU kernel only"):
            kda(*inputs[:5], impl=impl, state_stride=2)
