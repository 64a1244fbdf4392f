"""generate(): cached greedy == uncached greedy, argument checks, sampling and AutoDeco wiring."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm.decode import decode_step, prefill
from jaxllm.models.config import KimiLinearConfig
from jaxllm.models.kimi_linear import KimiLinear

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"
N_NEW = 4  # one max_new_tokens everywhere: generate's compiled function is reused


@pytest.fixture(scope="module")
def tiny():
    config = KimiLinearConfig.from_file(CONFIGS / "tiny.json", kda_impl="recurrent").replace(
        num_hidden_layers=2, layer_types=("kda", "mla"), mlp_layer_types=("dense", "moe")
    )
    model = KimiLinear(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    prompt = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, config.vocab_size)
    return model, params, prompt


def test_cached_greedy_equals_uncached(tiny):
    model, params, prompt = tiny
    n = N_NEW
    out = np.asarray(jaxllm.generate(model, params, prompt, max_new_tokens=n))
    assert out.shape == (2, 9 + n) and out.dtype == np.int32
    np.testing.assert_array_equal(out[:, :9], prompt)
    seq = np.zeros((2, 9 + n), np.int32)
    seq[:, :9] = prompt
    apply = jax.jit(model.apply)
    for t in range(9, 9 + n):  # re-run the whole (right-padded, causal) sequence every step, no cache
        seq[:, t] = np.argmax(np.asarray(apply(params, jnp.asarray(seq)).logits)[:, t - 1], -1)
    np.testing.assert_array_equal(out, seq)


def test_prefill_and_step_helpers(tiny):
    model, params, prompt = tiny
    logits, hidden, cache = prefill(model, params, prompt, 12)
    assert logits.shape == (2, 9, 256) and hidden.shape == (2, 9, 64) and cache.pos.tolist() == [9, 9]
    l1, h1, cache = decode_step(model, params, jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache)
    assert l1.shape == (2, 256) and h1.shape == (2, 64) and cache.pos.tolist() == [10, 10]


def test_argument_checks(tiny):
    model, params, prompt = tiny
    np.testing.assert_array_equal(jaxllm.generate(model, params, prompt, max_new_tokens=0), prompt)
    with pytest.raises(ValueError, match="prompt_ids: token ids must be in"):
        jaxllm.generate(model, params, prompt.at[0, 3].set(256), max_new_tokens=N_NEW)
    with pytest.raises(ValueError, match="prompt_ids must be"):
        jaxllm.generate(model, params, prompt[0], max_new_tokens=N_NEW)
    with pytest.raises(ValueError, match="max_new_tokens"):
        jaxllm.generate(model, params, prompt, max_new_tokens=-1)


sampling = pytest.importorskip("jaxllm.ops.sampling")


def test_sampling_greedy_mode_and_rng(tiny):
    model, params, prompt = tiny
    greedy = jaxllm.generate(model, params, prompt, max_new_tokens=N_NEW)
    cfg = sampling.SamplingConfig(mode="greedy")
    same = jaxllm.generate(
        model, params, prompt, max_new_tokens=N_NEW, sampling=cfg, rng=jax.random.PRNGKey(0)
    )
    np.testing.assert_array_equal(same, greedy)
    hot = sampling.SamplingConfig(temperature=5.0)
    a = jaxllm.generate(model, params, prompt, max_new_tokens=N_NEW, sampling=hot, rng=jax.random.PRNGKey(3))
    b = jaxllm.generate(model, params, prompt, max_new_tokens=N_NEW, sampling=hot, rng=jax.random.PRNGKey(3))
    c = jaxllm.generate(model, params, prompt, max_new_tokens=N_NEW, sampling=hot, rng=jax.random.PRNGKey(4))
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()
    assert ((np.asarray(a) >= 0) & (np.asarray(a) < 256)).all()
    with pytest.raises(ValueError, match="rng"):
        jaxllm.generate(model, params, prompt, max_new_tokens=N_NEW, sampling=hot)


class _Heads(nn.Module):
    """Stand-in AutoDeco heads that read their inputs: a row is cold (T = 1e-7, so greedy) when the
    argmax of its logits plus the sign bit of hidden[0] is even, else hot (T = t); top-p is p."""

    @nn.compact
    def __call__(self, hidden_BD, logits_BV):
        t = self.param("t", nn.initializers.constant(1.0), ())
        p = self.param("p", nn.initializers.constant(0.9), ())
        parity_B = (jnp.argmax(logits_BV, -1) + (hidden_BD[:, 0] > 0)) % 2
        return {
            "temperature_B": jnp.where(parity_B == 0, 1e-7, t),
            "top_p_B": jnp.full(hidden_BD.shape[:1], p),
        }


def test_autodeco_heads_drive_sampling(tiny):
    model, params, prompt = tiny
    greedy = np.asarray(jaxllm.generate(model, params, prompt, max_new_tokens=N_NEW))
    cfg = sampling.SamplingConfig(mode="autodeco")
    heads = _Heads()
    apply = jax.jit(lambda seq: (lambda o: (o.logits, o.hidden))(model.apply(params, seq)))

    def run(t, p, seed):
        hp = {"params": {"t": jnp.float32(t), "p": jnp.float32(p)}}
        out = np.asarray(
            jaxllm.generate(
                model,
                params,
                prompt,
                max_new_tokens=N_NEW,
                sampling=cfg,
                rng=jax.random.PRNGKey(seed),
                autodeco=(heads, hp),
            )
        )
        return out, hp

    # A top-p below every probability keeps only the argmax, however hot: greedy rows throughout.
    out, _ = run(50.0, 1e-6, 0)
    np.testing.assert_array_equal(out, greedy)
    # Hot rows at T = 50, p = 0.9: recompute every step's logits and hidden without the cache, ask
    # the heads which rows were cold there, and check exactly those took the argmax.
    n_cold = n_hot_off_argmax = 0
    for seed in range(3):
        out, hp = run(50.0, 0.9, seed)
        logits_BTV, hidden_BTD = apply(jnp.asarray(out))
        for t in range(prompt.shape[1], out.shape[1]):
            t_B = np.asarray(heads.apply(hp, hidden_BTD[:, t - 1], logits_BTV[:, t - 1])["temperature_B"])
            argmax_B = np.asarray(jnp.argmax(logits_BTV[:, t - 1], -1))
            cold_B = t_B < 1.0
            np.testing.assert_array_equal(out[cold_B, t], argmax_B[cold_B])
            n_cold += int(cold_B.sum())
            n_hot_off_argmax += int((out[~cold_B, t] != argmax_B[~cold_B]).sum())
    assert n_cold > 0 and n_hot_off_argmax > 0, (n_cold, n_hot_off_argmax)
