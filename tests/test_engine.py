"""The inference engine (`jaxllm.decode`): a ragged batch decodes each row exactly as that prompt alone.

Prompts of 3, 17, 64 and 130 tokens, each row with its own stop id (a token its greedy continuation
emits), decoded in one batch with chunked prefill (chunks of 32: the 130-token row spans five
appends, the 3-token row is padding after its first) must give, row for row, the tokens, lengths and
stop flags of each prompt decoded alone (one row, another padding and chunking). Sampling with
per-row keys: the same, draw for draw.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm import decode
from jaxllm.ops.sampling import SamplingConfig

GOLDEN = pathlib.Path(__file__).parent / "golden"
MODELS = ["kimi_linear_tiny", "kimi_linear_tiny_hubcfg", "qwen_family/qwen3_tiny"]
LENGTHS = (3, 17, 64, 130)
N_NEW = 8
ALONE = dict(pad_to=256, prefill_chunk=64)  # one compile for every prompt alone
BATCH = dict(prefill_chunk=32)


@functools.lru_cache(maxsize=None)
def _load(name):
    model, params = jaxllm.load_hf_checkpoint(GOLDEN / name, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in LENGTHS]
    return model, params, prompts


@pytest.fixture(scope="module", params=MODELS, ids=[m.split("/")[-1] for m in MODELS])
def golden(request):
    return _load(request.param)


@pytest.fixture(scope="module")
def kimi():
    return _load(MODELS[0])


@pytest.fixture(scope="module")
def qwen():
    return _load(MODELS[2])


def _rows(c: decode.Completion):
    return np.asarray(c.tokens), np.asarray(c.lengths), np.asarray(c.stopped)


def test_ragged_batch_equals_each_prompt_alone(golden):
    model, params, prompts = golden
    free = [_rows(jaxllm.complete(model, params, [p], N_NEW, **ALONE))[0][0] for p in prompts]
    # each row stops on a token its own continuation emits (its first occurrence ends the row)
    stops = [[int(f[k])] for f, k in zip(free, (2, 4, 1, 6))]
    alone = [
        _rows(jaxllm.complete(model, params, [p], N_NEW, stop_ids=s, **ALONE)) for p, s in zip(prompts, stops)
    ]
    tokens, lengths, stopped = _rows(jaxllm.complete(model, params, prompts, N_NEW, stop_ids=stops, **BATCH))
    for b, (t, n, s) in enumerate(alone):
        np.testing.assert_array_equal(tokens[b], t[0], err_msg=f"row {b}")
        assert lengths[b] == n[0] and stopped[b] == s[0], (b, lengths[b], n[0])
        assert stopped[b] and tokens[b][lengths[b] - 1] == stops[b][0]
        assert (tokens[b][lengths[b] :] == 0).all()  # pad after the stop
    assert len(set(lengths.tolist())) > 1  # the rows really stopped at different steps


def test_finished_rows_leave_the_batch(kimi):
    """16 rows, 12 of which stop within their first 3 tokens: once the live ones fit a batch of 8
    they decode there (`decode.on_live_rows`), with the tokens of the full batch."""
    model, params, _ = kimi
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in rng.integers(2, 12, 16)]
    free = np.asarray(jaxllm.complete(model, params, prompts, N_NEW, prefill_chunk=16).tokens)
    stops = [[int(free[b, b % 3])] for b in range(12)] + [[]] * 4
    out = jaxllm.complete(model, params, prompts, N_NEW, stop_ids=stops, prefill_chunk=16)
    tokens, lengths, steps = (np.asarray(x) for x in (out.tokens, out.lengths, out.batch_steps))
    for b in range(16):
        np.testing.assert_array_equal(tokens[b, : lengths[b]], free[b, : lengths[b]], err_msg=f"row {b}")
    assert (lengths[:12] <= 3).all() and (lengths[12:] == N_NEW).all()
    # after step 2 eight rows are done (those stopping within 2 tokens) and the 8 live ones move
    # into a batch of 8: the done rows are computed no more, the live ones to the end
    early = [b for b in range(12) if b % 3 != 2]
    assert (steps[early] == 2).all() and (steps[12:] == N_NEW).all(), steps


def test_sampled_rows_depend_only_on_their_keys(kimi):
    model, params, prompts = kimi
    sampling = SamplingConfig(temperature=1.5, top_p=0.95)
    keys = jax.random.split(jax.random.key(7), len(prompts))
    batch = _rows(jaxllm.complete(model, params, prompts, N_NEW, sampling, keys, **BATCH))[0]
    greedy = _rows(jaxllm.complete(model, params, prompts, N_NEW, **BATCH))[0]
    assert (batch != greedy).any()  # it really sampled
    for b, p in enumerate(prompts):
        alone = _rows(jaxllm.complete(model, params, [p], N_NEW, sampling, keys[b : b + 1], **ALONE))[0]
        np.testing.assert_array_equal(batch[b], alone[0], err_msg=f"row {b}")


def test_stop_sequences_and_logprobs(qwen):
    model, params, prompts = qwen
    free = jaxllm.complete(model, params, prompts[:2], N_NEW, **BATCH)
    t = np.asarray(free.tokens)
    seqs = [[[int(t[0, 2]), int(t[0, 3])]], [[int(t[1, 5])]]]  # row 0: a 2-token sequence; row 1: one token
    done = jaxllm.complete(model, params, prompts[:2], N_NEW, stop_sequences=seqs, **BATCH)
    n = np.asarray(done.lengths)
    assert n.tolist()[0] <= 4 and n.tolist()[1] <= 6 and np.asarray(done.stopped).all()
    np.testing.assert_array_equal(np.asarray(done.tokens)[0, : n[0]], t[0, : n[0]])
    # log-probabilities of the greedy tokens under an uncached forward of prompt + new tokens
    seq = jnp.asarray([prompts[0] + t[0].tolist()])
    logp = jax.nn.log_softmax(model.apply(params, seq).logits[0], -1)
    L = len(prompts[0])
    want = [float(logp[L - 1 + i, t[0, i]]) for i in range(N_NEW)]
    np.testing.assert_allclose(np.asarray(free.logprobs)[0], want, atol=1e-4)


def test_a_new_prompt_length_in_the_same_bucket_compiles_nothing(qwen):
    model, params, prompts = qwen
    jaxllm.complete(model, params, [prompts[1][:9]], 2)
    before = decode._complete_fn.cache_info()
    for n in (10, 12, 16):  # bucket 16, like 9
        jaxllm.complete(model, params, [prompts[1][:n]], 2)
    after = decode._complete_fn.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 3


def test_bad_arguments_are_named(qwen):
    model, params, prompts = qwen
    V = model.config.vocab_size
    for kwargs, match in (
        (dict(prompts=[[1, 2], []]), "prompt 1 must be a non-empty"),
        (dict(prompts=[[1, V]]), r"prompt 0: token ids must be in"),
        (dict(stop_ids=[V]), "stop ids must be ints"),
        (dict(stop_ids=[[1], [2], [3]]), "one list per row needs 2"),
        (dict(pad_to=4), "pad_to must be"),
        (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
        (dict(sampling=SamplingConfig()), "sampling needs an `rng`"),
    ):
        args = dict(prompts=[[1, 2, 3, 4, 5], [6]], max_new_tokens=2) | kwargs
        with pytest.raises(ValueError, match=match):
            jaxllm.complete(model, params, **args)


def test_stream_yields_completes_tokens_step_by_step(qwen):
    model, params, prompts = qwen
    stops = [[], [int(jaxllm.complete(model, params, [prompts[1]], 4).tokens[0, 1])]]
    done = jaxllm.complete(model, params, prompts[:2], N_NEW, stop_ids=stops, **BATCH)
    steps = list(decode.stream(model, params, prompts[:2], N_NEW, stop_ids=stops, **BATCH))
    tokens = np.stack([t for t, _ in steps], 1)
    live = np.stack([v for _, v in steps], 1)
    np.testing.assert_array_equal(live.sum(1), np.asarray(done.lengths))
    np.testing.assert_array_equal(np.where(live, tokens, 0), np.asarray(done.tokens)[:, : tokens.shape[1]])
    assert live[0].all() and live[1].sum() == 2  # row 1 stopped after its stop id, row 0 ran on
