"""Segmented rollout: a tiny random Kimi Linear model, the byte tokenizer and the simulated wiki.

Scripted turns (``forced_turns``) drive the tool path through the real model and caches; free
greedy turns are checked against a no-cache forward pass of the finished rows.
"""

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.agent import protocol as P
from jaxllm.agent import rollout as R
from jaxllm.agent import synth, tools, wiki_env
from jaxllm.agent.wiki import SimulatedWiki, WikiConfig
from jaxllm.data.tokenizers import ByteTokenizer
from jaxllm.ops.sampling import SamplingConfig

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from rollout_testing import assert_same as _assert_same  # noqa: E402
from rollout_testing import tiny_model  # noqa: E402

TOK = ByteTokenizer()
SYSTEM = "Answer with tools."


@pytest.fixture(scope="module")
def model_params():
    return tiny_model(TOK.vocab_size)


@pytest.fixture(scope="module")
def wiki():
    return SimulatedWiki(WikiConfig(seed=0))


def call(name, arguments, think="t"):
    return P.render_assistant(think, P.ToolCall(name, arguments))


def answer(text, think="done"):
    return P.render_assistant(think, P.Answer(text))


CFG = R.RolloutConfig(max_turns=3, turn_tokens=256, token_budget=2000, chunk=32, max_tool_errors=2)


@pytest.fixture(scope="module")
def scripted(model_params, wiki):
    """Five rows, one per way an episode ends."""
    model, params = model_params
    person = wiki.world.by_kind("person")[0]
    qs = ["Q answered?", "Q max turns?", "Q tool error?", "Q budget then answer?", "Q budget, no answer?"]
    many = [f"the {w} of {person.name}" for w in ("birthplace", "employer", "profession", "birth year")]
    forced = [
        [call("search", {"query": [person.name]}), answer(person.name)],
        [call("visit", {"url": "wiki://Nowhere_Qqq", "goal": "x"})] * 3,
        [
            '<tool_call>\n{"name": "search", "arguments": {"query": ["a",]}}\n</tool_call>',
            call("serach", {"query": ["b"]}),
        ],
        [call("search", {"query": many}), answer("1900")],
        [call("search", {"query": many}), call("search", {"query": ["more"]})],
    ]
    ex = synth.wiki_executor(wiki)
    out = R.segmented_rollout(
        model, params, TOK, ex, qs, config=CFG, system_prompt=SYSTEM, forced_turns=forced
    )
    return out, qs, forced, ex


def expected_messages(q, forced_row, observations):
    msgs = P.initial_messages(q, SYSTEM)
    for i, turn in enumerate(forced_row[: len(observations) + 1]):
        msgs.append({"role": "assistant", "content": turn})
        if i < len(observations):
            msgs.append({"role": "user", "content": observations[i]})
    return msgs


def test_statuses_turns_errors_and_answers(scripted, wiki):
    out, *_ = scripted
    person = wiki.world.by_kind("person")[0]
    assert out.status_names() == ["answered", "max_turns", "tool_error", "answered", "max_tokens"]
    assert out.turns.tolist() == [2, 3, 2, 2, 2]
    assert out.tool_errors.tolist() == [0, 0, 2, 0, 0]
    assert out.forced_answer.tolist() == [False, False, False, True, True]
    assert out.answers == [person.name, None, None, "1900", None]
    assert (out.lengths <= CFG.token_budget).all()


def test_rows_are_the_chat_template_of_the_real_observations(scripted, wiki):
    out, qs, forced, ex = scripted
    person = wiki.world.by_kind("person")[0]
    search = P.wrap_tool_response(wiki.search([person.name]))
    nowhere = P.wrap_tool_response(wiki.visit("wiki://Nowhere_Qqq", "x"))
    assert "could not be found" in nowhere
    bad_json = P.wrap_tool_response(ex.step(forced[2][0]).text)
    assert "not valid JSON" in bad_json
    obs = [[search], [nowhere, nowhere], [bad_json], [P.FORCE_ANSWER], [P.FORCE_ANSWER]]
    for r in range(len(qs)):
        msgs = expected_messages(qs[r], forced[r], obs[r])
        assert out.messages[r] == msgs, r
        text = P.render_chat(msgs, add_generation_prompt=False)
        # the row ends right after the last assistant turn's stop string (no framing after it)
        want = TOK.encode(text[: -len(P.IM_END + "\n")])
        n = out.lengths[r]
        np.testing.assert_array_equal(out.tokens[r, :n], want)
        assert (out.tokens[r, n:] == TOK.pad_id).all() and (out.kind[r, n:] == R.KIND_PAD).all()
        # kinds: the prompt, the scripted assistant contents, the rest is environment text
        k = np.full((n,), R.KIND_TOOL)
        pos = 0
        for piece, is_model in P.render_segments(msgs):
            m = len(TOK.encode(piece))
            if is_model:
                k[pos : pos + m - len(P.IM_END)] = R.KIND_FORCED
            pos += m
        k[: len(TOK.encode(P.render_chat(msgs[:2], add_generation_prompt=True)))] = R.KIND_PROMPT
        np.testing.assert_array_equal(out.kind[r, :n], k[:n])
        assert not out.model_mask[r].any()
        assert out.tool_mask[r].sum() == (k[:n] == R.KIND_TOOL).sum() > 0


