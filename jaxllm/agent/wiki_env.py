"""The simulated wiki's environment step in jnp, for the compiled rollout (``rollout.scan_rollout``
with ``env="jnp"``): a finished turn parsed by ``react_jnp.canonical_action``, ``wiki.search_step``
/ ``wiki.visit_step``, the observation's pre-tokenised pieces and the chat framing gathered into the
tokens to append, and the host judge's budget, force-answer, max-turns and status rules
(``episodes.Episodes.judge``). Byte tokenizer and chatml only: the pieces are tokenised one by one,
which equals tokenising the whole observation only when every byte is its own token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.agent import protocol, tools
from jaxllm.agent import wiki as wk
from jaxllm.agent.episodes import ANSWERED, MAX_TOKENS, MAX_TURNS, RUNNING
from jaxllm.agent.react_jnp import A_ANSWER, A_NONE, A_SEARCH, A_VISIT, canonical_action


def framing(observation_content: str, model_closed_turn: bool) -> str:
    """Chatml text between an assistant turn's content and the next assistant turn's content
    (the scan loop's framing; the segmented loop asks its ``ChatFormat``)."""
    return protocol.CHATML.user_turn(observation_content, model_closed_turn)


def wiki_of(executor) -> "object | None":
    """The ``SimulatedWiki`` behind ``executor`` when the jnp environment step reproduces its
    ``search``/``visit`` exactly (a plain ``tools.ToolExecutor`` whose search and visit backends
    are the wiki's ``WikiTool``s with the released schemas), else None."""
    if (
        not isinstance(executor, tools.ToolExecutor)
        or type(executor).execute is not tools.ToolExecutor.execute
    ):
        return None
    s, v = executor.backends.get("search"), executor.backends.get("visit")
    if not (
        isinstance(s, wk.WikiTool)
        and isinstance(v, wk.WikiTool)
        and s.wiki is v.wiki
        and s.name == "search"
        and v.name == "visit"
        and type(s) is wk.WikiTool
        and type(v) is wk.WikiTool
    ):
        return None
    if executor.specs.get("search") != tools.SEARCH or executor.specs.get("visit") != tools.VISIT:
        return None
    w = s.wiki
    methods = ("search", "visit", "join", "search_ids", "visit_ids", "encode", "_encode_many")
    if any(getattr(type(w), m) is not getattr(wk.SimulatedWiki, m) for m in methods):
        return None
    if any("<" in p for p in w.pieces):  # wrap_tool_response would escape tags: keep it on the host
        return None
    return w


class EnvArrays(NamedTuple):
    """Device arrays of the jnp wiki environment (a jit argument)."""

    wiki: object  # wiki.WikiArrays
    hashes_2V: jax.Array  # term hashes for bytes_to_terms
    piece_flat: jax.Array  # tokens of all pieces, concatenated
    piece_start: jax.Array  # [P + 3]
    piece_len: jax.Array  # [P + 3]


@dataclasses.dataclass(frozen=True)
class EnvStatic:
    """Static side of the jnp wiki environment (part of the compiled program's key)."""

    layout: object  # wiki.PieceLayout
    n_terms: int  # terms kept per query / URL / goal (SimulatedWiki.max_terms)
    cap: int  # executor.max_observation_chars
    prefix_len: int
    suffix_len: int

    @property
    def prefix(self):  # piece ids of the framing around an observation, and the force message
        return self.layout.size

    @property
    def suffix(self):
        return self.layout.size + 1

    @property
    def force(self):
        return self.layout.size + 2


def build_env(wiki, tokenizer, executor):
    """Piece tokens (the wiki's pieces, then the chat framing before and after a tool response
    and the framed force-answer message) as device arrays, and the static side."""
    head = f"{protocol.IM_END}\n{protocol.IM_START}user\n{protocol.TOOL_RESPONSE_OPEN}\n"
    tail = f"\n{protocol.TOOL_RESPONSE_CLOSE}{protocol.IM_END}\n{protocol.IM_START}assistant\n"
    assert framing(protocol.wrap_tool_response("x"), False) == head + "x" + tail
    texts = list(wiki.pieces) + [head, tail, framing(protocol.FORCE_ANSWER, False)]
    toks = [np.asarray(tokenizer.encode(t), np.int32) for t in texts]
    lens = np.array([len(t) for t in toks], np.int32)
    start = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int32)
    flat = np.concatenate(toks + [np.zeros((1,), np.int32)])
    arrays = EnvArrays(
        wiki._arrays,
        jnp.asarray(wiki.term_hashes_2V),
        jnp.asarray(flat),
        jnp.asarray(start),
        jnp.asarray(lens),
    )
    static = EnvStatic(
        wiki.layout, int(wiki.max_terms), int(executor.max_observation_chars), int(lens[-3]), int(lens[-2])
    )
    return arrays, static


