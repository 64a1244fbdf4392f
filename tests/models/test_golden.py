"""The two golden Kimi Linear checkpoints (saved by transformers 5.24): logits and cached greedy ids."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm

CASES = ["kimi_linear_tiny", "kimi_linear_tiny_hubcfg"]


def rel_rms(ref, x):
    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    return float(np.sqrt(np.mean((ref - x) ** 2)) / np.sqrt(np.mean(ref**2)))


KDA_IMPLS = ("recurrent", "chunk")  # both always ship; a broken import must fail, not drop cases


@pytest.mark.parametrize("impl", KDA_IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_golden_logits(golden_dir, case, impl):
    model, params = jaxllm.load_hf_checkpoint(golden_dir / case, dtype=jnp.float32, kda_impl=impl)
    g = np.load(golden_dir / case / "golden.npz")
    logits = model.apply(params, jnp.asarray(g["input_ids"])).logits
    assert logits.shape == g["logits"].shape
    assert logits.dtype == jnp.float32
    assert rel_rms(g["logits"], logits) <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_golden_greedy_generate(golden_dir, case):
    model, params = jaxllm.load_hf_checkpoint(golden_dir / case, kda_impl="recurrent")
    g = np.load(golden_dir / case / "golden.npz")
    prompt, want = g["input_ids"], g["greedy_ids"]
    out = jaxllm.generate(model, params, prompt, max_new_tokens=want.shape[1] - prompt.shape[1])
    np.testing.assert_array_equal(np.asarray(out), want)
