"""One ReAct turn read in jnp, for the compiled rollout (``rollout.scan_rollout``).

``TurnText`` maps each token id to the bytes it adds to a turn's decoded text (what
``episodes.decode_turn`` shows the parser: special ids and ids past the tokenizer's vocabulary add
none), for any tokenizer whose tokens are byte strings (``ByteTokenizer``, byte-level BPE like
Qwen's and Llama-3's); ``stop_hit`` finds, token by token, the stop strings and stop ids that end a
turn exactly where ``episodes.cut_turn_ids`` would. ``canonical_action`` parses a finished turn of
byte tokens into a canonical ``search``/``visit`` call or answer (the jnp wiki environment's input).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.agent import protocol
from jaxllm.agent.episodes import PARSER_TAGS, TURN_STOPS, decode_turn
from jaxllm.agent.wiki import bytes_to_terms
from jaxllm.data.tokenizers import ByteTokenizer

A_NONE, A_ANSWER, A_SEARCH, A_VISIT = 0, 1, 2, 3
_WS_JSON = (9, 10, 13, 32)  # JSON whitespace; also stripped by str.strip
_WS_LEAD = (9, 10, 11, 12, 13, 32)  # ASCII whitespace that str.lstrip removes before <think>
#: skeletons of the canonical calls (``json.dumps`` of ``render_tool_call``, string contents
#: removed): name, tool, "arguments", then the argument object; [LIST] is ``""(, "")*``
_CALL_HEAD = '{"": "", "": {"": '
_PERIOD = '"", '


def _b(s: str) -> np.ndarray:
    return np.frombuffer(s.encode("utf-8"), np.uint8).astype(np.int32)


class Action(NamedTuple):
    kind: jax.Array  # _A_*
    ans_lo: jax.Array  # answer body span in the turn
    ans_hi: jax.Array
    q_terms: jax.Array  # [Q, n_terms] search queries
    q_mask: jax.Array
    q_valid: jax.Array  # [Q]
    q_more: jax.Array
    u_terms: jax.Array  # [U, n_terms] visit URLs
    u_mask: jax.Array
    u_valid: jax.Array  # [U]
    u_more: jax.Array
    g_terms: jax.Array  # [n_terms] visit goal
    g_mask: jax.Array


def canonical_action(tok_L, n, hashes_2V, *, Q: int, U: int, n_terms: int) -> Action:
    """One turn's byte tokens (``n`` of them) as a canonical action, in jnp.

    Accepted (``kind != A_NONE``) are only turns that ``protocol.parse_assistant`` parses into
    an ``Answer`` with a non-blank body, or a ``search``/``visit`` ``ToolCall`` that
    ``ToolExecutor`` validates and runs: no special ids; optional leading ASCII whitespace and
    one ``<think>...</think>``; any prose; the action last, ending the turn. A call's body must be
    the ``json.dumps`` form (``", "`` and ``": "`` separators, keys name/arguments, then
    query | url,goal | goal,url) with plain strings (no escapes, no control characters). Everything
    else (malformed or odd JSON, other tools, ``<code>``, several tags) is left to the host
    judge, which gives the same result as always.
    """
    L = tok_L.shape[0]
    PADW = 64
    pos = jnp.arange(L)
    inside = pos < n
    b = jnp.where(inside, tok_L - ByteTokenizer.offset, -1)
    plain = (~inside | ((tok_L >= ByteTokenizer.offset) & (tok_L < ByteTokenizer.vocab_size))).all()
    bp = jnp.concatenate([b, jnp.full((PADW,), -1, b.dtype)])

    def occ(s):
        p = _b(s)
        hit = inside & (pos + len(p) <= n)
        for j, c in enumerate(p):
            hit &= bp[j : j + L] == c
        return hit

    def at(arr_p, i, s):
        p = _b(s)
        got = jax.lax.dynamic_slice(arr_p, (jnp.clip(i, 0, L),), (len(p),))
        return (got == p).all() & (i >= 0)

    def isin(x, vals):
        return functools.reduce(jnp.logical_or, [x == v for v in vals])

    o_think, c_think = occ(protocol.THINK_OPEN), occ(protocol.THINK_CLOSE)
    n_ot, n_ct = o_think.sum(), c_think.sum()
    p0, p1 = jnp.argmax(o_think), jnp.argmax(c_think)
    think_a = (n_ot == 0) & (n_ct == 0)
    think_b = (
        (n_ot == 1)
        & (n_ct == 1)
        & (isin(b, _WS_LEAD) | (pos >= p0)).all()
        & (p1 >= p0 + len(protocol.THINK_OPEN))
    )
    act_min = jnp.where(think_b, p1 + len(protocol.THINK_CLOSE), 0)
    o_call, o_ans = occ(protocol.TOOL_CALL_OPEN), occ(protocol.ANSWER_OPEN)
    n_call, n_ans = o_call.sum(), o_ans.sum()
    c0, a0 = jnp.argmax(o_call), jnp.argmax(o_ans)
    n_ccall, n_cans = occ(protocol.TOOL_CALL_CLOSE).sum(), occ(protocol.ANSWER_CLOSE).sum()
    others = (
        occ(protocol.TOOL_RESPONSE_OPEN).any()
        | occ(protocol.IM_END).any()
        | occ(protocol.CODE_OPEN).any()
        | occ(protocol.CODE_CLOSE).any()
    )
    base = plain & (think_a | think_b) & ~others
    # an answer: <answer> once, after the thinking, </answer> once, ending the turn
    e_ans = n - len(protocol.ANSWER_CLOSE)
    lo_a = a0 + len(protocol.ANSWER_OPEN)
    is_ans = (
        base
        & at(bp, e_ans, protocol.ANSWER_CLOSE)
        & (n_ans == 1)
        & (n_cans == 1)
        & (n_call == 0)
        & (n_ccall == 0)
        & (a0 >= act_min)
        & (e_ans >= lo_a)
    )
    is_ans &= ((pos >= lo_a) & (pos < e_ans) & (b >= 0x21) & (b <= 0x7E)).any()  # strip() != ""
    # a tool call: <tool_call> once, after the thinking, </tool_call> once, ending the turn
    e_call = n - len(protocol.TOOL_CALL_CLOSE)
    lo_c = c0 + len(protocol.TOOL_CALL_OPEN)
    is_call = (
        base
        & at(bp, e_call, protocol.TOOL_CALL_CLOSE)
        & (n_call == 1)
        & (n_ccall == 1)
        & (n_ans == 0)
        & (n_cans == 0)
        & (c0 >= act_min)
        & (e_call >= lo_c)
    )
    in_body = (pos >= lo_c) & (pos < e_call)
    solid = in_body & ~isin(b, _WS_JSON)
    bs = jnp.argmax(solid)
    be = L - jnp.argmax(solid[::-1])
    region = (pos >= bs) & (pos < be) & solid.any()
    quote = region & (b == 34)
    content = region & ~quote & ((jnp.cumsum(quote) - quote) % 2 == 1)
    is_call &= ~(content & (b < 32)).any() & ~(region & (b == 92)).any()
    keep = region & ~content
    m = keep.sum()
    skel = jnp.where(pos < m, b[jnp.argsort(~keep, stable=True)], -1)
    sp = jnp.concatenate([skel, jnp.full((PADW,), -1, skel.dtype)])
    qpos = jnp.argsort(~quote, stable=True)
    n_q = quote.sum()

    def span(j):
        j = jnp.asarray(j)
        return (qpos[jnp.clip(2 * j, 0, L - 1)] + 1, qpos[jnp.clip(2 * j + 1, 0, L - 1)], 2 * j + 1 < n_q)

    def str_is(j, lit):
        lo, hi, ok = span(j)
        return ok & (hi - lo == len(_b(lit))) & at(bp, lo, lit)

    def template(head, tail, listed):
        hp, tp = _b(head), _b(tail)
        mm = m - len(hp) - len(tp)
        ok = (sp[: len(hp)] == hp).all() & (mm >= 0)
        if len(tp):
            ok &= (jax.lax.dynamic_slice(sp, (jnp.clip(m - len(tp), 0, L),), (len(tp),)) == tp).all()
        if not listed:
            return ok & (mm == 0), jnp.int32(1)
        j = pos - len(hp)
        per = jnp.asarray(_b(_PERIOD))[j % 4]
        ok &= ((j < 0) | (j >= mm) | (skel == per)).all() & (mm >= 2) & (mm % 4 == 2)
        return ok, (mm + 2) // 4

    common = is_call & str_is(0, "name") & str_is(2, "arguments")
    f_s, k_s = template(_CALL_HEAD + "[", "]}}", True)
    f_v1, _ = template(_CALL_HEAD + '"", "": ""}}', "", False)
    f_vug, k_ug = template(_CALL_HEAD + "[", '], "": ""}}', True)
    f_vgu, k_gu = template(_CALL_HEAD + '"", "": [', "]}}", True)
    search = common & str_is(1, "search") & f_s & str_is(3, "query")
    vis = common & str_is(1, "visit")
    v1_ug = vis & f_v1 & str_is(3, "url") & str_is(5, "goal")
    v1_gu = vis & f_v1 & str_is(3, "goal") & str_is(5, "url")
    vl_ug = vis & f_vug & str_is(3, "url") & str_is(4 + k_ug, "goal")
    vl_gu = vis & f_vgu & str_is(3, "goal") & str_is(5, "url")
    visit = v1_ug | v1_gu | vl_ug | vl_gu
    url0 = jnp.where(v1_ug | vl_ug, 4, 6)
    n_url = jnp.where(vl_ug, k_ug, jnp.where(vl_gu, k_gu, 1))
    goal_j = jnp.where(v1_ug, 6, jnp.where(vl_ug, 5 + k_ug, 4))

    bb = jnp.clip(b, 0, 255)

    def terms_of(j, valid):
        lo, hi, _ = span(j)
        return bytes_to_terms(hashes_2V, bb, (pos >= lo) & (pos < hi) & valid, max_terms=n_terms)

    qv = search & (jnp.arange(Q) < k_s)
    q_terms, q_mask = jax.vmap(terms_of)(4 + jnp.arange(Q), qv)
    uv = visit & (jnp.arange(U) < n_url)
    u_terms, u_mask = jax.vmap(terms_of)(url0 + jnp.arange(U), uv)
    g_terms, g_mask = terms_of(goal_j, visit)
    kind = jnp.where(is_ans, A_ANSWER, jnp.where(search, A_SEARCH, jnp.where(visit, A_VISIT, A_NONE)))
    return Action(
        kind.astype(jnp.int32),
        lo_a,
        e_ans,
        q_terms,
        q_mask,
        qv,
        search & (k_s > Q),
        u_terms,
        u_mask,
        uv,
        visit & (n_url > U),
        g_terms,
        g_mask,
    )


# ------------------------------------------------------------------------------------------
# Where a turn ends, token by token, for any tokenizer whose tokens are byte strings
# ------------------------------------------------------------------------------------------

#: Printable bytes that the byte-level BPE alphabet (GPT-2's) keeps as themselves; every other
#: byte b is the character chr(256 + k) for the k-th of them in order.
_SELF_BYTES = [*range(33, 127), *range(161, 173), *range(174, 256)]


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet, character -> byte."""
    others = [b for b in range(256) if b not in set(_SELF_BYTES)]
    table = {chr(b): b for b in _SELF_BYTES}
    table.update({chr(256 + k): b for k, b in enumerate(others)})
    return table


