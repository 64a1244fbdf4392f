"""KDA pure-JAX implementations: golden cases, chunk == recurrent, varlen, segments, errors."""

import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kda import chunk, kda
from pallas_kernels.kda.chunk import _largest_factor, kda_chunk, unit_lower_inverse

GRAD_NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0")
IMPLS = ("recurrent", "chunk")


def rel_rms(ref, got):
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    return np.sqrt(np.mean((ref - got) ** 2)) / max(np.sqrt(np.mean(ref**2)), 1e-30)


def load_case(golden_dir, name):
    return dict(np.load(golden_dir / "kda" / name))


GOLDEN_CASES = ("kda_basic.npz", "kda_nonorm_zero_state.npz", "kda_varlen.npz")


def run_with_grads(case, impl, dtype=jnp.float32):
    """Outputs and all six gradients of kda on a golden case (inputs cast to `dtype`)."""
    cu = jnp.asarray(case["cu_seqlens"]) if "cu_seqlens" in case else None

    def fn(q, k, v, g, beta, h0):
        return kda(
            q,
            k,
            v,
            g,
            beta,
            scale=float(case["scale"]),
            initial_state=h0,
            output_final_state=True,
            cu_seqlens=cu,
            use_qk_l2norm=bool(case["use_qk_l2norm"]),
            impl=impl,
        )

    @jax.jit  # under jit, as users run it (XLA fuses differently than op-by-op)
    def outputs_and_grads(args, do, dht):
        (o, ht), vjp = jax.vjp(fn, *args)
        return o, ht, vjp((do.astype(o.dtype), dht))

    args = [jnp.asarray(case[n]).astype(dtype) for n in ("q", "k", "v", "g", "beta")]
    args.append(jnp.asarray(case["h0"]))
    o, ht, grads = outputs_and_grads(args, jnp.asarray(case["do"]), jnp.asarray(case["dht"]))
    return {"o": o, "ht": ht, **dict(zip(GRAD_NAMES, grads))}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden_float32(golden_dir, name, impl):
    case = load_case(golden_dir, name)
    got = run_with_grads(case, impl)
    for key in ("o", "ht") + GRAD_NAMES:
        assert got[key].dtype == jnp.float32
        err = rel_rms(case[key], got[key])
        assert err <= 1e-4, f"{name} {impl} {key}: rel rms {err:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden_bfloat16(golden_dir, name, impl):
    """bf16 inputs: within fla's thresholds of an f32 run on the rounded inputs, 2e-2 of golden."""
    case = load_case(golden_dir, name)
    rounded = {
        k: (
            np.asarray(jnp.asarray(v).astype(jnp.bfloat16).astype(jnp.float32))
            if k in ("q", "k", "v", "g", "beta")
            else v
        )
        for k, v in case.items()
    }
    got16 = run_with_grads(rounded, impl, dtype=jnp.bfloat16)
    ref32 = run_with_grads(rounded, impl, dtype=jnp.float32)
    assert got16["o"].dtype == jnp.bfloat16 and got16["ht"].dtype == jnp.float32
    limits = {
        "o": 5e-3,
        "ht": 5e-3,
        "dq": 1e-2,
        "dk": 1e-2,
        "dv": 1e-2,
        "dg": 2e-2,
        "dbeta": 2e-2,
        "dh0": 1e-2,
    }
    for key, limit in limits.items():
        err = rel_rms(ref32[key], got16[key])
        assert err <= limit, f"{name} {impl} {key} vs f32-on-rounded: {err:.2e}"
        err_golden = rel_rms(case[key], got16[key])
        assert err_golden <= 2e-2, f"{name} {impl} {key} vs golden: {err_golden:.2e}"