def test_budget_forcing_leaves_room_and_the_long_observation_is_dropped(scripted):
    out, *_ = scripted
    # the 4-query search observation did not fit with a further turn; the force message replaced it
    for r in (3, 4):
        assert out.messages[r][3] == {"role": "user", "content": P.FORCE_ANSWER}
    assert out.lengths[3] + CFG.turn_tokens <= CFG.token_budget


def test_free_greedy_turns_equal_the_argmax_of_a_full_forward(model_params, wiki):
    model, params = model_params
    # same batch size and budget as CFG: the compiled steps are reused
    cfg = dataclasses.replace(CFG, max_turns=2, turn_tokens=80, max_tool_errors=None)
    qs = ["Where was Ada born?", "Who founded the Guild of Bakers, and when?", "x", "y?", "Capital?"]
    forced = [
        ["<think>\n"],
        [],
        ['<think>\nsearch</think>\n<tool_call>\n{"name": "search", '],
        [],
        ["<think>\n", "<think>\n"],
    ]
    out = R.segmented_rollout(
        model,
        params,
        TOK,
        synth.wiki_executor(wiki),
        qs,
        config=cfg,
        system_prompt=SYSTEM,
        forced_turns=forced,
    )
    assert set(out.status.tolist()) <= {R.ANSWERED, R.MAX_TURNS, R.MAX_TOKENS}
    assert out.model_mask.sum() > 20
    logits = np.asarray(model.apply(params, jnp.asarray(out.tokens)).logits)  # causal: padding is harmless
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), -1))
    for r in range(len(qs)):
        t = np.flatnonzero(out.model_mask[r])
        prev = logits[r, t - 1]
        chosen = prev[np.arange(len(t)), out.tokens[r, t]]
        # greedy: each sampled token is the argmax given everything before it (ties within float noise)
        assert (chosen >= prev.max(-1) - 1e-4).all(), r
        np.testing.assert_allclose(out.logprobs[r, t], logp[r, t - 1, out.tokens[r, t]], atol=1e-4)
        assert (out.logprobs[r][~out.model_mask[r]] == 0).all()
    # each row's episode is the same alone as in the batch (no cross-row leakage through padding)
    solo = R.segmented_rollout(
        model,
        params,
        TOK,
        synth.wiki_executor(wiki),
        qs[::-1],
        config=cfg,
        system_prompt=SYSTEM,
        forced_turns=forced[::-1],
    )
    np.testing.assert_array_equal(solo.tokens[::-1], out.tokens)
    np.testing.assert_array_equal(solo.kind[::-1], out.kind)
    # a turn that hit the cap without a stop string is an error observation, not a crash
    for r in range(len(qs)):
        if out.turns[r] == 2 and out.status[r] == R.MAX_TURNS:
            assert out.messages[r][3]["content"].startswith(P.TOOL_RESPONSE_OPEN + "\nError: ")


def test_cut_turn_positional_rule():
    assert R.cut_turn("a</answer>b") == ("a</answer>", "</answer>")
    assert R.cut_turn("a <tool_response>x</tool_call>") == ("a", "<tool_response>")
    assert R.cut_turn("a<|im_end|></tool_call>") == ("a", "<|im_end|>")
    assert R.cut_turn("<tool_call>{}</tool_call><|im_end|>") == ("<tool_call>{}</tool_call>", "</tool_call>")
    assert R.cut_turn("no stop") == ("no stop", None)


