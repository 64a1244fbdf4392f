"""AutoDeco losses and statistics against the official code's float64 outputs and a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.ops import autodeco as A
from jaxllm.ops.sampling import top_p_keep_mask

GOLDEN_CASES = ["autodeco_small", "autodeco_vocab300"]


def _load(golden_dir, name):
    with np.load(golden_dir / "autodeco" / f"{name}.npz") as f:
        return {k: f[k] for k in f.files}


def _rel(actual, expected):
    """max |a - e| / max |e| over the array (elementwise relative error is meaningless for the
    1e-30-sized gradient entries where the gold token sits far outside the nucleus)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


# ---------------------------------------------------------------------------------------------
# numpy reference (float64), written from the formulas, used beyond the golden cases


def _np_softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def np_losses(logits, T, P, labels, rand_vals, variant="hf", alpha=30.0, drop_prob=0.6):
    lg = logits[:, :-1]
    t = T[:, :-1, 0]
    p = P[:, :-1, 0]
    y = labels[:, 1:]
    valid = y != -100
    ys = np.where(valid, y, 0)
    base = _np_softmax(lg)
    base_gold = np.take_along_axis(base, ys[..., None], -1)[..., 0]
    easy = lg.argmax(-1) == ys
    drop = (rand_vals < drop_prob) & easy & valid
    kept = valid & ~drop
    # temperature loss
    tt = np.maximum(t, 1e-2) if variant == "hf" else t
    q = _np_softmax(lg / tt[..., None])
    q_gold = np.take_along_axis(q, ys[..., None], -1)[..., 0]
    ce = -np.log(q_gold)
    w_temp = base_gold if variant == "hf" else q_gold
    temp_loss = (ce * w_temp)[kept].mean() if kept.any() else 0.0
    # soft top-p loss
    tp = np.maximum(t, 1e-8) if variant == "hf" else t
    probs = _np_softmax(lg / tp[..., None])
    order = np.argsort(-probs, -1, kind="stable")
    sp = np.take_along_axis(probs, order, -1)
    cum = np.cumsum(sp, -1)
    dec = np.exp(-alpha * np.maximum(cum - p[..., None], 0.0))
    mask = np.zeros_like(probs)
    np.put_along_axis(mask, order, dec, -1)
    masked = probs * mask
    renorm = masked / (masked.sum(-1, keepdims=True) + 1e-9)
    nll = -np.log(np.take_along_axis(renorm, ys[..., None], -1)[..., 0] + 1e-9)
    cover = valid if variant == "hf" else kept
    top_p_loss = (nll * base_gold)[cover].mean() if cover.any() else 0.0
    return float(temp_loss), float(top_p_loss)


def _random_case(seed, B=2, S=7, V=50, scale=3.0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(B, S, V)) * scale).astype(dtype)
    T = rng.uniform(0.2, 1.8, size=(B, S, 1)).astype(dtype)
    P = rng.uniform(0.05, 0.99, size=(B, S, 1)).astype(dtype)
    labels = rng.integers(0, V, size=(B, S)).astype(np.int32)
    # Make about half the shifted positions easy (gold == base argmax at t for labels[t+1]) so
    # the drop mask matters, and give every other position a draw below 0.6.
    am = logits[:, :-1].argmax(-1)
    easy = rng.random((B, S - 1)) < 0.5
    labels[:, 1:] = np.where(easy, am, labels[:, 1:])
    labels[:, 0] = -100
    labels[0, 3] = -100
    rand_vals = rng.random((B, S - 1)).astype(dtype)
    rand_vals[:, ::2] *= 0.5
    return logits, T, P, labels, rand_vals