def random_inputs(key, B, T, H, K, V, g_min):
    ks = jax.random.split(jax.random.PRNGKey(key), 6)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    v = jax.random.normal(ks[2], (B, T, H, V))
    g = jax.random.uniform(ks[3], (B, T, H, K), minval=g_min, maxval=0.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    h0 = jax.random.normal(ks[5], (B, H, K, V))
    return q, k, v, g, beta, h0


def outputs_and_grads(impl, inputs, **kw):
    """Outputs and gradients of `kda(impl=impl)`, or of `impl` itself when it is a function."""
    q, k, v, g, beta, h0 = inputs
    op = impl if callable(impl) else partial(kda, impl=impl)

    def fn(q, k, v, g, beta, h0):
        return op(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True, **kw)

    @jax.jit
    def run(*args):
        (o, ht), vjp = jax.vjp(fn, *args)
        do = jax.random.normal(jax.random.PRNGKey(99), o.shape)
        dht = jax.random.normal(jax.random.PRNGKey(98), ht.shape)
        return (o, ht) + tuple(vjp((do, dht)))

    return run(q, k, v, g, beta, h0)


@pytest.mark.parametrize(
    "T,g_min,zero_state",
    [
        (1, -1.0, False),
        (37, -20.0, False),
        (64, -5.0, True),
        (130, -20.0, False),
        (200, -0.1, True),
    ],
)
def test_chunk_matches_recurrent(T, g_min, zero_state):
    inputs = random_inputs(T, 2, T, 2, 16, 32, g_min)
    if zero_state:
        inputs = inputs[:5] + (jnp.zeros_like(inputs[5]),)
    ref = outputs_and_grads("recurrent", inputs)
    got = outputs_and_grads("chunk", inputs)
    for name, r, c in zip(("o", "ht") + GRAD_NAMES, ref, got):
        assert np.isfinite(np.asarray(c)).all(), f"{name} not finite"
        assert rel_rms(r, c) <= 1e-4, f"T={T} g_min={g_min} {name}: {rel_rms(r, c):.2e}"


def test_varlen_matches_separate_runs_under_jit():
    """Packed sequences (incl. an empty one) == each sequence alone; traced cu_seqlens is fine."""
    lens = [5, 0, 70, 64, 1]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    T = int(cu[-1])
    q, k, v, g, beta, _ = random_inputs(1, 1, T, 2, 16, 16, -3.0)
    h0 = jax.random.normal(jax.random.PRNGKey(5), (len(lens), 2, 16, 16))
    packed = jax.jit(
        lambda cu: kda(
            q,
            k,
            v,
            g,
            beta,
            initial_state=h0,
            output_final_state=True,
            cu_seqlens=cu,
            use_qk_l2norm=True,
            impl="chunk",
        )
    )(cu)
    for n in range(len(lens)):
        sl = slice(cu[n], cu[n + 1])
        o_n, ht_n = kda(
            q[:, sl],
            k[:, sl],
            v[:, sl],
            g[:, sl],
            beta[:, sl],
            initial_state=h0[n : n + 1],
            output_final_state=True,
            use_qk_l2norm=True,
            impl="recurrent",
        )
        if lens[n]:
            assert rel_rms(o_n, packed[0][:, sl]) <= 1e-5
        assert rel_rms(ht_n, packed[1][n : n + 1]) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_segment_ids_reset_state(impl):
    """Rows of packed documents == each document run alone from a zero state."""
    q, k, v, g, beta, _ = random_inputs(3, 1, 150, 2, 16, 16, -2.0)
    seg = jnp.asarray([[0] * 40 + [1] * 70 + [2] * 40])
    o, _ = kda(q, k, v, g, beta, segment_ids=seg, use_qk_l2norm=True, impl=impl)
    for lo, hi in ((0, 40), (40, 110), (110, 150)):
        o_doc, _ = kda(
            q[:, lo:hi],
            k[:, lo:hi],
            v[:, lo:hi],
            g[:, lo:hi],
            beta[:, lo:hi],
            use_qk_l2norm=True,
            impl="recurrent",
        )
        assert rel_rms(o_doc, o[:, lo:hi]) <= 1e-5


def test_segment_ids_chunk_gradients_match_recurrent():
    inputs = random_inputs(4, 2, 100, 2, 16, 16, -8.0)
    seg = jnp.cumsum(jax.random.bernoulli(jax.random.PRNGKey(0), 0.05, (2, 100)), axis=1)
    ref = outputs_and_grads("recurrent", inputs, segment_ids=seg)
    got = outputs_and_grads("chunk", inputs, segment_ids=seg)
    for r, c in zip(ref, got):
        assert rel_rms(r, c) <= 1e-4


@pytest.mark.parametrize(
    "mode, fwd_rows, T",
    [
        ("plain", 2 * 2 * 64, 300),
        ("segments", 2 * 2 * 64, 300),
        ("varlen", 2 * 2 * 64, 300),
        ("varlen", 4 * 2 * 64, 500),
    ],
)  # the 4-chunk forward step once, on the mode that needs the most
def test_chunk_group_loop_matches_recurrent(monkeypatch, mode, fwd_rows, T):
    """The chunk loops handle several chunks per step. With 2 chunks per backward step (B*H*n*C
    rows, B=1, H=2) and T=300 (5 chunks) the state crosses steps and the last step is half
    padding; with T=500 (8 chunks) the forward steps over 4 chunks at a time, the backward over 2.
    Outputs, state and all gradients."""
    monkeypatch.setattr(chunk, "GROUP_ROWS", 2 * 2 * 64)
    monkeypatch.setattr(chunk, "FORWARD_GROUP_ROWS", fwd_rows)
    inputs = random_inputs(7, 1, T, 2, 16, 16, -6.0)
    kw = {}
    if mode == "segments":
        kw["segment_ids"] = jnp.asarray([[0] * 70 + [1] * 150 + [2] * (T - 220)])
    if mode == "varlen":
        kw["cu_seqlens"] = jnp.asarray([0, 70, 70, 220, T], jnp.int32)
        h0 = jax.random.normal(jax.random.PRNGKey(3), (4, 2, 16, 16))
        inputs = inputs[:5] + (h0,)
    ref = outputs_and_grads("recurrent", inputs, **kw)
    got = outputs_and_grads("chunk", inputs, **kw)
    for name, r, c in zip(("o", "ht") + GRAD_NAMES, ref, got):
        assert np.isfinite(np.asarray(c)).all(), f"{mode} {name} not finite"
        assert rel_rms(r, c) <= 1e-4, f"{mode} {name}: {rel_rms(r, c):.2e}"


def test_forward_and_backward_groups_tile_the_same_chunks():
    """The forward's group is a multiple of the backward's that divides the padded chunk count."""
    assert [_largest_factor(n, 2) for n in (1, 2, 3, 4, 16)] == [1, 2, 1, 2, 2]
    assert _largest_factor(9, 4) == 3 and _largest_factor(7, 0) == 1 and _largest_factor(2, 8) == 2


@pytest.mark.parametrize("chunk_size", [32, 48])
def test_other_chunk_sizes_match_recurrent(chunk_size):
    """kda_chunk's chunk_size need not be 64, nor 16 times a power of two (48 pads the inverse)."""
    inputs = random_inputs(5, 1, 150, 2, 16, 16, -3.0)
    ref = outputs_and_grads("recurrent", inputs)
    got = outputs_and_grads(kda_chunk, inputs, chunk_size=chunk_size)
    for name, r, c in zip(("o", "ht") + GRAD_NAMES, ref, got):
        assert rel_rms(r, c) <= 1e-4, f"C={chunk_size} {name}: {rel_rms(r, c):.2e}"


@pytest.mark.parametrize("C", [16, 48, 64, 128])
def test_unit_lower_inverse_matches_numpy(C):
    """(I + L)^-1 by doubling and pairwise merging equals a float64 inverse, incl. padded C."""
    L = np.tril(np.random.default_rng(C).normal(size=(3, C, C)) / np.sqrt(C), -1)
    want = np.linalg.inv(np.eye(C) + L)
    got = unit_lower_inverse(jnp.asarray(L, jnp.float32))
    assert got.shape == (3, C, C)
    assert rel_rms(want, got) <= 1e-5, rel_rms(want, got)


def test_chunk_backward_keeps_linear_memory():
    """Residuals saved for the backward are O(T*(K+V)) per head, not O(T*C*K)."""
    B, T, H, K, V = 1, 1024, 2, 32, 32
    q, k, v, g, beta, h0 = random_inputs(0, B, T, H, K, V, -1.0)
    _, vjp = jax.vjp(lambda *a: kda(*a, impl="chunk")[0], q, k, v, g, beta)
    saved = sum(x.size for x in jax.tree.leaves(vjp))
    assert saved <= 8 * B * H * T * (K + V), saved
    _, vjp_rec = jax.vjp(lambda *a: kda(*a, impl="recurrent")[0], q, k, v, g, beta)
    assert sum(x.size for x in jax.tree.leaves(vjp_rec)) > 4 * saved  # autodiff of the scan keeps states


@pytest.mark.parametrize("step_decay", [0.01, 2.0, 20.0])
def test_score_tiers_agree_with_exact_pairwise(step_decay):
    """Whole-chunk, sub-chunk and pairwise evaluations of the intra-chunk scores (and their
    gradients, under jit) equal the naive masked [C,C,K] formula, whichever tier the span picks."""
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    q = jax.random.normal(ks[0], (1, 2, 3, 64, 16))
    k = jax.random.normal(ks[1], (1, 2, 3, 64, 16))
    G = jnp.cumsum(-step_decay * jax.random.uniform(ks[2], (1, 2, 3, 64, 16)), axis=-2)
    cts = tuple(jax.random.normal(kk, (1, 2, 3, 64, 64)) for kk in jax.random.split(ks[3]))

    def naive(q, k, G):
        i = jnp.arange(64)
        lower = i[:, None] >= i[None, :]
        decay = jnp.where(
            lower[:, :, None], jnp.exp(jnp.minimum(G[..., :, None, :] - G[..., None, :, :], 0)), 0
        )
        score = lambda x: jnp.sum(x[..., :, None, :] * k[..., None, :, :] * decay, -1)
        return score(k) * (i[:, None] > i[None, :]), score(q)

    def with_grads(f):
        return jax.jit(lambda *a: (f(*a), jax.vjp(f, *a)[1](cts)))(q, k, G)

    ref_out, ref_grads = with_grads(naive)
    for out, grads in (with_grads(chunk.intra_scores), with_grads(chunk._scores_by_subchunk)):
        for r, c in zip(ref_out + ref_grads, out + grads):
            assert np.isfinite(np.asarray(c)).all()
            assert rel_rms(r, c) <= 1e-5


def test_import_pulls_in_jax_only():
    code = (
        "import sys; from pallas_kernels.kda import kda; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('flax', 'jaxllm', 'optax', 'orbax', 'torch')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def small():
    return random_inputs(0, 1, 10, 2, 8, 8, -1.0)[:5]


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: dict(a, k=a["k"][:, :5]), "k must have q's shape"),
        (lambda a: dict(a, v=a["v"][:, :5]), "v must be"),
        (lambda a: dict(a, g=a["g"][..., :4]), "g must have q's shape"),
        (lambda a: dict(a, beta=a["beta"][..., None]), "beta must be"),
        (lambda a: dict(a, k=a["k"].astype(jnp.bfloat16)), "share a dtype"),
        (lambda a: dict(a, q=a["q"][0]), r"q must be \[B,T,H,K\]"),
    ],
)
def test_bad_shapes_and_dtypes(small, mutate, match):
    args = mutate(dict(zip("q k v g beta".split(), small)))
    for impl in IMPLS:
        with pytest.raises(ValueError, match=match):
            kda(**args, impl=impl)