class TurnText(NamedTuple):
    """Device tables of what each token adds to a turn's decoded text (a jit argument).

    ``bytes_VW``: the token's bytes, -1 padded; ``n_V``: how many (0 for special ids, which
    decoding drops, and for ids past the tokenizer's vocabulary); ``stops_SK``: the turn-ending
    strings as bytes, -1 padded on the left; ``stop_ids``: ids that end a turn themselves
    (a Hugging Face tokenizer's ``stop_ids``; -1 when none)."""

    bytes_VW: jax.Array
    n_V: jax.Array
    stops_SK: jax.Array
    stop_ids: jax.Array


def _token_bytes_hf(tokenizer, n_ids: int) -> list[bytes | None]:
    """Each id's bytes in a Hugging Face tokenizer's decoded turn, or raise when its tokens are
    not byte strings (a decoder other than byte-level BPE)."""
    alphabet = _byte_level_alphabet()
    added = getattr(tokenizer, "added_tokens", {})
    kept = {added[t] for t in PARSER_TAGS if t in added}
    added_ids = {i: t for t, i in added.items()}
    out: list[bytes | None] = []
    for i in range(n_ids):
        if i >= tokenizer.vocab_size or (i in tokenizer.special_ids and i not in kept):
            out.append(None)  # dropped by episodes.decode_turn
        elif i in added_ids:
            out.append(added_ids[i].encode("utf-8"))
        else:
            piece = tokenizer.id_to_token(i)
            if any(c not in alphabet for c in piece):
                raise ValueError(
                    f"token {i} ({piece!r}) is not a byte-level BPE token: the tokenizer's tokens are "
                    f"not byte strings"
                )
            out.append(bytes(alphabet[c] for c in piece))
    return out