def test_argument_errors(model_params, wiki):
    model, params = model_params
    ex = synth.wiki_executor(wiki)
    with pytest.raises(ValueError, match="token_budget 300 is too small for row 0"):
        R.segmented_rollout(
            model,
            params,
            TOK,
            ex,
            ["q"],
            system_prompt=SYSTEM,
            config=R.RolloutConfig(turn_tokens=100, token_budget=300),
        )
    with pytest.raises(ValueError, match="forced_turns must hold one list"):
        R.segmented_rollout(model, params, TOK, ex, ["q", "r"], system_prompt=SYSTEM, forced_turns=[["x"]])
    with pytest.raises(ValueError, match=r"forced_turns\[0\]\[0\] has 9 tokens"):
        R.segmented_rollout(
            model,
            params,
            TOK,
            ex,
            ["q"],
            system_prompt=SYSTEM,
            forced_turns=[["123456789"]],
            config=R.RolloutConfig(turn_tokens=8, token_budget=600),
        )
    with pytest.raises(ValueError, match="RolloutConfig.max_tool_errors"):
        R.RolloutConfig(max_tool_errors=0)
    with pytest.raises(ValueError, match="needs an `rng`"):
        R.segmented_rollout(model, params, TOK, ex, ["q"], system_prompt=SYSTEM, sampling=SamplingConfig())


def test_sampling_is_reproducible_per_key_and_logprobs_match(model_params, wiki):
    model, params = model_params
    cfg = dataclasses.replace(CFG, max_turns=1, turn_tokens=40, max_tool_errors=None)
    qs = ["a?", "b?", "c?", "d?", "e?"]
    run = lambda key: R.segmented_rollout(
        model,
        params,
        TOK,
        synth.wiki_executor(wiki),
        qs,
        config=cfg,  # noqa
        system_prompt=SYSTEM,
        sampling=SamplingConfig(temperature=1.0),
        rng=jax.random.PRNGKey(key),
    )
    a, c = run(7), run(8)
    # same key: the compiled scan loop draws the same samples (and is reproducible)
    b = R.scan_rollout(
        model,
        params,
        TOK,
        synth.wiki_executor(wiki),
        qs,
        config=cfg,
        system_prompt=SYSTEM,
        sampling=SamplingConfig(temperature=1.0),
        rng=jax.random.PRNGKey(7),
    )
    _assert_same(a, b)
    assert not np.array_equal(a.tokens, c.tokens)
    greedy = R.segmented_rollout(
        model, params, TOK, synth.wiki_executor(wiki), qs, config=cfg, system_prompt=SYSTEM
    )
    assert not np.array_equal(a.tokens, greedy.tokens)  # sampling really samples
    logits = model.apply(params, jnp.asarray(a.tokens)).logits
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    for r in range(len(qs)):
        t = np.flatnonzero(a.model_mask[r])
        np.testing.assert_allclose(a.logprobs[r, t], logp[r, t - 1, a.tokens[r, t]], atol=1e-4)


def test_scan_rollout_equals_the_segmented_rollout(scripted, model_params, wiki):
    """lax.scan over turns + io_callback to the wiki tools == the Python-segmented loop."""
    model, params = model_params
    seg, qs, forced, _ = scripted
    scan = R.scan_rollout(
        model,
        params,
        TOK,
        synth.wiki_executor(wiki),
        qs,
        config=CFG,
        system_prompt=SYSTEM,
        forced_turns=forced,
    )
    _assert_same(seg, scan)
    # the jnp wiki step judged every canonical turn; only row 2's two bad calls went to the host
    assert scan.host_callbacks == 2
    # finished rows left the segmented loop's device batch (the scan keeps all five): same rows
    assert seg.device_rows == scan.device_rows == [5, 5, 1]
    # free greedy turns too (same compiled program: same config and batch size)
    qs2 = ["Where was Ada born?", "Who founded it?", "x", "y?", "Capital?"]
    forced2 = [["<think>\n"], [], ['<think>\nok</think>\n<tool_call>\n{"name": "search", '], [], []]
    seg2 = R.segmented_rollout(
        model,
        params,
        TOK,
        synth.wiki_executor(wiki),
        qs2,
        config=CFG,
        system_prompt=SYSTEM,
        forced_turns=forced2,
    )
    scan2 = R.scan_rollout(
        model,
        params,
        TOK,
        synth.wiki_executor(wiki),
        qs2,
        config=CFG,
        system_prompt=SYSTEM,
        forced_turns=forced2,
    )
    assert seg2.model_mask.sum() > 200
    _assert_same(seg2, scan2)
    # four rows answer at once: the fifth decodes its later turns alone in a batch of one, freely
    forced3 = [[answer(q)] for q in "abcd"] + [["<think>\n"]]
    seg3, scan3 = (
        loop(
            model,
            params,
            TOK,
            synth.wiki_executor(wiki),
            qs2,
            config=CFG,
            system_prompt=SYSTEM,
            forced_turns=forced3,
        )
        for loop in (R.segmented_rollout, R.scan_rollout)
    )
    _assert_same(seg3, scan3)
    assert seg3.device_rows[:2] == [5, 1] and seg3.turns[4] >= 2
    assert scan3.device_rows == seg3.device_rows
    second_turn = seg3.model_mask[4] & (np.arange(CFG.token_budget) > np.flatnonzero(seg3.tool_mask[4])[0])
    assert second_turn.sum() > 10  # sampled after the batch shrank
    with pytest.raises(ValueError, match="neither a ByteTokenizer nor a Hugging Face tokenizer"):
        R.scan_rollout(model, params, object(), synth.wiki_executor(wiki), ["q"])