# ---------------------------------------------------------------------------------------------
# golden: the official code in float64


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_float64(golden_dir, case, x64):
    d = _load(golden_dir, case)
    L, T, P = (jnp.asarray(d[k], jnp.float64) for k in ("logits", "T", "P"))
    y = jnp.asarray(d["labels"])
    r = jnp.asarray(d["rand_vals"], jnp.float64)

    stats = A.prob_stats(L, T)
    assert stats.dtype == jnp.float64
    for i in range(4):  # max prob, entropy, variance, top-5 mass
        assert _rel(stats[..., i], d["prob_stats"][..., i]) <= 1e-9, i

    tp, (gT, gP) = jax.value_and_grad(lambda t, p: A.soft_top_p_loss(L, t, p, y), (0, 1))(T, P)
    assert tp.dtype == jnp.float64
    assert _rel(tp, d["top_p_loss"]) <= 1e-9
    assert _rel(gT, d["dtop_p_loss_dT"]) <= 1e-9
    assert _rel(gP, d["dtop_p_loss_dP"]) <= 1e-9

    tl, gT2 = jax.value_and_grad(lambda t: A.temperature_loss(L, t, y, r))(T)
    assert _rel(tl, d["temp_loss"]) <= 1e-9
    assert _rel(gT2, d["dtemp_loss_dT"]) <= 1e-9

    # The combined entry point gives the same numbers.
    both = A.autodeco_loss(L, T, P, y, r)
    assert _rel(both["top_p_loss"], d["top_p_loss"]) <= 1e-9
    assert _rel(both["temp_loss"], d["temp_loss"]) <= 1e-9
    assert _rel(both["loss"], d["top_p_loss"] + d["temp_loss"]) <= 1e-9


# float32 bounds against the float64 golden values, from a measurement, not a guess:
# `python tools/autodeco_f32_spread.py --seeds 1000` evaluates each quantity in float32 at the
# golden inputs and at 1000 other float32 inputs within one float32 ulp of the float64 ones, on
# jax 0.10.2 and 0.12.0.1 (identical maxima). Each bound is about twice the largest error seen
# (max over both cases), rounded up to 1-2-5:
#   prob_stats               max 6.9e-6 -> 2e-5
#   both losses, dtemp/dT    max 1.5e-6 -> 5e-6
#   dtop_p/dT, dtop_p/dP     max 4.4e-5 -> 1e-4
# The top-p gradients are ill-conditioned in their inputs: float64 arithmetic on the same
# float32-rounded inputs already lands 1.5e-5 away, so no float32 implementation meets 1e-5 on
# every input (jax 0.12's XLA gives 1.11e-5 for dT on autodeco_small at the test's inputs).
F32_STATS, F32_LOSS, F32_TOP_P_GRAD = 2e-5, 5e-6, 1e-4


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_float32(golden_dir, case):
    d = _load(golden_dir, case)
    L, T, P, r = (jnp.asarray(d[k].astype(np.float32)) for k in ("logits", "T", "P", "rand_vals"))
    y = jnp.asarray(d["labels"])

    stats = A.prob_stats(L, T)
    assert stats.dtype == jnp.float32
    for i in range(4):
        assert _rel(stats[..., i], d["prob_stats"][..., i]) <= F32_STATS, i

    tp, (gT, gP) = jax.value_and_grad(lambda t, p: A.soft_top_p_loss(L, t, p, y), (0, 1))(T, P)
    assert tp.dtype == jnp.float32
    assert _rel(tp, d["top_p_loss"]) <= F32_LOSS
    assert _rel(gT, d["dtop_p_loss_dT"]) <= F32_TOP_P_GRAD
    assert _rel(gP, d["dtop_p_loss_dP"]) <= F32_TOP_P_GRAD

    tl, gT2 = jax.value_and_grad(lambda t: A.temperature_loss(L, t, y, r))(T)
    assert _rel(tl, d["temp_loss"]) <= F32_LOSS
    assert _rel(gT2, d["dtemp_loss_dT"]) <= F32_LOSS


def test_golden_last_position_gets_no_gradient(golden_dir, x64):
    # Position S-1 predicts nothing after the shift.
    d = _load(golden_dir, "autodeco_small")
    assert np.all(d["dtop_p_loss_dT"][:, -1] == 0)
    L, T, P = (jnp.asarray(d[k]) for k in ("logits", "T", "P"))
    gT, gP = jax.grad(lambda t, p: A.soft_top_p_loss(L, t, p, jnp.asarray(d["labels"])), (0, 1))(T, P)
    assert np.all(np.asarray(gT)[:, -1] == 0) and np.all(np.asarray(gP)[:, -1] == 0)


# ---------------------------------------------------------------------------------------------
# beyond the golden cases