def turn_text(tokenizer, n_ids: int, *, check_texts=()) -> TurnText:
    """``TurnText`` of ``tokenizer`` for ids ``[0, n_ids)`` (the model's vocabulary).

    ``ByteTokenizer``: one byte per id from its offset. A Hugging Face tokenizer
    (``PretrainedTokenizer``): its byte-level BPE tokens mapped back to bytes. Raises
    ``ValueError`` when the tokens are not byte strings, or when decoding ``check_texts`` (and the
    stop strings) token by token disagrees with ``episodes.decode_turn``."""
    if isinstance(tokenizer, ByteTokenizer):
        per_id = [
            bytes([i - tokenizer.offset]) if tokenizer.offset <= i < tokenizer.vocab_size else None
            for i in range(n_ids)
        ]
    elif hasattr(tokenizer, "id_to_token") and hasattr(tokenizer, "special_ids"):
        per_id = _token_bytes_hf(tokenizer, n_ids)
    else:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} is neither a ByteTokenizer nor a Hugging Face "
            f"tokenizer (PretrainedTokenizer)"
        )
    for text in (*TURN_STOPS, *check_texts):
        ids = [int(i) for i in tokenizer.encode(text)]
        joined = b"".join(per_id[i] or b"" for i in ids if i < n_ids)
        if joined.decode("utf-8", errors="replace") != decode_turn(tokenizer, ids):
            raise ValueError(f"decoding {text[:40]!r} token by token disagrees with the tokenizer's decode")
    W = max(1, max(len(b) for b in per_id if b is not None) if any(per_id) else 1)
    bytes_VW = np.full((n_ids, W), -1, np.int32)
    n_V = np.zeros((n_ids,), np.int32)
    for i, b in enumerate(per_id):
        if b:
            bytes_VW[i, : len(b)] = np.frombuffer(b, np.uint8)
            n_V[i] = len(b)
    stops = [s.encode("utf-8") for s in TURN_STOPS]
    K = max(len(s) for s in stops)
    stops_SK = np.full((len(stops), K), -1, np.int32)
    for j, s in enumerate(stops):
        stops_SK[j, K - len(s) :] = np.frombuffer(s, np.uint8)
    stop_ids = np.asarray([int(i) for i in getattr(tokenizer, "stop_ids", ())] or [-1], np.int32)
    return TurnText(*(jnp.asarray(a) for a in (bytes_VW, n_V, stops_SK, stop_ids)))