# ------------------------------------------------------------------------------------------
# The jnp environment step of scan_rollout (simulated wiki)
# ------------------------------------------------------------------------------------------


def _canonical_rows(wiki):
    """Five rows whose turns are all canonical search/visit/answer turns: a search with more
    queries than are run (its long observation forces the final answer), visits of a known and an
    unknown page, url/goal in both orders, url as string and list, a non-ASCII query, prose and
    leading blanks around the thinking, an answer without thinking, a call after the force."""
    p, q = wiki.world.by_kind("person")[:2]
    many = [p.name, "capital", "born", "Velonia", "x"]
    return (
        ["Q many?", "Q visits?", "Q short?", "Q turns?", "Q forced call?"],
        [
            [call("search", {"query": many}), answer("1900")],
            [
                call("visit", {"url": [p.url, "wiki://Nowhere_Qqq"], "goal": "where born"}),
                call("visit", {"goal": "employer", "url": q.url}),
                answer(q.name, think=""),
            ],
            [call("search", {"query": ["café " + p.name]}), "<answer>no thinking</answer>"],
            [
                '  <think>café</think> prose <tool_call>\n{"name": "visit", "arguments": {"url": '
                '"wiki://Nowhere", "goal": "café"}}\n</tool_call>',
                call("visit", {"goal": "x", "url": [q.url]}),
                call("visit", {"url": p.url, "goal": "y"}),
            ],
            [call("search", {"query": many}), call("search", {"query": ["more"]})],
        ],
    )


def test_scan_rollout_jnp_env_needs_no_callback_for_canonical_turns(model_params, wiki):
    """All turns canonical: the jnp wiki step judges every one (zero io_callbacks) and the result
    equals the segmented loop and the host-callback scan loop."""
    model, params = model_params
    qs, forced = _canonical_rows(wiki)
    ex = synth.wiki_executor(wiki)
    assert R.wiki_of(ex) is wiki
    seg = R.segmented_rollout(
        model, params, TOK, ex, qs, config=CFG, system_prompt=SYSTEM, forced_turns=forced
    )
    assert seg.status_names() == ["answered", "answered", "answered", "max_turns", "max_tokens"]
    assert seg.forced_answer.tolist() == [True, False, False, False, True]
    assert "could not be found" in seg.messages[1][3]["content"]
    assert "(Only the first 4 queries were run.)" not in seg.messages[0][3]["content"]  # forced instead
    jnp_env = R.scan_rollout(
        model, params, TOK, ex, qs, config=CFG, system_prompt=SYSTEM, forced_turns=forced, env="jnp"
    )
    _assert_same(seg, jnp_env)
    assert jnp_env.host_callbacks == 0
    host_env = R.scan_rollout(
        model, params, TOK, ex, qs, config=CFG, system_prompt=SYSTEM, forced_turns=forced, env="host"
    )
    _assert_same(seg, host_env)
    assert host_env.host_callbacks == CFG.max_turns
    assert seg.host_callbacks is None