@pytest.mark.parametrize(
    "cu,match",
    [
        ([1, 4, 10], "must start at 0"),
        ([0, 6, 4, 10], "non-decreasing"),
        ([0, 4, 9], "must end at T=10"),
    ],
)
def test_bad_cu_seqlens(small, cu, match):
    with pytest.raises(ValueError, match=match):
        kda(*small, cu_seqlens=jnp.asarray(cu, jnp.int32), impl="chunk")


def test_bad_batch_and_state_with_cu_seqlens(small):
    q, k, v, g, beta = small
    two = lambda x: jnp.concatenate([x, x])
    with pytest.raises(ValueError, match="batch size must be 1"):
        kda(two(q), two(k), two(v), two(g), two(beta), cu_seqlens=jnp.asarray([0, 10]))
    with pytest.raises(ValueError, match="number of sequences"):
        kda(q, k, v, g, beta, cu_seqlens=jnp.asarray([0, 4, 10]), initial_state=jnp.zeros((1, 2, 8, 8)))
    with pytest.raises(ValueError, match="impl must be one of"):
        kda(q, k, v, g, beta, impl="fast")
    with pytest.raises(ValueError, match="interpret=True applies to the Pallas kernels only"):
        kda(q, k, v, g, beta, impl="chunk", interpret=True)