@pytest.mark.parametrize("variant", ["hf", "megatron"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_numpy_reference(variant, seed, x64):
    logits, T, P, labels, r = _random_case(seed)
    want_temp, want_top_p = np_losses(logits, T, P, labels, r, variant=variant)
    out = A.autodeco_loss(*(jnp.asarray(a) for a in (logits, T, P, labels, r)), variant=variant)
    np.testing.assert_allclose(float(out["temp_loss"]), want_temp, rtol=1e-12)
    np.testing.assert_allclose(float(out["top_p_loss"]), want_top_p, rtol=1e-12)
    # The two variants really differ on this case (drop mask / weights).
    other = "megatron" if variant == "hf" else "hf"
    other_temp, other_top_p = np_losses(logits, T, P, labels, r, variant=other)
    assert abs(other_temp - want_temp) > 1e-6 and abs(other_top_p - want_top_p) > 1e-6


def test_megatron_soft_top_p_needs_rand_vals():
    logits, T, P, labels, _ = _random_case(0, dtype=np.float32)
    with pytest.raises(ValueError, match="rand_vals"):
        A.soft_top_p_loss(
            jnp.asarray(logits), jnp.asarray(T), jnp.asarray(P), jnp.asarray(labels), variant="megatron"
        )


@pytest.mark.parametrize("chunk_size", [1, 3, 5])
def test_chunking_does_not_change_values_or_gradients(chunk_size, x64):
    # N = 2 * 6 = 12 rows: chunk 5 leaves a remainder; chunk 1 is one row at a time.
    # float64 so that only the chunking, not float32 summation order, could make a difference.
    logits, T, P, labels, r = (jnp.asarray(a) for a in _random_case(3))

    def f(t, p, cs):
        out = A.autodeco_loss(logits, t, p, labels, r, chunk_size=cs)
        return out["loss"], out

    (l0, o0), g0 = jax.value_and_grad(f, (0, 1), has_aux=True)(T, P, None)
    (l1, o1), g1 = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True), static_argnums=2)(T, P, chunk_size)
    np.testing.assert_allclose(l1, l0, rtol=1e-12)
    np.testing.assert_allclose(o1["temp_loss"], o0["temp_loss"], rtol=1e-12)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-15)
    assert float(jnp.abs(g0[0]).sum()) > 0 and float(jnp.abs(g0[1]).sum()) > 0


def test_drop_mask_semantics(x64):
    logits, T, P, labels, _ = (jnp.asarray(a) for a in _random_case(4))
    valid = np.asarray(labels[:, 1:]) != -100
    easy = (np.asarray(logits[:, :-1]).argmax(-1) == np.asarray(labels[:, 1:])) & valid
    assert easy.sum() >= 2
    keep_all = A.autodeco_loss(logits, T, P, labels, jnp.ones(valid.shape))
    drop_all = A.autodeco_loss(logits, T, P, labels, jnp.zeros(valid.shape))
    assert int(keep_all["n_temp"]) == valid.sum()
    assert int(drop_all["n_temp"]) == valid.sum() - easy.sum()
    # HF: the top-p loss never sees the drop mask.
    assert int(drop_all["n_top_p"]) == valid.sum()
    np.testing.assert_allclose(drop_all["top_p_loss"], keep_all["top_p_loss"], rtol=1e-14)
    assert abs(float(drop_all["temp_loss"]) - float(keep_all["temp_loss"])) > 1e-6
    # drop_prob = 0 keeps everything whatever the draws.
    none = A.autodeco_loss(logits, T, P, labels, jnp.zeros(valid.shape), drop_prob=0.0)
    np.testing.assert_allclose(none["temp_loss"], keep_all["temp_loss"], rtol=1e-14)
    # Megatron: the top-p loss drops them too.
    meg = A.autodeco_loss(logits, T, P, labels, jnp.zeros(valid.shape), variant="megatron")
    assert int(meg["n_top_p"]) == valid.sum() - easy.sum()


def test_no_valid_tokens_gives_zero_not_nan():
    logits, T, P, _, r = (jnp.asarray(a) for a in _random_case(5, dtype=np.float32))
    labels = jnp.full(logits.shape[:2], -100, jnp.int32)
    out, grads = jax.value_and_grad(lambda t, p: A.autodeco_loss(logits, t, p, labels, r)["loss"], (0, 1))(
        T, P
    )
    assert float(out) == 0.0
    assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_bf16_inputs_compute_in_float32():
    logits, T, P, labels, r = _random_case(6, dtype=np.float32)
    out16 = A.autodeco_loss(
        jnp.asarray(logits, jnp.bfloat16),
        jnp.asarray(T, jnp.bfloat16),
        jnp.asarray(P, jnp.bfloat16),
        jnp.asarray(labels),
        jnp.asarray(r),
    )
    assert out16["loss"].dtype == jnp.float32
    assert A.prob_stats(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(T, jnp.bfloat16)).dtype == jnp.float32