def test_scan_rollout_env_argument(model_params, wiki):
    model, params = model_params
    plain = tools.ToolExecutor({"search": lambda a, c: "x"})
    assert R.wiki_of(plain) is None
    assert R.wiki_of(tools.ToolExecutor(wiki.backends(), max_observation_chars=100)) is wiki
    with pytest.raises(ValueError, match="env='jnp' needs an executor made by"):
        R.scan_rollout(model, params, TOK, plain, ["q"], system_prompt=SYSTEM, env="jnp")
    with pytest.raises(ValueError, match="env must be one of"):
        R.scan_rollout(model, params, TOK, synth.wiki_executor(wiki), ["q"], env="wiki")


def _mutate(rng, text):
    alphabet = list('"\\{}[],: <>/\nabcq') + ["\x0b", "\t", "é", "\x01", "\u00a0"]
    for _ in range(rng.integers(1, 3)):
        i = int(rng.integers(0, len(text) + 1))
        op = rng.integers(0, 3)
        ch = alphabet[rng.integers(0, len(alphabet))]
        text = (
            text[:i] + ch + text[i + 1 :]
            if op == 0
            else text[:i] + ch + text[i:]
            if op == 1
            else text[:i] + text[i + 1 :]
        )
    return text


def test_jnp_judge_takes_only_turns_the_host_judge_agrees_with(wiki):
    """Soundness of the jnp parser: every turn it accepts is, for protocol.parse_assistant and
    the wiki executor, the same answer or the same non-error observation (token for token); the
    canonical forms are all accepted; random mutations of them are either accepted that way or
    left to the host."""
    ex = synth.wiki_executor(wiki)
    arrays, st = wiki_env.build_env(wiki, TOK, ex)
    B, L, T = 48, 256, 4000
    judge = jax.jit(functools.partial(wiki_env.jnp_judge, T=T, L=L, max_turns=8, pad=0), static_argnums=1)
    _, rows = _canonical_rows(wiki)
    p = wiki.world.by_kind("person")[3]
    canon = [t for row in rows for t in row] + [
        call("search", {"query": [""]}),
        call("visit", {"url": ["a", "b", "c", "d", "e"], "goal": ""}),
        call("visit", {"goal": p.name, "url": [p.url, p.url]}),
        "<think></think><answer>.</answer>",
    ]
    rng = np.random.default_rng(0)
    texts = canon + [_mutate(rng, canon[int(rng.integers(0, len(canon)))]) for _ in range(2 * B - len(canon))]
    taken = []
    for lo in range(0, len(texts), B):
        batch = texts[lo : lo + B]
        ids = [TOK.encode(t)[:L] for t in batch]
        tok = np.zeros((B, L), np.int32)
        for i, x in enumerate(ids):
            tok[i, : len(x)] = x
        n = jnp.asarray([len(x) for x in ids] + [0] * (B - len(ids)))
        zeros = jnp.zeros((B,), jnp.int32)
        ok, status, turns, consec, forced, pend, n_pend, is_ans, a_lo, a_hi = map(
            np.asarray,
            judge(
                arrays,
                st,
                jnp.asarray(tok),
                n,
                jnp.full((B,), 100),
                jnp.arange(B) < len(batch),
                zeros,
                zeros,
                zeros,
                jnp.zeros((B,), bool),
                jnp.int32(T - 300),
            ),
        )
        for i, text in enumerate(batch):
            action = P.parse_assistant(R.cut_turn(TOK.decode(ids[i]))[0])
            taken.append(bool(ok[i]))
            if not ok[i]:
                continue
            assert turns[i] == 1, text
            if is_ans[i]:
                assert isinstance(action, P.Answer), text
                assert TOK.decode(ids[i][a_lo[i] : a_hi[i]]).strip() == action.text
                assert status[i] == R.ANSWERED and n_pend[i] == 0
            else:
                assert isinstance(action, P.ToolCall) and action.name in ("search", "visit"), text
                obs = ex.execute(action)
                assert not obs.error, text
                want = TOK.encode(wiki_env.framing(P.wrap_tool_response(obs.text), False))
                np.testing.assert_array_equal(pend[i, : n_pend[i]], want, err_msg=text)
                assert status[i] == R.RUNNING and consec[i] == 0 and not forced[i]
    assert all(taken[: len(canon)]), [t for t, k in zip(canon, taken) if not k]
    # ids that decode() drops (specials, ids past the byte vocabulary of a bigger model) are the
    # host's: the same canonical search with one such id inside its query is not taken
    ids = TOK.encode(canon[0])
    q = canon[0].index('"query": ["') + 12
    tok = np.zeros((B, L), np.int32)
    for i, bad in enumerate((None, TOK.eos_id, TOK.vocab_size + 40)):
        tok[i, : len(ids)] = ids
        if bad is not None:
            tok[i, q] = bad
    zeros = jnp.zeros((B,), jnp.int32)
    ok = np.asarray(
        judge(
            arrays,
            st,
            jnp.asarray(tok),
            jnp.full((B,), len(ids)),
            jnp.full((B,), 100),
            jnp.arange(B) < 3,
            zeros,
            zeros,
            zeros,
            jnp.zeros((B,), bool),
            jnp.int32(T - 300),
        )[0]
    )
    assert ok[:3].tolist() == [True, False, False]
    # an observation over the executor's character cap is cut by the host (with its note)
    small = tools.ToolExecutor(wiki.backends(), max_observation_chars=100)
    assert R.wiki_of(small) is wiki
    _, st_small = wiki_env.build_env(wiki, TOK, small)
    tok[1:3] = 0
    last = TOK.encode(rows[0][1])  # an answer turn
    tok[1, : len(last)] = last
    n = jnp.asarray([len(ids), len(last)] + [0] * (B - 2))
    ok = np.asarray(
        judge(
            arrays,
            st_small,
            jnp.asarray(tok),
            n,
            jnp.full((B,), 100),
            jnp.arange(B) < 2,
            zeros,
            zeros,
            zeros,
            jnp.zeros((B,), bool),
            jnp.int32(T - 300),
        )[0]
    )
    assert ok[:2].tolist() == [False, True]
    assert small.step(canon[0]).text.endswith("more characters]")
    mutated = taken[len(canon) :]
    assert 5 < sum(mutated) < len(mutated) - 20, sum(mutated)