@pytest.mark.parametrize("backend,fwd_steps", [("cpu", 8), ("gpu", 2), ("tpu", 8)])
def test_chunk_loop_groups_follow_the_backend(monkeypatch, backend, fwd_steps):
    """The chunk path's loop grouping comes from a per-backend table (`chunk.group_rows`): at 16
    heads (1024 rows per chunk) and 16 chunks the forward loop takes 2 chunks per step with the
    CPU (and TPU) sizes and 8 with the GPU's (read off the traced loop)."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    cpu = (chunk.GROUP_ROWS, chunk.FORWARD_GROUP_ROWS)
    assert chunk.group_rows(backend) == ((4096, 8192) if backend == "gpu" else cpu)
    x = jax.ShapeDtypeStruct((1, 16 * 64, 16, 16), jnp.float32)
    beta = jax.ShapeDtypeStruct((1, 16 * 64, 16), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda q, k, v, g, b: chunk.kda_chunk(q, k, v, g, b)[0])(x, x, x, x, beta)
    assert _scan_lengths(jaxpr.jaxpr) == [fwd_steps]


def _scan_lengths(jaxpr):
    """Lengths of the scans (static fori_loops) in a jaxpr and every jaxpr nested in it."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            out.append(eqn.params["length"])
        for p in eqn.params.values():
            sub = getattr(p, "jaxpr", p)
            if hasattr(sub, "eqns") and eqn.primitive.name != "scan":
                out += _scan_lengths(sub)
    return out
