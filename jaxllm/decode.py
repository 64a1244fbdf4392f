"""The one inference engine for any model of the contract (`jaxllm.models.base`): a batched cache
with per-row lengths, ragged prompts, chunked prefill, per-row stops, one `pick` for every path.

    out = jaxllm.complete(model, params, [[5, 9, 2], [7] * 130], max_new_tokens=32,
                          stop_ids=[eos_id])                       # greedy; ragged prompts
    out.tokens[b, :out.lengths[b]]                                 # row b's new tokens (stop included)
    ids = jaxllm.generate(model, params, prompt_ids_BT, max_new_tokens=32)           # [B, T + 32]
    ids = jaxllm.generate(..., sampling=SamplingConfig(temperature=0.7, top_p=0.9), rng=key)
    ids = jaxllm.generate(..., sampling=SamplingConfig(mode="autodeco"), rng=key,
                          autodeco=(heads_module, heads_params))

How it works:
- One cache for the whole batch (`model.init_cache`); row b holds `cache.pos[b]` tokens. Prompts of
  different lengths are right-padded to one bucketed length and run through `append` in chunks of
  `prefill_chunk` tokens; each append says how many of its tokens are real per row (the contract's
  `lengths`), so a row's padding never reaches its state and the next token goes to its own slot.
- Prompt lengths are bucketed (powers of two up to the chunk, then multiples of it): a new length
  compiles nothing new until it crosses a bucket.
- Decoding runs in a `lax.while_loop` that ends when every row has stopped (a stop id, a stop
  sequence, or `max_new_tokens`). A finished row appends nothing: its length is 0, so its state
  and cache stay as they were. Once the live rows fit a smaller batch (`row_buckets`) they go on
  in one (`on_live_rows`): finished rows stop costing work.
- `pick` is the only token chooser: greedy, every `SamplingConfig` mode, AutoDeco heads, penalties;
  per-row PRNG keys, so a row samples the same tokens whatever else is in its batch.
- `append` and `decode` are also public (jitted, the cache donated): the agent's rollouts feed
  observations of different lengths per row through `append`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.models.base import LanguageModel, check_token_ids
from jaxllm.ops.sampling import sample_next

DEFAULT_PREFILL_CHUNK = 256  # tokens per row per append while prefilling
MIN_BUCKET = 8
# `complete` never shrinks its batch below this many rows per device: every smaller size compiles
# the decode step once more, for little gain (a decode step of a few rows is bound by reading the
# weights, not by its rows). The rollouts, compiled once for many tokens per turn, go down to 1.
DECODE_MIN_ROWS = 8


@flax.struct.dataclass
class Completion:
    """What `complete` returns; B rows, N = max_new_tokens."""

    tokens: jax.Array  # [B, N] int32 new tokens; pad_id after each row's end
    lengths: jax.Array  # [B] int32 new tokens per row, the stop token included
    stopped: jax.Array  # [B] bool: the row ended on a stop id or stop sequence
    logprobs: jax.Array  # [B, N] float32 log-probability of each token under the model (raw logits)
    # [B] int32 decode steps the row was computed in: finished rows leave the device batch once
    # the live ones fit a smaller one (`decode_loop`), so a row that stopped early counts fewer
    batch_steps: jax.Array


# ------------------------------------------------------------------------------------ prompts
def prompt_bucket(n: int, chunk: int = DEFAULT_PREFILL_CHUNK) -> int:
    """The padded prompt length of a longest prompt of n tokens: a power of two (>= 8) up to the
    chunk, then a multiple of the chunk."""
    if n <= chunk:
        return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
    return -(-n // chunk) * chunk


def pad_prompts(prompts, vocab_size: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ragged prompts (a [B,T] array or a list of id sequences) -> (ids [B,Tmax] right-padded, lengths [B])."""
    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) == 2:
        ids = np.asarray(prompts)
        check_token_ids(ids, vocab_size, "prompt_ids")
        if ids.shape[1] < 1:
            raise ValueError("prompt_ids must hold at least one token per row")
        return ids.astype(np.int32), np.full(ids.shape[0], ids.shape[1], np.int32)
    if isinstance(prompts, (np.ndarray, jax.Array)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(
            "prompt_ids must be a [B,T] integer array or a non-empty list of token id sequences, "
            f"got {type(prompts).__name__} {getattr(prompts, 'shape', '')}"
        )
    rows = []
    for b, p in enumerate(prompts):
        row = np.asarray(p)
        if row.ndim != 1 or row.size == 0:
            raise ValueError(
                f"prompt {b} must be a non-empty 1-D sequence of token ids, got shape {row.shape}"
            )
        check_token_ids(row, vocab_size, f"prompt {b}")
        rows.append(row.astype(np.int32))
    lengths = np.array([len(r) for r in rows], np.int32)
    ids = np.full((len(rows), lengths.max()), pad_id, np.int32)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
    return ids, lengths


def stop_table(stop_ids, batch: int, vocab_size: int) -> np.ndarray:
    """Stop ids as int32 [B, S] (-1 = none): one list for every row, or one list per row."""
    if stop_ids is None:
        stop_ids = []
    lists = list(stop_ids)
    per_row = bool(lists) and all(isinstance(x, (list, tuple, np.ndarray)) for x in lists)
    if not per_row:
        lists = [lists] * batch
    if len(lists) != batch:
        raise ValueError(f"stop_ids: one list per row needs {batch} lists, got {len(lists)}")
    width = max(1, max(len(x) for x in lists))
    table = np.full((batch, width), -1, np.int32)
    for b, ids in enumerate(lists):
        for j, t in enumerate(ids):
            if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 0 <= t < vocab_size:
                raise ValueError(f"stop_ids: row {b} holds {t!r}; stop ids must be ints in [0, {vocab_size})")
            table[b, j] = t
    return table


def sequence_table(stop_sequences, batch: int, vocab_size: int) -> np.ndarray:
    """Stop sequences as int32 [B, S, L] right-aligned (-1 before a shorter sequence's first id)."""
    lists = list(stop_sequences or [])
    per_row = bool(lists) and all(
        isinstance(x, (list, tuple)) and all(isinstance(y, (list, tuple, np.ndarray)) for y in x)
        for x in lists
    )
    if not per_row:
        lists = [lists] * batch
    if len(lists) != batch:
        raise ValueError(f"stop_sequences: one list per row needs {batch} lists, got {len(lists)}")
    n = max(1, max(len(x) for x in lists))
    width = max([1] + [len(s) for x in lists for s in x])
    table = np.full((batch, n, width), -1, np.int32)
    for b, seqs in enumerate(lists):
        for j, seq in enumerate(seqs):
            seq = np.asarray(seq)
            if seq.ndim != 1 or seq.size == 0:
                raise ValueError(f"stop_sequences: row {b} sequence {j} must be a non-empty list of ids")
            check_token_ids(seq, vocab_size, f"stop_sequences row {b}")
            table[b, j, width - seq.size :] = seq
    return table


def sequence_hit(out_BN, n_B, table_BSL):
    """[B] bool: row b's last generated tokens (out[b, :n[b]]) end with one of its stop sequences."""
    L = table_BSL.shape[-1]
    idx_BL = n_B[:, None] - L + jnp.arange(L)[None]
    tail_BL = jnp.where(idx_BL >= 0, jnp.take_along_axis(out_BN, jnp.maximum(idx_BL, 0), axis=1), -2)
    match_BSL = (table_BSL == -1) | (table_BSL == tail_BL[:, None, :])
    real_BS = (table_BSL != -1).any(-1)
    return (match_BSL.all(-1) & real_BS).any(-1)


# ------------------------------------------------------------------------------------ picking
def _heads_outputs(out):
    if isinstance(out, dict):
        return out["temperature_B"], out["top_p_B"]
    t, p = out
    return t, p


def pick(
    logits_BV,
    hidden_BD,
    keys_B,
    *,
    sampling=None,
    heads=None,
    heads_params=None,
    prev_tokens_BN=None,
    prev_count_B=None,
    prev_mask_BN=None,
):
    """The next token of every row: greedy (sampling None), else `sample_next` with per-row keys,
    AutoDeco heads (`heads.apply(heads_params, hidden_BD, logits_BV)` -> temperature/top-p per row)
    and penalties over the previous tokens of each row: its first `prev_count[b]`, and of those
    the ones `prev_mask_BN` marks (either may be None: all)."""
    if sampling is None:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    kw = {}
    heads_module = heads
    if heads_module is not None:
        t_B, p_B = _heads_outputs(heads_module.apply(heads_params, hidden_BD, logits_BV))
        kw = dict(temperature_B=t_B.reshape(-1), top_p_B=p_B.reshape(-1))
    if prev_tokens_BN is not None:
        mask_BN = jnp.ones(prev_tokens_BN.shape, bool) if prev_mask_BN is None else prev_mask_BN
        if prev_count_B is not None:
            mask_BN &= jnp.arange(prev_tokens_BN.shape[1])[None] < prev_count_B[:, None]
        kw["prev_tokens_BT"] = prev_tokens_BN
        kw["prev_mask_BT"] = mask_BN
    return sample_next(logits_BV, keys_B, sampling, **kw)


def split_rows(keys_B):
    """(next keys, keys to draw with now), one per row."""
    both = jax.vmap(jax.random.split)(keys_B)
    return both[:, 0], both[:, 1]


def row_keys(rng, batch: int):
    """[B] typed keys from one key (split) or a batch of per-row keys (kept)."""
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.dtype != jnp.uint32 or rng.ndim not in (1, 2):
            raise ValueError(f"rng must be a PRNG key or [B] keys, got dtype {rng.dtype} shape {rng.shape}")
        rng = jax.random.wrap_key_data(rng)
    if rng.shape == ():
        return jax.random.split(rng, batch)
    if rng.shape != (batch,):
        raise ValueError(f"rng: one key per row needs [B] = [{batch}] keys, got shape {rng.shape}")
    return rng


# ------------------------------------------------------------------------------------ the engine
def _last_real(x_BT, lengths_B):
    """x[b, lengths[b]-1] for every row (row 0 when a row appended nothing; the caller keeps its old one)."""
    idx = jnp.maximum(lengths_B - 1, 0)
    return jnp.take_along_axis(x_BT, idx.reshape((-1, 1) + (1,) * (x_BT.ndim - 2)), axis=1)[:, 0]


def append_tokens(model, params, cache, ids_BT, lengths_B, last_logits_BV, last_hidden_BD):
    """Append up to T tokens per row (the first lengths[b] are real) to the cache; returns (cache,
    logits and hidden at each row's last real token, the old ones for rows that appended nothing)."""
    out = model.apply(params, ids_BT, cache=cache, lengths=lengths_B)
    fed = (lengths_B > 0)[:, None]
    logits = jnp.where(fed, _last_real(out.logits, lengths_B), last_logits_BV)
    hidden = jnp.where(fed, _last_real(out.hidden, lengths_B).astype(last_hidden_BD.dtype), last_hidden_BD)
    return out.cache, logits, hidden


# ------------------------------------------------------------ finished rows leave the batch
def row_buckets(batch: int, per_device: int = 1, smallest: int = 1) -> tuple[int, ...]:
    """The batch sizes a batch of ``batch`` rows shrinks to as its rows finish, largest first:
    ``batch`` itself, then ``per_device`` times the powers of two from ``smallest`` up to half of
    it (few sizes: few shapes to compile, and every size splits evenly over the devices)."""
    smaller, size = [], per_device * smallest
    while size <= batch // 2:
        smaller.append(size)
        size *= 2
    return (batch, *reversed(smaller))


def row_bucket(rows_per_device: int, batch: int, per_device: int = 1, smallest: int = 1) -> int:
    """The smallest of ``row_buckets(batch, per_device, smallest)`` that holds
    ``rows_per_device`` rows on each device."""
    sizes = row_buckets(batch, per_device, smallest)
    return min(s for s in sizes if s // per_device >= rows_per_device)


def on_live_rows(fn, rows, live_R, per_device: int = 1, smallest: int = 1):
    """``fn(rows, live)`` run on the live rows only, inside a compiled program: the rows marked in
    ``live_R`` are gathered into the smallest ``row_buckets`` batch that holds each device's live
    rows (a ``lax.switch`` over the sizes; no gather when none is smaller), ``fn`` runs there and
    its rows are scattered back; the other rows come back unchanged. ``rows``: a tree of
    batch-first leaves [R, ...] (caches, tokens, keys); ``fn`` returns a tree of the same shapes.
    Rows are split into ``per_device`` contiguous blocks (the mesh's data axis) and each block
    compacts within itself, so no row changes device. Each size compiles ``fn`` once more.
    Returns (rows, the batch size used)."""
    R = live_R.shape[0]
    sizes = row_buckets(R, per_device, smallest)
    if len(sizes) == 1:
        return fn(rows, live_R), jnp.int32(R)
    D, per_block = per_device, R // per_device
    live_DB = live_R.reshape(D, per_block)

    def blocks(x):
        return x.reshape(D, per_block, *x.shape[1:])

    def run_at(size):
        if size == R:
            return lambda rows: fn(rows, live_R)
        n = size // D

        def run(rows):
            # slot -> row within its block; fillers (past the live rows) point out of range
            idx_DN = jax.vmap(lambda m: jnp.nonzero(m, size=n, fill_value=per_block)[0])(live_DB)
            take = lambda x: jax.vmap(lambda xb, i: xb[i])(blocks(x), jnp.minimum(idx_DN, per_block - 1))  # noqa: E731
            sub = jax.tree_util.tree_map(lambda x: take(x).reshape(size, *x.shape[1:]), rows)
            out = fn(sub, (idx_DN < per_block).reshape(size))
            put = (
                lambda x, y: jax.vmap(lambda xb, i, yb: xb.at[i].set(yb, mode="drop"))(  # noqa: E731
                    blocks(x), idx_DN, y.reshape(D, n, *y.shape[1:])
                )
            )
            return jax.tree_util.tree_map(lambda x, y: put(x, y).reshape(x.shape), rows, out)

        return run

    need = live_DB.sum(axis=1).max()
    which = jnp.sum(jnp.asarray([s // D for s in sizes]) >= need) - 1  # sizes are largest first
    return jax.lax.switch(which, [run_at(s) for s in sizes], rows), jnp.asarray(sizes, jnp.int32)[which]


def auto_axes(mesh):
    """``mesh`` with every axis in automatic mode: the models are written for the compiler's
    sharding propagation, not for explicitly sharded types (``jax.make_mesh``'s default)."""
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    if tuple(mesh.axis_types) == auto:
        return mesh
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def shard_rows(tree, mesh, rows: int, axis: str = "data"):
    """``tree`` placed on ``mesh`` with every leaf whose leading dimension is the batch (``rows``:
    caches, tokens, per-row keys) split over ``axis`` and every other leaf replicated, so a jitted
    step runs each device's rows there (computation follows the data). ``mesh`` None: as is."""
    if mesh is None:
        return tree
    if axis not in mesh.shape:
        raise ValueError(f"shard_rows: the mesh has no {axis!r} axis (axes {tuple(mesh.shape)})")
    if rows % mesh.shape[axis]:
        raise ValueError(
            f"shard_rows: {rows} rows do not split evenly over the mesh's {axis!r} axis of {mesh.shape[axis]}"
        )
    mesh = auto_axes(mesh)
    split, whole = NamedSharding(mesh, PartitionSpec(axis)), NamedSharding(mesh, PartitionSpec())

    def place(x):
        return jax.device_put(x, split if np.ndim(x) >= 1 and np.shape(x)[0] == rows else whole)

    return jax.tree_util.tree_map(place, tree)


def on_mesh(params, mesh):
    """``params`` as they are when every leaf already lives on ``mesh``'s devices (sharded as the
    caller chose), else replicated over it; ``mesh`` None: as is."""
    if mesh is None or params is None:
        return params
    devices = set(mesh.devices.flat)
    leaves = jax.tree_util.tree_leaves(params)
    if all(isinstance(x, jax.Array) and set(x.sharding.device_set) == devices for x in leaves):
        return params
    return jax.device_put(params, NamedSharding(auto_axes(mesh), PartitionSpec()))


def empty_last(model, batch: int):
    """(logits_BV, hidden_BD) of rows that have appended nothing yet (zeros)."""
    c = model.config
    return jnp.zeros((batch, c.vocab_size), jnp.float32), jnp.zeros((batch, c.hidden_size), c.compute_dtype)


def prefill_chunks(model, params, cache, ids_BP, lengths_B, chunk: int):
    """Append right-padded prompts [B,P] in chunks of `chunk` (P a multiple of it, or P <= chunk)."""
    B, P = ids_BP.shape
    C = min(chunk, P)
    if P % C:
        raise ValueError(f"prefill: padded length {P} is not a multiple of the chunk {C}")
    logits, hidden = empty_last(model, B)

    def one(carry, c):
        cache, logits, hidden = carry
        ids = jax.lax.dynamic_slice_in_dim(ids_BP, c * C, C, axis=1)
        n_B = jnp.clip(lengths_B - c * C, 0, C)
        return append_tokens(model, params, cache, ids, n_B, logits, hidden), None

    (cache, logits, hidden), _ = jax.lax.scan(one, (cache, logits, hidden), jnp.arange(P // C))
    return cache, logits, hidden


@flax.struct.dataclass
class DecodeState:
    """Everything one decode step reads and writes (B rows, N = max_new_tokens)."""

    step: jax.Array  # int32 scalar: tokens picked so far (columns of `tokens` written)
    cache: object
    logits: jax.Array  # [B, V] next-token logits of each row
    hidden: jax.Array  # [B, D] the hidden state they came from (AutoDeco heads read it)
    keys: jax.Array  # [B] PRNG keys
    tokens: jax.Array  # [B, N] int32, pad after each row's end
    logprobs: jax.Array  # [B, N] float32
    lengths: jax.Array  # [B] int32 new tokens per row
    done: jax.Array  # [B] bool
    stopped: jax.Array  # [B] bool: ended on a stop id or sequence
    batch_steps: jax.Array  # [B] int32 steps the row was in the device batch (computed)


def start_state(
    cache, logits_BV, hidden_BD, keys_B, active_B, max_new_tokens: int, pad_id: int
) -> DecodeState:
    B, N = logits_BV.shape[0], max_new_tokens
    return DecodeState(
        step=jnp.int32(0),
        cache=cache,
        logits=logits_BV,
        hidden=hidden_BD,
        keys=keys_B,
        tokens=jnp.full((B, N), pad_id, jnp.int32),
        logprobs=jnp.zeros((B, N), jnp.float32),
        lengths=jnp.zeros((B,), jnp.int32),
        done=~active_B,
        stopped=jnp.zeros((B,), bool),
        batch_steps=jnp.zeros((B,), jnp.int32),
    )


def decode_step_rows(
    model,
    params,
    st: DecodeState,
    stop_BS,
    seq_BSL,
    *,
    pad_id: int,
    sampling=None,
    heads=None,
    heads_params=None,
) -> DecodeState:
    """Pick and record one token per live row, end the rows that hit a stop or max_new_tokens, and
    append the token of every row still live (the others append nothing)."""
    N = st.tokens.shape[1]
    keys, draw = split_rows(st.keys)
    tok = pick(
        st.logits,
        st.hidden,
        draw,
        sampling=sampling,
        heads=heads,
        heads_params=heads_params,
        prev_tokens_BN=st.tokens,
        prev_count_B=st.lengths,
    )
    live = ~st.done
    tok = jnp.where(live, tok, pad_id)
    lp = jnp.take_along_axis(jax.nn.log_softmax(st.logits, -1), tok[:, None], -1)[:, 0]
    tokens = st.tokens.at[:, st.step].set(tok)
    logprobs = st.logprobs.at[:, st.step].set(jnp.where(live, lp, 0.0))
    lengths = st.lengths + live
    hit = live & ((tok[:, None] == stop_BS).any(-1) | sequence_hit(tokens, lengths, seq_BSL))
    done = st.done | hit | (lengths >= N)

    def feed(args):
        return append_tokens(model, params, *args[:1], tok[:, None], (~done).astype(jnp.int32), *args[1:])

    cache, logits, hidden = jax.lax.cond(jnp.any(~done), feed, lambda a: a, (st.cache, st.logits, st.hidden))
    return DecodeState(
        st.step + 1,
        cache,
        logits,
        hidden,
        keys,
        tokens,
        logprobs,
        lengths,
        done,
        st.stopped | hit,
        st.batch_steps + 1,
    )


def decode_loop(
    model,
    params,
    st: DecodeState,
    stop_BS,
    seq_BSL,
    *,
    pad_id: int,
    sampling=None,
    heads=None,
    heads_params=None,
    per_device: int = 1,
) -> DecodeState:
    """`decode_step_rows` in a `lax.while_loop` until every row is done. Finished rows leave the
    batch: whenever the live rows fit a smaller `row_buckets` size (of at least `DECODE_MIN_ROWS`
    per device), decoding goes on in a batch of that size (`on_live_rows`; ``per_device``: rows
    blocks of the mesh's data axis)."""
    N = st.tokens.shape[1]
    sizes = row_buckets(st.tokens.shape[0], per_device, DECODE_MIN_ROWS)
    step = functools.partial(
        decode_step_rows,
        model,
        params,
        pad_id=pad_id,
        sampling=sampling,
        heads=heads,
        heads_params=heads_params,
    )

    def decode_rows(rows, live):
        """Decode the live rows of a batch until they fit the next smaller size (or all are done)."""
        sub, stop, seq = rows
        size = live.shape[0]
        smaller = max((s for s in sizes if s < size), default=0) // per_device
        sub = sub.replace(step=sub.step[0], done=sub.done | ~live)  # fillers are done
        first = sub.step

        def go_on(s):
            live_per_device = (~s.done).reshape(per_device, -1).sum(axis=1).max()
            # at least one step per batch: the outer loop always moves on
            return (s.step < N) & ((live_per_device > smaller) | (s.step == first))

        sub = jax.lax.while_loop(go_on, lambda s: step(s, stop_BS=stop, seq_BSL=seq), sub)
        return sub.replace(step=jnp.full((size,), sub.step)), stop, seq

    def shrink_and_decode(st):
        rows = (st.replace(step=jnp.full(st.done.shape, st.step)), stop_BS, seq_BSL)
        (st, _, _), _ = on_live_rows(decode_rows, rows, ~st.done, per_device, DECODE_MIN_ROWS)
        return st.replace(step=st.step.max())

    return jax.lax.while_loop(lambda s: (s.step < N) & ~jnp.all(s.done), shrink_and_decode, st)


def _completion(st: DecodeState) -> Completion:
    return Completion(st.tokens, st.lengths, st.stopped, st.logprobs, st.batch_steps)


@functools.lru_cache(maxsize=32)
def _complete_fn(
    model_cls,
    config,
    padded_len,
    max_new_tokens,
    sampling,
    heads,
    cache_dtype,
    chunk,
    pad_id,
    streaming=False,
):
    """jit(run) for `complete`; with `streaming`, (jit(start), jit(step)) for `stream`."""
    model = model_cls(config)

    def start(params, ids_BP, lengths_B, keys_B):
        B = ids_BP.shape[0]
        cache = model.init_cache(B, padded_len + max_new_tokens, cache_dtype)
        cache, logits, hidden = prefill_chunks(model, params, cache, ids_BP, lengths_B, chunk)
        return start_state(cache, logits, hidden, keys_B, jnp.ones((B,), bool), max_new_tokens, pad_id)

    kw = dict(pad_id=pad_id, sampling=sampling, heads=heads)

    def run(params, ids_BP, lengths_B, keys_B, stop_BS, seq_BSL, heads_params):
        st = start(params, ids_BP, lengths_B, keys_B)
        return _completion(decode_loop(model, params, st, stop_BS, seq_BSL, heads_params=heads_params, **kw))

    def step(params, st, stop_BS, seq_BSL, heads_params):
        return decode_step_rows(model, params, st, stop_BS, seq_BSL, heads_params=heads_params, **kw)

    if streaming:
        return jax.jit(start), jax.jit(step, donate_argnums=(1,))
    return jax.jit(run)


def _prepare(
    model,
    prompts,
    max_new_tokens,
    sampling,
    rng,
    autodeco,
    stop_ids,
    stop_sequences,
    pad_id,
    cache_dtype,
    prefill_chunk,
    pad_to,
    streaming,
):
    """Check `complete`/`stream` arguments; (compiled function(s), its array arguments)."""
    config = model.config
    ids, lengths = pad_prompts(prompts, config.vocab_size, pad_id)
    B = ids.shape[0]
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be an int >= 1, got {prefill_chunk!r}")
    if not 0 <= pad_id < config.vocab_size:
        raise ValueError(f"pad_id must be in [0, {config.vocab_size}), got {pad_id}")
    heads, heads_params = (None, None) if autodeco is None else autodeco
    if sampling is not None and rng is None:
        raise ValueError("sampling needs an `rng` key (jax.random.key(...)), or [B] keys, one per row")
    if autodeco is not None and sampling is None:
        raise ValueError("autodeco heads need `sampling` (e.g. SamplingConfig(mode='autodeco'))")
    keys = row_keys(jax.random.key(0) if rng is None else rng, B)
    P = prompt_bucket(ids.shape[1], prefill_chunk) if pad_to is None else pad_to
    if not isinstance(P, int) or P < ids.shape[1] or (P > prefill_chunk and P % prefill_chunk):
        raise ValueError(
            f"pad_to must be an int >= the longest prompt ({ids.shape[1]}) and, above prefill_chunk "
            f"({prefill_chunk}), a multiple of it; got {pad_to!r}"
        )
    ids_BP = np.full((B, P), pad_id, np.int32)
    ids_BP[:, : ids.shape[1]] = ids
    fn = _complete_fn(
        type(model),
        config,
        P,
        max_new_tokens,
        sampling,
        heads,
        None if cache_dtype is None else jnp.dtype(cache_dtype),
        prefill_chunk,
        pad_id,
        streaming,
    )
    stops = jnp.asarray(stop_table(stop_ids, B, config.vocab_size))
    seqs = jnp.asarray(sequence_table(stop_sequences, B, config.vocab_size))
    return fn, (jnp.asarray(ids_BP), jnp.asarray(lengths), keys), (stops, seqs, heads_params)


def complete(
    model: LanguageModel,
    params,
    prompts,
    max_new_tokens: int = 16,
    sampling=None,
    rng=None,
    autodeco=None,
    *,
    stop_ids=None,
    stop_sequences=None,
    pad_id: int = 0,
    cache_dtype=None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    pad_to: int | None = None,
) -> Completion:
    """Continue every prompt (ragged: a list of id sequences, or a [B,T] array) in one batch.

    sampling: None for greedy, else a `jaxllm.ops.sampling.SamplingConfig` (needs `rng`: one key,
    split per row, or [B] keys, one per row). autodeco: optional `(heads_module, heads_params)`;
    `heads_module.apply(heads_params, hidden, logits)` gives per-row temperature and top-p
    (use `SamplingConfig(mode="autodeco")`). stop_ids: ids that end a row (one list, or one list
    per row); stop_sequences: id sequences that end a row when its new tokens end with one (one
    list of sequences, or one per row). pad_to: the padded prompt length (default: the bucket of
    the longest prompt, `prompt_bucket`); one value for every call compiles once for all of them.
    """
    fn, prompt_args, step_args = _prepare(
        model,
        prompts,
        max_new_tokens,
        sampling,
        rng,
        autodeco,
        stop_ids,
        stop_sequences,
        pad_id,
        cache_dtype,
        prefill_chunk,
        pad_to,
        False,
    )
    return fn(params, *prompt_args, *step_args)


def stream(
    model: LanguageModel,
    params,
    prompts,
    max_new_tokens: int = 16,
    sampling=None,
    rng=None,
    autodeco=None,
    *,
    stop_ids=None,
    stop_sequences=None,
    pad_id: int = 0,
    cache_dtype=None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    pad_to: int | None = None,
):
    """`complete`, one step at a time: yields `(tokens_B, live_B)` numpy arrays as each token is
    picked (live: the row produced a token this step), then returns when every row is done. The
    same compiled step as `complete`'s loop (the cache donated from step to step), driven from Python.
    Tokens equal `complete`'s, step for step."""
    (start, step), prompt_args, (stops, seqs, heads_params) = _prepare(
        model,
        prompts,
        max_new_tokens,
        sampling,
        rng,
        autodeco,
        stop_ids,
        stop_sequences,
        pad_id,
        cache_dtype,
        prefill_chunk,
        pad_to,
        True,
    )
    st = start(params, *prompt_args)
    while True:
        live = ~np.asarray(st.done)
        if not live.any() or int(st.step) >= max_new_tokens:
            return
        i = int(st.step)
        st = step(params, st, stops, seqs, heads_params)
        yield np.asarray(st.tokens[:, i]), live


def generate(
    model: LanguageModel,
    params,
    prompt_ids,
    max_new_tokens: int = 16,
    sampling=None,
    rng=None,
    autodeco=None,
    *,
    stop_ids=None,
    pad_id: int = 0,
    cache_dtype=None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
):
    """`complete` for a [B,T] prompt array: returns [B, T + max_new_tokens] ids (the prompt, then
    the new tokens; pad_id after a row's stop id). See `complete` for the arguments."""
    prompt = jnp.asarray(prompt_ids)
    if prompt.ndim != 2:
        raise ValueError(f"generate: prompt_ids must be [B,T], got shape {prompt.shape}")
    if prompt.shape[1] < 1:
        raise ValueError("generate: prompt_ids must hold at least one token per row")
    check_token_ids(prompt, model.config.vocab_size, "prompt_ids")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if max_new_tokens == 0:
        return prompt.astype(jnp.int32)
    done = complete(
        model,
        params,
        prompt,
        max_new_tokens,
        sampling,
        rng,
        autodeco,
        stop_ids=stop_ids,
        pad_id=pad_id,
        cache_dtype=cache_dtype,
        prefill_chunk=prefill_chunk,
    )
    return jnp.concatenate([prompt.astype(jnp.int32), done.tokens], axis=1)


# ------------------------------------------------------------------------------------ single steps
def prefill(model: LanguageModel, params, prompt_ids_BT, capacity: int, *, cache_dtype=None):
    """Run equal-length prompts into a fresh cache of `capacity` tokens: (logits_BTV, hidden_BTD, cache)."""
    cache = model.init_cache(prompt_ids_BT.shape[0], capacity, cache_dtype)
    out = model.apply(params, prompt_ids_BT, cache=cache)
    return out.logits, out.hidden, out.cache


def decode_step(model: LanguageModel, params, token_B, cache):
    """One token per row after the cached ones: (logits_BV, hidden_BD, new cache)."""
    out = model.apply(params, token_B[:, None], cache=cache)
    return out.logits[:, 0], out.hidden[:, 0], out.cache