def test_scan_rollout_jnp_env_sends_other_turns_to_the_host(model_params, wiki):
    """Valid calls in a non-canonical form (compact JSON, an escaped quote), a PythonInterpreter
    call run by the sandbox, and a malformed turn go through the host callback in the same turn
    as canonical rows judged in jnp; later all-canonical turns make no callback; same result as
    the segmented loop."""
    model, params = model_params
    p = wiki.world.by_kind("person")[1]
    ex = tools.ToolExecutor({**wiki.backends(), "PythonInterpreter": tools.python_backend(timeout_s=10)})
    assert R.wiki_of(ex) is wiki
    qs = ["Q python?", "Q compact?", "Q escape?", "Q canonical?", "Q malformed?"]
    forced = [
        [P.render_assistant("run", P.ToolCall("PythonInterpreter", {}, code="print(6 * 7)")), answer("42")],
        [
            '<tool_call>\n{"name":"search","arguments":{"query":["' + p.name + '"]}}\n</tool_call>',
            call("visit", {"url": [p.url], "goal": "born"}),
            answer(p.name),
        ],
        [call("search", {"query": ['"' + p.name + '" born']}), answer("x")],
        [call("search", {"query": [p.name]}), answer("y")],
        ["<think>use <tool_call></think><tool_call>\n{}\n</tool_call>", answer("z")],
    ]
    seg = R.segmented_rollout(
        model, params, TOK, ex, qs, config=CFG, system_prompt=SYSTEM, forced_turns=forced
    )
    assert seg.tool_errors.tolist() == [0, 0, 0, 0, 1]
    assert "42" in seg.messages[0][3]["content"]
    assert seg.messages[1][3]["content"] == seg.messages[3][3]["content"]  # same search, either form
    scan = R.scan_rollout(model, params, TOK, ex, qs, config=CFG, system_prompt=SYSTEM, forced_turns=forced)
    _assert_same(seg, scan)
    assert scan.host_callbacks == 1


class _Heads(nn.Module):
    """Stand-in AutoDeco heads that read both inputs: temperature from the hidden state, top-p
    from the logits (the real heads' interface: `apply(params, hidden_BD, logits_BV)`)."""

    @nn.compact
    def __call__(self, hidden_BD, logits_BV):
        scale = self.param("scale", nn.initializers.constant(1.0), ())
        t_B = scale * (0.5 + jax.nn.sigmoid(hidden_BD[:, 0].astype(jnp.float32)))
        p_B = 0.7 + 0.3 * jax.nn.sigmoid(logits_BV.max(-1) - logits_BV.mean(-1))
        return {"temperature_B": t_B, "top_p_B": p_B}


