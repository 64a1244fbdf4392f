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
N_NEW = 4   # one max_new_tokens everywhere: generate's compiled function is reused


@pytest.fixture(scope="module")
def tiny():
    config = KimiLinearConfig.from_file(CONFIGS / "tiny.json", kda_impl="recurrent").replace(
        num_hidden_layers=2, layer_types=("kda", "mla"), mlp_layer_types=("dense", "moe"))
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
    for t in range(9, 9 + n):   # re-run the whole (right-padded, causal) sequence every step, no cache
        seq[:, t] = np.argmax(np.asarray(apply(params, jnp.asarray(seq)))[:, t - 1], -1)
    np.testing.assert_array_equal(out, seq)


def test_prefill_and_step_helpers(tiny):
    model, params, prompt = tiny
    logits, hidden, cache = prefill(model, params, prompt, 12)
    assert logits.shape == (2, 9, 256) and hidden.shape == (2, 9, 64) and int(cache.pos) == 9
    l1, h1, cache = decode_step(model, params, jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache)
    assert l1.shape == (2, 256) and h1.shape == (2, 64) and int(cache.pos) == 10


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
    same = jaxllm.generate(model, params, prompt, max_new_tokens=N_NEW, sampling=cfg, rng=jax.random.PRNGKey(0))
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
    """Stand-in AutoDeco heads: temperature and top-p are parameters."""

    @nn.compact
    def __call__(self, hidden_BD, logits_BV):
        t = self.param("t", nn.initializers.constant(1.0), ())
        p = self.param("p", nn.initializers.constant(0.9), ())
        B = hidden_BD.shape[0]
        return {"temperature_B": jnp.full((B,), t), "top_p_B": jnp.full((B,), p)}


def test_autodeco_heads_drive_sampling(tiny):
    model, params, prompt = tiny
    greedy = jaxllm.generate(model, params, prompt, max_new_tokens=N_NEW)
    cfg = sampling.SamplingConfig(mode="autodeco")
    heads = _Heads()
    hp = heads.init(jax.random.PRNGKey(0), jnp.zeros((2, 64)), jnp.zeros((2, 256)))
    cold = {"params": {"t": jnp.float32(1e-7), "p": jnp.float32(0.9)}}
    out = jaxllm.generate(model, params, prompt, max_new_tokens=N_NEW, sampling=cfg,
                          rng=jax.random.PRNGKey(0), autodeco=(heads, cold))
    np.testing.assert_array_equal(out, greedy)          # heads say T ~ 0 -> greedy rows
    hot = {"params": {"t": jnp.float32(50.0), "p": hp["params"]["p"]}}
    outs = {tuple(np.asarray(jaxllm.generate(model, params, prompt, max_new_tokens=N_NEW, sampling=cfg,
                                             rng=jax.random.PRNGKey(s), autodeco=(heads, hot))).ravel())
            for s in range(3)}
    assert len(outs) > 1                                # heads say T = 50 -> random draws