def gather_pieces(env: EnvArrays, ids_BP, T: int, pad: int):
    """Tokens ``[B, T]`` of each row's piece ids (-1: none) and their total lengths ``[B]``."""
    n_p = env.piece_len.shape[0]
    lens = jnp.where(ids_BP >= 0, env.piece_len[jnp.clip(ids_BP, 0, n_p - 1)], 0)
    cum = jnp.cumsum(lens, axis=-1)
    t = jnp.arange(T)
    j = jax.vmap(lambda c: jnp.searchsorted(c, t, side="right"))(cum)  # piece holding t
    j = jnp.clip(j, 0, ids_BP.shape[1] - 1)
    off = t[None] - (jnp.take_along_axis(cum, j, -1) - jnp.take_along_axis(lens, j, -1))
    pid = jnp.clip(jnp.take_along_axis(ids_BP, j, -1), 0, n_p - 1)
    src = jnp.clip(env.piece_start[pid] + off, 0, env.piece_flat.shape[0] - 1)
    total = cum[:, -1]
    return jnp.where(t[None] < total[:, None], env.piece_flat[src], pad), total


def jnp_judge(
    env: EnvArrays,
    st: EnvStatic,
    turn_ids,
    turn_len,
    length,
    running,
    status,
    turns,
    consec,
    forced,
    limit,
    *,
    T: int,
    L: int,
    max_turns: int,
    pad: int,
):
    """``episodes.Episodes.judge`` for canonical turns (see ``canonical_action``) on the simulated
    wiki: ``search_step``/``visit_step`` and the piece tokens of their observation, the chat
    framing, the budget and status rules. Returns ``ok`` (rows it judged) and their new state."""
    lay = st.layout
    act = jax.vmap(
        functools.partial(canonical_action, Q=lay.max_queries, U=lay.max_urls, n_terms=st.n_terms),
        in_axes=(0, 0, None),
    )(turn_ids, turn_len, env.hashes_2V)
    s_ids = jax.vmap(lambda q, m, v, more: wk.search_step(env.wiki, q, m, v, more, layout=lay))(
        act.q_terms, act.q_mask, act.q_valid, act.q_more
    )
    v_ids = jax.vmap(
        lambda u, um, uv, g, gm, more: wk.visit_step(env.wiki, u, um, uv, g, gm, more, layout=lay)
    )(act.u_terms, act.u_mask, act.u_valid, act.g_terms, act.g_mask, act.u_more)
    W = max(s_ids.shape[1], v_ids.shape[1])
    padw = lambda x: jnp.pad(x, ((0, 0), (0, W - x.shape[1])), constant_values=-1)  # noqa: E731
    obs = jnp.where((act.kind == A_SEARCH)[:, None], padw(s_ids), padw(v_ids))
    B = turn_ids.shape[0]
    row = jnp.concatenate([jnp.full((B, 1), st.prefix), obs, jnp.full((B, 1), st.suffix)], 1)
    n_p = env.piece_len.shape[0]
    total = jnp.where(row >= 0, env.piece_len[jnp.clip(row, 0, n_p - 1)], 0).sum(-1)
    is_ans = act.kind == A_ANSWER
    is_call = (act.kind == A_SEARCH) | (act.kind == A_VISIT)
    too_long = is_call & ~forced & (total - st.prefix_len - st.suffix_len > st.cap)
    ok = running & (act.kind != A_NONE) & ~too_long
    turns1 = turns + 1
    new_status = jnp.where(
        is_ans, ANSWERED, jnp.where(forced, MAX_TOKENS, jnp.where(turns1 >= max_turns, MAX_TURNS, RUNNING))
    )
    consec1 = jnp.where(is_call & ~forced, 0, consec)
    emit = is_call & ~forced & (turns1 < max_turns)
    force = length + total + L > limit
    force_row = jnp.full_like(row, -1).at[:, 0].set(st.force)
    row = jnp.where(force[:, None], force_row, row)
    pending, n_pending = gather_pieces(env, row, T, pad)
    return (
        ok,
        new_status.astype(jnp.int32),
        turns1,
        consec1,
        forced | (emit & force),
        pending,
        jnp.where(emit, n_pending, 0).astype(jnp.int32),
        is_ans,
        act.ans_lo,
        act.ans_hi,
    )