def test_scan_equals_segmented_with_autodeco_sampling(model_params, wiki):
    """Both loops pick through the engine: AutoDeco heads, per-row keys, same draws."""
    model, params = model_params
    qs = ["Where was Ada born?", "Who founded it?", "x", "y?", "Capital?"]
    forced = [["<think>\n"], [], [], [], []]
    heads = _Heads()
    kw = dict(config=CFG, system_prompt=SYSTEM, forced_turns=forced, sampling=SamplingConfig(mode="autodeco"))

    def run(loop, scale, seed):
        hp = {"params": {"scale": jnp.float32(scale)}}
        ex = synth.wiki_executor(wiki)
        return loop(model, params, TOK, ex, qs, rng=jax.random.key(seed), autodeco=(heads, hp), **kw)

    seg, scan = run(R.segmented_rollout, 3.0, 1), run(R.scan_rollout, 3.0, 1)
    _assert_same(seg, scan)
    greedy = R.segmented_rollout(
        model,
        params,
        TOK,
        synth.wiki_executor(wiki),
        qs,
        config=CFG,
        system_prompt=SYSTEM,
        forced_turns=forced,
    )
    assert (seg.tokens != greedy.tokens).any()  # the heads' temperatures really sampled
    cold = run(R.segmented_rollout, 1e-6, 1)  # the heads' temperature drives the draws: near 0 is greedy
    np.testing.assert_array_equal(cold.tokens, greedy.tokens)
    with pytest.raises(ValueError, match="go together"):
        R.segmented_rollout(
            model,
            params,
            TOK,
            synth.wiki_executor(wiki),
            qs,
            config=CFG,
            sampling=SamplingConfig(),
            rng=jax.random.key(0),
            autodeco=(heads, {}),
        )


def test_penalties_see_each_rows_assistant_tokens(model_params, wiki):
    """Presence/repetition penalties in both loops (the same draws): a presence penalty far above
    any logit at a near-greedy temperature never repeats a token the row's assistant turns already
    hold, forced tokens included, while the same sampling without it does."""
    model, params = model_params
    qs = ["Where was Ada born?", "Who founded it?", "Capital?"]
    forced = [["<think>\nabcdefgh"], [], ["<think>\n"]]
    cfg = R.RolloutConfig(max_turns=2, turn_tokens=24, token_budget=800, chunk=32)
    kw = dict(config=cfg, system_prompt=SYSTEM, forced_turns=forced, rng=jax.random.key(3))
    strong = SamplingConfig(temperature=0.05, presence_penalty=1e4, repetition_penalty=1.5)

    def run(loop, sampling):
        return loop(model, params, TOK, synth.wiki_executor(wiki), qs, sampling=sampling, **kw)

    seg, scan = run(R.segmented_rollout, strong), run(R.scan_rollout, strong)
    _assert_same(seg, scan)

    def repeats(res):
        n = 0
        for r in range(len(qs)):
            mine = res.assistant_mask[r]
            for t in np.flatnonzero(res.model_mask[r]):
                n += res.tokens[r, t] in set(res.tokens[r, :t][mine[:t]].tolist())
        return n

    assert seg.model_mask.sum() > 40 and repeats(seg) == 0
    assert repeats(run(R.segmented_rollout, SamplingConfig(temperature=0.05))) > 5


def test_rows_split_over_the_data_axis_equal_one_device():
    """Both loops with `mesh=` (4 virtual CPU devices, data=4): each device holds and decodes its
    own rows (the row arrays come back split over `data`), and every result equals the same
    sampled rollout on one device; rows that do not divide over the axis are refused. One RL update
    of those rows on data=2 x fsdp=2 (the agent RL trainer's mesh) equals it on one device."""
    script = pathlib.Path(__file__).with_name("rollout_mesh_script.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for loop in ("segmented", "scan"):
        assert got[loop]["devices"] == 4 and got[loop]["row_block"] == [1, 8], got
        assert got[loop]["model_tokens"] > 20
    assert "3 rows do not split evenly over the mesh's 'data' axis of 4" in got["error"]
    assert got["rl"]["sharded_params"] > 0 and abs(got["rl"]["loss"]) > 1e-4, got
