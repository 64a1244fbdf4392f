"""SFT data and the RL loss pieces of `jaxllm.agent.train` against hand-computed numbers, plus one
real RL update on a tiny model. (The end-to-end sft -> rl -> run smoke test is in
test_agent_cli.py.)"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.agent import evaluate, protocol, rollout
from jaxllm.agent import train as at
from jaxllm.data.tokenizers import ByteTokenizer
from jaxllm.errors import NonFiniteLossError
from jaxllm.models.config import KimiLinearConfig
from jaxllm.models.kimi_linear import KimiLinear
from jaxllm.train.step import check_finite

TOK = ByteTokenizer()


# ------------------------------------------------------------------------------------ SFT data


def _traj():
    return [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "<think>\nhmm\n</think>\n" + protocol.render_tool_call("search", {"query": ["x"]}),
        },
        {"role": "user", "content": protocol.wrap_tool_response("obs")},
        {"role": "assistant", "content": "<think>\nso\n</think>\n<answer>\nA\n</answer>"},
    ]


def test_sft_example_masks_exactly_the_assistant_turns():
    msgs = _traj()
    ids, model = at.sft_example(msgs, TOK)
    assert TOK.decode(ids) == protocol.render_chat(msgs)
    # The model tokens are the two assistant contents, each with its <|im_end|>, nothing else.
    runs, cur = [], []
    for t, m in zip(ids, model):
        if m:
            cur.append(t)
        elif cur:
            runs.append(TOK.decode(cur))
            cur = []
    assert runs == [msgs[2]["content"] + "<|im_end|>", msgs[4]["content"] + "<|im_end|>"]


def test_strip_think_keeps_the_actions_and_observations():
    out = at.strip_think(_traj())
    assert out[2]["content"] == '<tool_call>\n{"name": "search", "arguments": {"query": ["x"]}}\n</tool_call>'
    assert out[4]["content"] == "<answer>\nA\n</answer>"
    assert out[3] == _traj()[3] and out[:2] == _traj()[:2]
    assert isinstance(protocol.parse_assistant(out[2]["content"]), protocol.ToolCall)
    bad = _traj()
    bad[2]["content"] = "no action"
    with pytest.raises(ValueError, match="message 2"):
        at.strip_think(bad)


def test_pack_and_batch_loss_mask_by_hand():
    # Three examples; model flags chosen by hand. seq_len 7 -> rows of 8 slots.
    ex = [
        (np.array([10, 11, 12, 13, 14]), np.array([0, 0, 1, 1, 1], bool)),
        (np.array([20, 21, 22]), np.array([0, 1, 1], bool)),
        (np.array([30, 31, 32, 33]), np.array([0, 0, 0, 1], bool)),
    ]
    packed = at.pack_examples(ex, 7, pad_id=0, seed=0)
    # Every example appears exactly once, contiguous, under one segment id.
    seen = []
    for r in range(packed["tokens"].shape[0]):
        for s in range(1, packed["segments"][r].max() + 1):
            sel = packed["segments"][r] == s
            seen.append(tuple(packed["tokens"][r][sel]))
            i = [j for j, e in enumerate(ex) if tuple(e[0]) == seen[-1]][0]
            assert np.array_equal(packed["model"][r][sel], ex[i][1])
    assert sorted(seen) == sorted(tuple(e[0]) for e in ex)
    assert packed["tokens"].shape == (2, 8)  # 5 + 3 fit one row, 4 the next
    # A hand-built row: [ex1 | ex2 | pad]: the loss counts targets 12, 13, 14 (inside ex1) and 21, 22.
    row = {
        "tokens": np.array([[10, 11, 12, 13, 14, 20, 21, 22, 0]]),
        "segments": np.array([[1, 1, 1, 1, 1, 2, 2, 2, 0]]),
        "model": np.array([[0, 0, 1, 1, 1, 0, 1, 1, 0]], bool),
    }
    b = at.sft_batch(row, [0])
    assert b["inputs"].tolist() == [[10, 11, 12, 13, 14, 20, 21, 22]]
    assert b["targets"].tolist() == [[11, 12, 13, 14, 20, 21, 22, 0]]
    assert b["loss_mask"].tolist() == [[0, 1, 1, 1, 0, 1, 1, 0]]
    assert b["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 2, 2, 2]]
    with pytest.raises(ValueError, match="example 0 has 5 tokens"):
        at.pack_examples(ex, 3)


# ------------------------------------------------------------------------------------ RL pieces


def test_leave_one_out_advantage_by_hand():
    a = np.asarray(at.loo_advantages([[1, 0, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]]))
    np.testing.assert_allclose(a[0], [2 / 3, -2 / 3, -2 / 3, 2 / 3], atol=1e-6)
    np.testing.assert_allclose(a[1], 0, atol=0)
    np.testing.assert_allclose(a[2], [1, -1 / 3, -1 / 3, -1 / 3], atol=1e-6)
    # = G/(G-1) (r - mean), no std division.
    r = np.array([[1.0, 0, 1, 1, 0]])
    np.testing.assert_allclose(at.loo_advantages(r), 5 / 4 * (r - r.mean()), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        at.loo_advantages([[1.0]])


def test_clipped_loss_both_sides_by_hand():
    # Four rows, one counted token each (t=1); t=0 and t=2 are masked and carry wild ratios.
    rho = np.array([1.5, 0.5, 1.5, 0.5])
    adv = np.array([1.0, -1.0, -1.0, 1.0])
    old = np.zeros((4, 3), np.float32)
    logp = np.full((4, 3), 5.0, np.float32)  # masked positions: ratio e^5
    logp[:, 1] = np.log(rho)
    mask = np.zeros((4, 3), np.int32)
    mask[:, 1] = 1
    loss, st = at.clipped_policy_loss(
        jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), eps_low=0.2, eps_high=0.28
    )
    # min(rho A, clip(rho, 0.8, 1.28) A): 1.28 (clipped high), -0.8 (clipped low), -1.5, 0.5
    assert float(loss) == pytest.approx(-(1.28 - 0.8 - 1.5 + 0.5) / 4, abs=1e-6)
    assert float(st["clip_high"]) == pytest.approx(0.25) and float(st["clip_low"]) == pytest.approx(0.25)
    assert float(st["tokens"]) == 4
    assert float(st["ratio_dev"]) == pytest.approx(0.5, abs=1e-6)
    # Clipped tokens give no gradient; unclipped ones give -A rho / n.
    g = jax.grad(
        lambda lp: at.clipped_policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))[0]
    )(jnp.asarray(logp))
    np.testing.assert_allclose(g[:, 1], [0, 0, 1.5 / 4, -0.5 / 4], atol=1e-6)
    np.testing.assert_allclose(g[:, [0, 2]], 0)


def test_loss_is_a_token_mean_over_the_batch_and_on_policy_gradient_is_minus_a():
    # Row 0: 3 tokens with A=+1, row 1: 1 token with A=-1; ratio 1 (on-policy).
    mask = jnp.array([[1, 1, 1], [0, 1, 0]])
    z = jnp.zeros((2, 3))
    loss, _ = at.clipped_policy_loss(z, z, jnp.array([1.0, -1.0]), mask)
    assert float(loss) == pytest.approx(-(3 - 1) / 4)  # not the sequence mean (0)
    g = jax.grad(lambda lp: at.clipped_policy_loss(lp, z, jnp.array([1.0, -1.0]), mask)[0])(z)
    np.testing.assert_allclose(g, [[-0.25, -0.25, -0.25], [0, 0.25, 0]], atol=1e-7)
    # An all-masked batch (every row dropped) gives loss 0, not NaN.
    loss0, _ = at.clipped_policy_loss(z, z, jnp.array([1.0, -1.0]), jnp.zeros((2, 3)))
    assert float(loss0) == 0.0


def test_keep_mask_drops_limit_hits_without_answer():
    st = [rollout.ANSWERED, rollout.MAX_TURNS, rollout.MAX_TOKENS, rollout.TOOL_ERROR]
    assert at.keep_mask(st).tolist() == [True, False, False, True]
    assert at.exact_match_rewards(
        ["The Paris.", None, "Lyon"], ["paris", "paris", ["x", "lyon"]]
    ).tolist() == [1.0, 0.0, 1.0]


def _fake_result(B, T, lengths, status, answers):
    kind = np.zeros((B, T), np.int8)
    for b, n in enumerate(lengths):
        kind[b, :n] = rollout.KIND_PROMPT
        kind[b, 2:n:2] = rollout.KIND_MODEL
    rng = np.random.default_rng(0)
    return rollout.RolloutResult(
        tokens=rng.integers(3, 200, (B, T)).astype(np.int32),
        kind=kind,
        logprobs=-rng.random((B, T)).astype(np.float32),
        lengths=np.array(lengths, np.int32),
        status=np.array(status, np.int32),
        turns=np.ones(B, np.int32),
        tool_errors=np.zeros(B, np.int32),
        forced_answer=np.zeros(B, bool),
        answers=answers,
        messages=[[] for _ in range(B)],
    )


def test_rl_batch_rewards_advantages_and_dropped_rows():
    res = _fake_result(
        4,
        400,
        [130, 90, 60, 100],
        [rollout.ANSWERED, rollout.MAX_TURNS, rollout.ANSWERED, rollout.ANSWERED],
        ["Paris", None, "x", "y"],
    )
    b = at.rl_batch(res, ["paris", "paris", "y", "y"], group=2)
    assert b["rewards"].tolist() == [1, 0, 0, 1]
    assert b["adv"].tolist() == [1, -1, -1, 1]  # the dropped row still counts in the baseline
    assert b["keep"].tolist() == [True, False, True, True]
    assert b["tokens"].shape == (4, 256)  # longest row 130, rounded up to 128s
    assert b["mask"][1].sum() == 0  # dropped: no tokens in the loss
    np.testing.assert_array_equal(b["mask"][0], res.model_mask[0, :256])
    np.testing.assert_array_equal(b["old_logp"], res.logprobs[:, :256])
    with pytest.raises(ValueError, match="multiple of group"):
        at.rl_batch(res, ["a"] * 4, group=3)


def test_token_logprobs_alignment():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7))
    toks = jnp.array([[1, 2, 3, 4, 5], [6, 0, 1, 2, 3]])
    lp = at.token_logprobs(logits, toks)
    ref = jax.nn.log_softmax(logits, -1)
    assert float(lp[0, 0]) == 0.0
    assert float(lp[1, 3]) == pytest.approx(float(ref[1, 2, 2]), abs=1e-6)
    assert float(lp[0, 4]) == pytest.approx(float(ref[0, 3, 5]), abs=1e-6)


def test_wilson_interval():
    lo, hi = evaluate.wilson_interval(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert evaluate.wilson_interval(0, 10)[0] == 0.0


# ------------------------------------------------------------------------------------ one real update


def test_one_rl_update_moves_logprobs_with_the_advantage_sign():
    """A tiny Kimi model: an update with A=+1 on row 0 and A=-1 on row 1 (masked model tokens
    only) raises row 0's and lowers row 1's mean log-prob of those tokens."""

    cfg = KimiLinearConfig(
        vocab_size=259,
        hidden_size=32,
        num_hidden_layers=2,
        layer_types=("kda", "mla"),
        mlp_layer_types=("dense", "dense"),
        kda_num_heads=2,
        kda_head_dim=16,
        num_attention_heads=2,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=0,
        v_head_dim=16,
        intermediate_size=64,
    )
    model = KimiLinear(cfg)
    toks = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 3, 259)
    params = model.init(jax.random.PRNGKey(0), toks)
    mask = jnp.zeros((2, 24), jnp.int32).at[:, 10:20].set(1)

    @jax.jit
    def lp(p):
        return at.token_logprobs(model.apply(p, toks).logits, toks)

    old = lp(params)
    tx = optax.sgd(0.02)
    step = jax.jit(at.make_rl_step(model.apply, tx, lambda s: 0.02))
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.PRNGKey(0),
    }
    state, m = step(state, {"tokens": toks, "mask": mask, "old_logp": old, "adv": jnp.array([1.0, -1.0])})
    assert float(m["ratio_dev"]) < 1e-5 and float(m["tokens"]) == 20 and bool(m["finite"])
    assert float(m["loss"]) == pytest.approx(0.0, abs=1e-6)
    new = lp(state["params"])
    d = ((new - old) * mask).sum(1) / mask.sum(1)
    assert float(d[0]) > 0 > float(d[1])
    assert math.isfinite(float(m["grad_norm"]))
    # The one NaN policy: a non-finite update is not applied and the driver's check names it.

    bad = {
        "tokens": toks,
        "mask": mask,
        "old_logp": old.at[0, 12].set(jnp.nan),
        "adv": jnp.array([1.0, -1.0]),
    }
    kept, m = step(state, bad)
    assert not bool(m["finite"])
    for a, b in zip(jax.tree.leaves(kept["params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        check_finite(jax.device_get(m), 2)


def _record(wiki_seed, wiki=None, prompt="P"):
    r = {
        "question": "q",
        "answer": "a",
        "wiki_seed": wiki_seed,
        "trajectory": [{"role": "system", "content": prompt}, {"role": "user", "content": "q"}],
    }
    if wiki is not None:
        r["wiki"] = {"seed": wiki_seed, **wiki}
    return r


def test_settings_name_the_world_the_agent_acts_in():
    one = [_record(3, {"n_people": 20}), _record(3, {"n_people": 20})]
    s = at.settings_from_records(one, None)
    assert s.wiki == {"seed": 3, "n_people": 20} and s.system_prompt == "P"
    with pytest.raises(ValueError, match="differs from the agent's world 3"):
        at.settings_from_records(one, {"seed": 4})
    many = [_record(w, {"n_people": 20}) for w in (1, 2, 3)]
    with pytest.raises(ValueError, match=r"come from 3 worlds \(wiki_seed 1, 2, 3\).*--wiki-seed"):
        at.settings_from_records(many, None)
    s = at.settings_from_records(many, {"search_top_k": 2}, world=7)
    assert s.wiki == {"seed": 7, "n_people": 20, "search_top_k": 2}
    with pytest.raises(ValueError, match="2 different wiki configs"):
        at.settings_from_records([_record(1, {"n_people": 20}), _record(2, {"n_people": 30})], None, world=1)
    with pytest.raises(ValueError, match="share one system prompt"):
        at.settings_from_records([_record(1, prompt="A"), _record(1, prompt="B")], None)
    with pytest.raises(ValueError, match="needs its world's seed"):
        at.settings_from_records([{"question": "q", "trajectory": one[0]["trajectory"]}], None)
    # questions from another world are refused where the agent runs; unmarked ones are taken
    at.check_world([_record(7), {"question": "q"}], s)
    with pytest.raises(
        ValueError, match=r"RL questions come from world\(s\) 2, 3, but the agent acts in world 7"
    ):
        at.check_world([_record(7), _record(2), _record(3)], s, "RL questions")