def test_logits_get_no_gradient():
    logits, T, P, labels, r = (jnp.asarray(a) for a in _random_case(7, dtype=np.float32))
    g = jax.grad(lambda lg: A.autodeco_loss(lg, T, P, labels, r)["loss"])(logits)
    assert np.all(np.asarray(g) == 0)


def _strict_nucleus(logits_V, t, p):
    # The alpha -> inf limit of the soft mask: keep tokens whose *inclusive* cumsum is <= P.
    probs = _np_softmax(logits_V / t)
    order = np.argsort(-probs, kind="stable")
    keep = np.zeros_like(probs, dtype=bool)
    keep[order] = np.cumsum(probs[order]) <= p
    return keep


def _hard_strict_nucleus_nll(logits_V, t, p, y):
    probs = _np_softmax(logits_V / t)
    keep = _strict_nucleus(logits_V, t, p)
    assert keep[y]
    q = np.where(keep, probs, 0.0)
    return -np.log(q[y] / q.sum()), keep


def test_soft_top_p_tends_to_hard_top_p_as_alpha_grows(x64):
    rng = np.random.default_rng(11)
    V = 40
    logits = rng.normal(size=(1, 2, V)) * 2.0
    t = 0.8
    probs = _np_softmax(logits[0, 0] / t)
    cum = np.cumsum(np.sort(probs)[::-1])
    # P strictly between two cumsum values so the limit is well defined.
    p = 0.5 * (cum[4] + cum[5])
    keep = _strict_nucleus(logits[0, 0], t, p)
    y = int(np.flatnonzero(keep)[-1])  # the least likely kept token: the most mask-sensitive
    want, _ = _hard_strict_nucleus_nll(logits[0, 0], t, p, y)
    T = jnp.full((1, 2, 1), t)
    P = jnp.full((1, 2, 1), p)
    labels = jnp.asarray([[-100, y]], jnp.int32)
    base_w = float(_np_softmax(logits[0, 0])[y])
    errs = []
    for alpha in [30.0, 300.0, 3000.0]:
        got = float(A.soft_top_p_loss(jnp.asarray(logits), T, P, labels, alpha=alpha)) / base_w
        errs.append(abs(got - want))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    # The official +1e-9 epsilons set a floor of ~1e-8 on this case.
    assert errs[0] > 1e-3 and errs[-1] < 1e-6, errs
    # A token outside the strict nucleus is suppressed ever harder.
    y_out = int(np.flatnonzero(~keep)[0])
    labels_out = jnp.asarray([[-100, y_out]], jnp.int32)
    outs = [
        float(A.soft_top_p_loss(jnp.asarray(logits), T, P, labels_out, alpha=a))
        for a in (30.0, 300.0, 3000.0)
    ]
    w_out = float(_np_softmax(logits[0, 0])[y_out])
    assert outs[0] < outs[1] <= outs[2]
    # q_gold -> 0, so the loss saturates at the official floor -log(0 + 1e-9).
    np.testing.assert_allclose(outs[2] / w_out, -np.log(1e-9), rtol=1e-6)


def test_soft_limit_drops_the_crossing_token_that_hard_top_p_keeps(x64):
    # Documented train/inference mismatch: inference (vLLM) top-p keeps the token whose
    # inclusive cumsum first crosses P; the soft mask's limit removes it.

    rng = np.random.default_rng(12)
    logits_V = rng.normal(size=30) * 2.0
    probs = _np_softmax(logits_V)
    cum = np.cumsum(np.sort(probs)[::-1])
    p = 0.5 * (cum[3] + cum[4])
    strict = _strict_nucleus(logits_V, 1.0, p)
    hard = np.asarray(top_p_keep_mask(jnp.asarray(logits_V)[None], jnp.asarray([p]))[0])
    assert strict.sum() == 4 and hard.sum() == 5
    assert np.all(hard[strict])


