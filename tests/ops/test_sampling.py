"""Sampler tests: empirical frequencies over many vectorised draws against a numpy reference of
the intended (penalised, tempered, truncated) distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxllm.ops.sampling import SamplingConfig, sample_next, sampling_probs, top_p_keep_mask

V = 12
N_DRAWS = 120_000
# Distinct, well separated logits (no ties) so every truncation is unambiguous.
LOGITS_V = np.array([2.0, 1.6, 1.3, 1.1, 0.7, 0.4, 0.2, -0.1, -0.5, -0.9, -1.4, -2.0])

_sample = jax.jit(sample_next, static_argnames=("config",))


def _softmax(x):
    x = x - np.max(x)
    e = np.exp(x)
    return e / e.sum()


def np_reference(
    logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seen=None, presence=0.0, repetition=1.0
):
    """The intended distribution for one row, straight from the definitions."""
    lg = np.array(logits, np.float64)
    if seen is not None:
        lg = np.where(seen & (lg > 0), lg / repetition, np.where(seen, lg * repetition, lg))
        lg = lg - presence * seen
    if temperature < 1e-5:
        out = np.zeros_like(lg)
        out[np.argmax(lg)] = 1.0
        return out
    s = lg / temperature
    probs = _softmax(s)
    keep = probs >= min_p * probs.max()
    if top_k:
        keep &= s >= np.sort(s[keep])[::-1][min(top_k, keep.sum()) - 1]
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    exclusive = np.cumsum(probs[order]) - probs[order]
    keep_sorted = exclusive < top_p  # the token that crosses top_p is kept
    keep_sorted[0] = True
    final = np.zeros_like(probs)
    final[order[keep_sorted]] = probs[order[keep_sorted]]
    return final / final.sum()


def _draw(config, n=N_DRAWS, seed=0, logits_V=LOGITS_V, **kwargs):
    logits_BV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (n, len(logits_V)))
    tokens = _sample(logits_BV, jax.random.key(seed), config, **kwargs)
    assert tokens.shape == (n,) and tokens.dtype == jnp.int32
    return np.asarray(tokens)


def _assert_matches(tokens, expected, *, naive=None):
    counts = np.bincount(tokens, minlength=len(expected))
    freq = counts / counts.sum()
    # Excluded tokens are never drawn.
    assert np.all(counts[expected == 0] == 0), (counts, expected)
    tv = 0.5 * np.abs(freq - expected).sum()
    assert tv < 0.01, (tv, freq, expected)
    support = expected > 0
    if support.sum() > 1:
        chi2 = stats.chisquare(counts[support], expected[support] * counts.sum())
        assert chi2.pvalue > 1e-4, (chi2, freq, expected)
    if naive is not None:
        # The test can fail: the intended distribution is far from the untruncated softmax.
        assert 0.5 * np.abs(expected - naive).sum() > 0.05


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0),
        dict(temperature=0.5),
        dict(temperature=1.7, top_k=4),
        dict(temperature=0.8, top_p=0.7),
        dict(temperature=1.2, min_p=0.15),
        dict(temperature=0.7, top_k=6, top_p=0.8, min_p=0.05),
    ],
    ids=["plain", "temperature", "top_k", "top_p", "min_p", "combined"],
)
def test_sample_frequencies_match_intended_distribution(kw):
    config = SamplingConfig(mode="sample", **kw)
    expected = np_reference(LOGITS_V, **kw)
    naive = None if kw == dict(temperature=1.0) else _softmax(LOGITS_V)
    _assert_matches(_draw(config), expected, naive=naive)


def test_penalties_frequencies():
    prev = np.array([0, 3, 3, 9, 5, 7], np.int32)
    mask = np.array([True, True, True, True, False, True])  # token 5 is padding: no penalty
    seen = np.zeros(V, bool)
    seen[prev[mask]] = True
    kw = dict(temperature=0.9, presence=0.8, repetition=1.6)
    config = SamplingConfig(mode="sample", temperature=0.9, presence_penalty=0.8, repetition_penalty=1.6)
    expected = np_reference(LOGITS_V, seen=seen, **kw)
    prev_BT = jnp.broadcast_to(jnp.asarray(prev), (N_DRAWS, len(prev)))
    mask_BT = jnp.broadcast_to(jnp.asarray(mask), (N_DRAWS, len(prev)))
    tokens = _draw(config, prev_tokens_BT=prev_BT, prev_mask_BT=mask_BT)
    _assert_matches(tokens, expected, naive=np_reference(LOGITS_V, temperature=0.9))
    # Negative logits get *more* negative under the repetition penalty (token 9: -0.9 -> -1.44).
    assert expected[9] < np_reference(LOGITS_V, temperature=0.9)[9]


def test_autodeco_rows_use_their_own_head_predictions():
    # Two groups of rows with different head outputs in one batch; user T and top-p multiply in.
    user = dict(temperature=0.8, top_p=0.9)
    heads = [(0.5, 0.6), (1.5, 1.0)]
    n = N_DRAWS
    t_B = jnp.asarray(np.repeat([h[0] for h in heads], n // 2), jnp.float32)
    p_B = jnp.asarray(np.repeat([h[1] for h in heads], n // 2), jnp.float32)
    config = SamplingConfig(mode="autodeco", **user)
    tokens = _draw(config, n=n, temperature_B=t_B, top_p_B=p_B)
    for g, (t_hat, p_hat) in enumerate(heads):
        expected = np_reference(LOGITS_V, temperature=t_hat * 0.8, top_p=min(max(p_hat * 0.9, 0), 1))
        _assert_matches(tokens[g * n // 2 : (g + 1) * n // 2], expected, naive=_softmax(LOGITS_V))


def test_autodeco_top_p_is_clipped_to_one():
    # P_head * user top-p > 1 clips to 1 (no truncation), it does not wrap or error.
    config = SamplingConfig(mode="autodeco", temperature=1.0, top_p=1.0)
    probs = sampling_probs(
        jnp.asarray(LOGITS_V, jnp.float32)[None],
        config,
        temperature_B=jnp.asarray([1.0]),
        top_p_B=jnp.asarray([1.7]),
    )
    np.testing.assert_allclose(np.asarray(probs[0]), _softmax(LOGITS_V), rtol=1e-5)


def test_autodeco_greedy_when_user_temperature_is_zero():
    config = SamplingConfig(mode="autodeco", temperature=0.0)
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(64, 50)), jnp.float32)
    tokens = _sample(
        logits, jax.random.key(1), config, temperature_B=jnp.full((64,), 1.5), top_p_B=jnp.full((64,), 0.9)
    )
    np.testing.assert_array_equal(tokens, np.argmax(np.asarray(logits), -1))


def test_fixed_mean_matches_intended_distribution_and_constant_heads():
    config = SamplingConfig(
        mode="fixed_mean", temperature=1.0, top_p=1.0, mean_temperature=0.798, mean_top_p=0.907
    )
    expected = np_reference(LOGITS_V, temperature=0.798, top_p=0.907)
    tokens = _draw(config, seed=3)
    _assert_matches(tokens, expected, naive=_softmax(LOGITS_V))
    # Same key, autodeco with the mean as a constant head output: identical draws.
    auto = SamplingConfig(mode="autodeco")
    tokens_auto = _draw(
        auto, seed=3, temperature_B=jnp.full((N_DRAWS,), 0.798), top_p_B=jnp.full((N_DRAWS,), 0.907)
    )
    np.testing.assert_array_equal(tokens, tokens_auto)
    # User values multiply the means as they multiply the heads' predictions.
    scaled = SamplingConfig(
        mode="fixed_mean", temperature=0.5, top_p=0.8, mean_temperature=0.798, mean_top_p=0.907
    )
    probs = sampling_probs(jnp.asarray(LOGITS_V, jnp.float32)[None], scaled)
    np.testing.assert_allclose(
        np.asarray(probs[0]), np_reference(LOGITS_V, temperature=0.399, top_p=0.907 * 0.8), atol=1e-6
    )


def test_greedy_modes():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(32, 40)), jnp.float32)
    want = np.argmax(np.asarray(logits), -1)
    for config in [SamplingConfig(mode="greedy"), SamplingConfig(mode="sample", temperature=0.0)]:
        for seed in range(3):
            np.testing.assert_array_equal(_sample(logits, jax.random.key(seed), config), want)
    # Greedy is taken after the penalties.
    prev = jnp.asarray(want[:, None])
    pen = SamplingConfig(mode="greedy", presence_penalty=100.0)
    got = np.asarray(_sample(logits, jax.random.key(0), pen, prev_tokens_BT=prev))
    assert np.all(got != want)
    second = np.argsort(-np.asarray(logits), -1)[:, 1]
    np.testing.assert_array_equal(got, second)


def test_sampling_probs_matches_reference_on_random_rows():
    rng = np.random.default_rng(2)
    B, Vr = 16, 300
    logits = rng.normal(size=(B, Vr)) * 2
    t_hat = rng.uniform(0.3, 1.8, B)
    p_hat = rng.uniform(0.05, 1.0, B)
    config = SamplingConfig(mode="autodeco", temperature=0.9, top_p=0.95, top_k=40, min_p=0.01)
    probs = np.asarray(
        sampling_probs(
            jnp.asarray(logits, jnp.float32),
            config,
            temperature_B=jnp.asarray(t_hat, jnp.float32),
            top_p_B=jnp.asarray(p_hat, jnp.float32),
        )
    )
    for b in range(B):
        want = np_reference(
            logits[b], temperature=t_hat[b] * 0.9, top_p=min(p_hat[b] * 0.95, 1.0), top_k=40, min_p=0.01
        )
        np.testing.assert_allclose(probs[b], want, atol=2e-6)


def test_top_p_keeps_the_crossing_token_and_the_top_token():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(probs)[None], jnp.float32)
    for p, n_keep in [(0.5, 1), (0.51, 2), (0.79, 2), (0.81, 3), (1.0, 4), (0.0, 1), (1e-6, 1)]:
        keep = np.asarray(top_p_keep_mask(logits, jnp.asarray([p], jnp.float32))[0])
        assert keep.sum() == n_keep and keep[:n_keep].all(), (p, keep)


def test_top_p_one_keeps_tiny_tokens():
    # Summing from the tail keeps p = 1 from dropping tiny but nonzero tokens through rounding.
    logits = jnp.asarray([[30.0, 0.0, -1.0, -2.0]], jnp.float32)
    assert np.asarray(top_p_keep_mask(logits, jnp.asarray([1.0])))[0].all()


def test_jit_with_traced_history():
    config = SamplingConfig(mode="sample", temperature=0.7, repetition_penalty=1.3, top_k=5)
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(4, 30)), jnp.float32)
    prev = jnp.asarray(np.random.default_rng(4).integers(0, 30, size=(4, 7)), jnp.int32)
    mask = jnp.ones((4, 7), bool)
    eager = sample_next(logits, jax.random.key(5), config, prev_tokens_BT=prev, prev_mask_BT=mask)
    jitted = _sample(logits, jax.random.key(5), config, prev_tokens_BT=prev, prev_mask_BT=mask)
    np.testing.assert_array_equal(eager, jitted)
    # Legacy uint32 keys work too.
    assert _sample(logits, jax.random.PRNGKey(0), config).shape == (4,)


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(mode="beam"), "mode"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.1), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(presence_penalty=float("inf")), "presence_penalty"),
        (dict(mode="fixed_mean"), "mean_temperature"),
        (dict(mode="fixed_mean", mean_temperature=0.8), "mean_top_p"),
        (dict(mode="fixed_mean", mean_temperature=0.0, mean_top_p=0.9), "mean_temperature"),
        (dict(mode="fixed_mean", mean_temperature=0.8, mean_top_p=1.2), "mean_top_p"),
        (dict(mode="sample", mean_temperature=0.8), "mean_temperature"),
    ],
)
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kw)


def test_bad_inputs_name_the_argument():
    logits = jnp.zeros((3, 10), jnp.float32)
    key = jax.random.key(0)
    cfg = SamplingConfig()
    auto = SamplingConfig(mode="autodeco")
    cases = [
        (lambda: sample_next(logits[0], key, cfg), "logits_BV"),
        (lambda: sample_next(logits.astype(jnp.int32), key, cfg), "logits_BV"),
        (lambda: sample_next(logits, jnp.zeros((3,)), cfg), "rng"),
        (lambda: sample_next(logits, key, {"mode": "sample"}), "config"),
        (
            lambda: sample_next(logits, key, cfg, prev_tokens_BT=jnp.zeros((2, 4), jnp.int32)),
            "prev_tokens_BT",
        ),
        (
            lambda: sample_next(logits, key, cfg, prev_tokens_BT=jnp.full((3, 4), 10, jnp.int32)),
            "prev_tokens_BT",
        ),
        (
            lambda: sample_next(
                logits,
                key,
                cfg,
                prev_tokens_BT=jnp.zeros((3, 4), jnp.int32),
                prev_mask_BT=jnp.ones((3, 5), bool),
            ),
            "prev_mask_BT",
        ),
        (lambda: sample_next(logits, key, cfg, prev_mask_BT=jnp.ones((3, 5), bool)), "prev_mask_BT"),
        (lambda: sample_next(logits, key, auto, top_p_B=jnp.ones(3)), "temperature_B"),
        (lambda: sample_next(logits, key, auto, temperature_B=jnp.ones(3)), "top_p_B"),
        (
            lambda: sample_next(logits, key, auto, temperature_B=jnp.ones(4), top_p_B=jnp.ones(3)),
            "temperature_B",
        ),
        (lambda: sample_next(logits, key, cfg, temperature_B=jnp.ones(3)), "temperature_B"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()
    # Out-of-range ids are fine where the mask says they are padding.
    ok = sample_next(
        logits, key, cfg, prev_tokens_BT=jnp.full((3, 2), -1, jnp.int32), prev_mask_BT=jnp.zeros((3, 2), bool)
    )
    assert ok.shape == (3,)
    # [B, 1] head outputs (the heads' own shape at one position) are accepted.
    assert sample_next(logits, key, auto, temperature_B=jnp.ones((3, 1)), top_p_B=jnp.ones((3, 1))).shape == (
        3,
    )
