"""The agent's rollouts run any registered model: a tiny random qwen3_moe (the architecture of
Tongyi-DeepResearch-30B-A3B) through both loops, scripted tool turns and free greedy turns.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm.agent import protocol as P
from jaxllm.agent import rollout as R
from jaxllm.agent import synth
from jaxllm.agent.wiki import SimulatedWiki, WikiConfig
from jaxllm.data.tokenizers import ByteTokenizer

QWEN3_MOE = pathlib.Path(__file__).parents[1] / "golden" / "qwen_family" / "qwen3_moe_tiny"
TOK = ByteTokenizer()
CFG = R.RolloutConfig(max_turns=2, turn_tokens=128, token_budget=1200, chunk=32, max_tool_errors=2)


@pytest.fixture(scope="module")
def episode():
    model, params = jaxllm.load_hf_checkpoint(QWEN3_MOE, dtype=jnp.float32)
    assert model.config.model_type == "qwen3_moe" and model.config.vocab_size >= TOK.vocab_size
    wiki = SimulatedWiki(WikiConfig(seed=0))
    person = wiki.world.by_kind("person")[0]
    qs = ["Where was Ada born?", "Who founded it?"]
    search = P.render_assistant("t", P.ToolCall("search", {"query": [person.name]}))
    forced = [[search, P.render_assistant("done", P.Answer(person.name))], []]  # row 1: free greedy turns
    kw = dict(config=CFG, system_prompt="Answer with tools.", forced_turns=forced)
    seg = R.segmented_rollout(model, params, TOK, synth.wiki_executor(wiki), qs, **kw)
    scan = R.scan_rollout(model, params, TOK, synth.wiki_executor(wiki), qs, **kw)
    return model, params, seg, scan, person


def test_scripted_row_answers_through_the_tool(episode):
    _, _, seg, _, person = episode
    assert seg.status[0] == R.ANSWERED and seg.answers[0] == person.name
    assert seg.tool_mask[0].sum() > 0  # the search observation was appended to the row


def test_both_loops_agree(episode):
    _, _, seg, scan, _ = episode
    for f in ("tokens", "kind", "lengths", "status", "turns"):
        np.testing.assert_array_equal(getattr(seg, f), getattr(scan, f), err_msg=f)
    np.testing.assert_allclose(seg.logprobs, scan.logprobs, atol=1e-5)


def test_sampled_tokens_are_the_models_greedy_choice(episode):
    """Row 1's free turns are greedy: each sampled token is the argmax of an uncached forward pass."""
    model, params, seg, _, _ = episode
    logits = np.asarray(model.apply(params, jnp.asarray(seg.tokens)).logits)
    t = np.flatnonzero(seg.model_mask[1])
    assert len(t) > 0
    np.testing.assert_array_equal(seg.tokens[1, t], logits[1, t - 1].argmax(-1))
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[1, t - 1]), -1))
    np.testing.assert_allclose(seg.logprobs[1, t], logp[np.arange(len(t)), seg.tokens[1, t]], atol=1e-4)