@pytest.mark.parametrize("top_p", [0.0, 1.0])
def test_gradients_finite_at_edges_large_vocab(top_p):
    # V = 163,840 (Kimi Linear), P at {0, 1}, T at the 0.01 clamp and just above it.
    V = 163_840
    rng = np.random.default_rng(13)
    logits = jnp.asarray(rng.normal(size=(1, 3, V)) * 4.0, jnp.float32)
    T = jnp.asarray([[[0.01], [0.0101], [0.5]]], jnp.float32)
    P = jnp.full((1, 3, 1), top_p, jnp.float32)
    am = int(np.asarray(logits[0, 1]).argmax())
    labels = jnp.asarray([[-100, am, 17]], jnp.int32)  # one easy, one hard token
    r = jnp.ones((1, 2), jnp.float32)

    def f(t, p):
        return A.autodeco_loss(logits, t, p, labels, r, chunk_size=1)["loss"]

    loss, (gT, gP) = jax.jit(jax.value_and_grad(f, (0, 1)))(T, P)
    assert np.isfinite(float(loss))
    assert np.all(np.isfinite(np.asarray(gT))) and np.all(np.isfinite(np.asarray(gP)))
    assert float(jnp.abs(gT).sum()) > 0


def test_jit_with_traced_labels():
    logits, T, P, labels, r = (jnp.asarray(a) for a in _random_case(8, dtype=np.float32))
    eager = A.autodeco_loss(logits, T, P, labels, r)["loss"]
    jitted = jax.jit(lambda *a: A.autodeco_loss(*a)["loss"])(logits, T, P, labels, r)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# bad input


def _good():
    return [jnp.asarray(a) for a in _random_case(9, dtype=np.float32)]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.__setitem__(0, a[0][0]), "logits"),
        (lambda a: a.__setitem__(0, a[0][:, :1]), "logits"),
        (lambda a: a.__setitem__(1, a[1][..., 0]), "temperature"),
        (lambda a: a.__setitem__(2, a[2][:, :-1]), "top_p"),
        (lambda a: a.__setitem__(3, a[3][:, :-1]), "labels"),
        (lambda a: a.__setitem__(3, a[3].at[0, 2].set(50)), "labels"),
        (lambda a: a.__setitem__(3, a[3].at[0, 2].set(-1)), "labels"),
        (lambda a: a.__setitem__(3, a[3].astype(jnp.float32)), "labels"),
        (lambda a: a.__setitem__(4, a[4][:, :-1]), "rand_vals"),
    ],
)
def test_bad_input_names_the_argument(mutate, match):
    args = _good()
    mutate(args)
    with pytest.raises(ValueError, match=match):
        A.autodeco_loss(*args)


def test_bad_options_name_the_option():
    args = _good()
    with pytest.raises(ValueError, match="variant"):
        A.autodeco_loss(*args, variant="torch")
    with pytest.raises(ValueError, match="drop_prob"):
        A.autodeco_loss(*args, drop_prob=1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        A.autodeco_loss(*args, chunk_size=0)
    with pytest.raises(ValueError, match="alpha"):
        A.autodeco_loss(*args, alpha=0.0)
    with pytest.raises(ValueError, match="labels"):
        A.soft_top_p_loss(args[0], args[1], args[2], args[3].at[1, 1].set(10_000))
    with pytest.raises(ValueError, match="temperature"):
        A.prob_stats(args[0], args[1][:, :2])


def test_chunking_bounds_memory():
    # Compile only (no run): XLA's buffer assignment for the gradient of both losses.
    # N = 2 * 129 = 258 rows is not a multiple of the chunk, the case where slicing or padding
    # would copy the whole logits.
    B, S, V = 2, 129, 8192
    shapes = (jax.ShapeDtypeStruct((B, S, 1), jnp.float32),) * 2 + (
        jax.ShapeDtypeStruct((B, S, V), jnp.float32),
        jax.ShapeDtypeStruct((B, S), jnp.int32),
        jax.ShapeDtypeStruct((B, S - 1), jnp.float32),
    )
    logits_bytes = B * S * V * 4

    def temp_bytes(chunk_size):
        f = lambda t, p, lg, y, r: A.autodeco_loss(lg, t, p, y, r, chunk_size=chunk_size)["loss"]  # noqa: E731
        compiled = jax.jit(jax.grad(f, (0, 1))).lower(*shapes).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    chunked, whole = temp_bytes(4), temp_bytes(None)
    assert chunked < 0.25 * logits_bytes, (chunked, logits_bytes)
    assert whole > 3 * logits_bytes, (whole, logits_bytes)