def stop_hit(tt: TurnText, tail_BK, tok_B, live_B):
    """Append each live row's token to its text tail (the last K bytes of the turn's text, -1
    where the text is shorter) and say whether the turn ends at it: a stop string that ends inside
    the token's bytes (the first stop anywhere in the text, as ``cut_turn_ids`` finds it, since
    every earlier token was checked), or a stop id. Returns (new tail, hit)."""
    K = tail_BK.shape[1]
    W = tt.bytes_VW.shape[1]
    add_BW = tt.bytes_VW[tok_B]
    n_B = jnp.where(live_B, tt.n_V[tok_B], 0)
    ext_BX = jnp.concatenate([tail_BK, add_BW], axis=1)  # the tail, then the token's bytes
    # windows ending right after each of the token's bytes: ext[e + 1 : e + 1 + K], e < n
    win_BWK = jax.vmap(lambda e: jax.lax.dynamic_slice_in_dim(ext_BX, e + 1, K, axis=1), out_axes=1)(
        jnp.arange(W)
    )
    pats_SK = tt.stops_SK
    match_BWS = ((win_BWK[:, :, None, :] == pats_SK[None, None]) | (pats_SK[None, None] < 0)).all(-1)
    ends_here_BW = jnp.arange(W)[None] < n_B[:, None]
    hit = (match_BWS.any(-1) & ends_here_BW).any(-1)
    hit |= live_B & (tok_B[:, None] == tt.stop_ids[None]).any(-1)
    new_tail = jax.vmap(lambda row, n: jax.lax.dynamic_slice_in_dim(row, n, K))(ext_BX, n_B)
    return new_tail, hit
