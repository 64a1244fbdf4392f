"""Deterministic, resumable packed batches whose global batch does not depend on the host count.

An index sampler, not a stream. Each epoch visits the documents in a seeded permutation;
the epochs laid end to end give one endless *visit sequence*: visit ``v`` is document
``epoch_order(epoch=v // N)[v % N]`` of the ``N`` documents.

Global batch row ``r`` (of ``batch_size`` rows; a batch is laid out as
``[grad_accum, batch_size // grad_accum, seq_len]`` and row ``r`` is its ``r``-th row
in that order) is a stream of its own: it reads visits ``r, r + B, r + 2B, ...``
(``B = batch_size``) and packs them, ``bos + tokens + eos`` each, into its rows of
successive steps. A document that does not fit continues in the same row of the next
step as a new segment. So every document is visited once per epoch over all rows, the
global batch of step ``t`` is a function of (documents, seed, batch_size, seq_len) alone,
and a host packs only the rows its devices hold (``rows=``), reading only their documents.
A dataset with fewer documents than rows is fine: the rows then read across epochs.

A row's whole position is three integers (``epoch``, ``cursor`` = index into that epoch's
permutation, ``offset`` = token offset inside that document). ``get_state()`` returns
them for this iterator's rows, with the layout they belong to; ``set_state()`` accepts a
state holding at least these rows (e.g. merged from every host's checkpoint file).

Row layout (``seq_len`` inputs per row, built from ``seq_len + 1`` slots):
  inputs      slots[:-1]
  targets     slots[1:]
  segment_ids segment of each input; 1, 2, ... per piece of document, 0 = padding (the model
              starts a document wherever the id changes, so only adjacent ids are compared)
  loss_mask   1 where the target belongs to the same segment as the input
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import numpy as np

from jaxllm.errors import DataStateError, TokenIdError

STATE_FORMAT = "jaxllm.packed_rows.v1"


@dataclasses.dataclass(frozen=True)
class RowState:
    epoch: int = 0
    cursor: int = 0  # index into the epoch's permutation of all documents
    offset: int = 0  # token offset inside the document at ``cursor``


def epoch_order(num_docs: int, seed: int, epoch: int) -> np.ndarray:
    """Every document index, in the visiting order of one epoch (the same on every run and host)."""
    dtype = np.int32 if num_docs < 2**31 else np.int64
    return np.random.default_rng([seed, epoch]).permutation(num_docs).astype(dtype)


def pack_row(
    docs: Callable[[int], np.ndarray],
    order_fn: Callable[[int], np.ndarray],
    state: RowState,
    num_docs: int,
    stride: int,
    seq_len: int,
    pad_id: int,
):
    """Packs one row from ``state``; returns (tokens, segment ids, new state), ``seq_len + 1`` slots each.

    ``docs(i)`` gives document i's tokens (already with bos/eos), ``order_fn(epoch)`` the
    epoch's permutation of all ``num_docs`` documents; the row's next visit is ``stride``
    visits after the current one. Pure apart from reading documents.
    """
    width = seq_len + 1
    tokens = np.full(width, pad_id, dtype=np.int32)
    segs = np.zeros(width, dtype=np.int32)
    visit, offset = state.epoch * num_docs + state.cursor, state.offset
    pos, seg = 0, 0
    while width - pos >= 2:
        epoch, cursor = divmod(visit, num_docs)
        doc = docs(int(order_fn(epoch)[cursor]))
        piece = doc[offset : offset + width - pos]
        seg += 1
        tokens[pos : pos + len(piece)] = piece
        segs[pos : pos + len(piece)] = seg
        pos += len(piece)
        if offset + len(piece) >= len(doc):
            visit, offset = visit + stride, 0
        else:  # continue this document in the next step's row, repeating its last token as context
            offset += len(piece) - 1
            break
    epoch, cursor = divmod(visit, num_docs)
    return tokens, segs, RowState(epoch, cursor, offset)


def rows_to_batch(tokens: np.ndarray, segs: np.ndarray) -> dict[str, np.ndarray]:
    """``[rows, seq_len + 1]`` slots -> ``{inputs, targets, segment_ids, loss_mask}`` ``[rows, seq_len]``."""
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segs[:, :-1],
        "loss_mask": ((segs[:, 1:] == segs[:, :-1]) & (segs[:, :-1] > 0)).astype(np.int32),
    }


def check_token_ids(ids: np.ndarray, vocab_size: int, where: str = "batch") -> None:
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        raise TokenIdError(
            f"{where} holds token id {int(bad[0])} outside the model vocabulary [0, {vocab_size}) "
            f"({bad.size} such ids); use a tokenizer whose vocab_size <= the model's vocab_size"
        )


class PackedBatches:
    """Iterator of packed batches ``{inputs, targets, segment_ids, loss_mask}`` (int32).

    ``batch_size`` is the *global* row count. ``rows`` (default: all) are the global rows this
    iterator packs, e.g. the rows the current host's devices hold. ``next(it)`` gives the whole
    batch ``[grad_accum, batch_size // grad_accum, seq_len]`` and needs all rows;
    ``it.next_rows()`` gives this iterator's rows ``[len(rows), seq_len]`` in ``it.rows`` order.
    """

    def __init__(
        self,
        source: Sequence,
        tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        grad_accum: int = 1,
        seed: int = 0,
        rows: Sequence[int] | None = None,
        vocab_size: int | None = None,
        cache_size: int = 4096,
    ):
        if batch_size < 1 or batch_size % grad_accum:
            raise ValueError(
                f"batch_size={batch_size} must be a positive multiple of grad_accum={grad_accum}"
            )
        self.num_docs = len(source)
        if self.num_docs == 0:
            raise ValueError(f"{getattr(source, 'description', 'the dataset')} has no documents")
        rows = list(range(batch_size)) if rows is None else sorted({int(r) for r in rows})
        if not rows or rows[0] < 0 or rows[-1] >= batch_size:
            raise ValueError(
                f"rows {rows[:8]}{'...' if len(rows) > 8 else ''} must be a non-empty subset of the "
                f"batch's rows 0..{batch_size - 1}"
            )
        self.source, self.tokenizer = source, tokenizer
        self.seq_len, self.batch_size, self.grad_accum, self.seed = seq_len, batch_size, grad_accum, seed
        self.rows = tuple(rows)
        self.vocab_size = vocab_size
        self._cache: dict[int, np.ndarray] = {}
        self._cache_size = max(cache_size, 2 * len(rows))  # each row comes back to its current document
        # Rows may sit in different epochs (ceil(B / N) + 1 of them when there are few documents).
        self._orders: dict[int, np.ndarray] = {}
        self._orders_size = max(3, -(-batch_size // self.num_docs) + 2)
        self.reset()

    def reset(self) -> None:
        """Back to the first batch: row ``r`` at visit ``r``."""
        self.state = {r: RowState(*divmod(r, self.num_docs), 0) for r in self.rows}

    def _doc(self, i: int) -> np.ndarray:
        hit = self._cache.get(i)
        if hit is None:
            tok = self.tokenizer
            hit = np.concatenate([[tok.bos_id], tok.encode(self.source[i]), [tok.eos_id]]).astype(np.int32)
            if self.vocab_size is not None:
                check_token_ids(
                    hit,
                    self.vocab_size,
                    where=f"document {i} of {getattr(self.source, 'description', 'dataset')}",
                )
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = hit
        return hit

    def _order(self, epoch: int) -> np.ndarray:
        hit = self._orders.pop(epoch, None)
        if hit is None:
            hit = epoch_order(self.num_docs, self.seed, epoch)
            if len(self._orders) >= self._orders_size:
                self._orders.pop(next(iter(self._orders)))
        self._orders[epoch] = hit  # most recently used last
        return hit

    def layout(self) -> dict:
        """What a row position is relative to: another layout's positions mean other documents."""
        return {
            "format": STATE_FORMAT,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "num_docs": self.num_docs,
        }

    def get_state(self) -> dict:
        """JSON-able: ``{format, batch_size, seed, num_docs, rows: {"<row>": {epoch, cursor, offset}}}``."""
        return {**self.layout(), "rows": {str(r): dataclasses.asdict(self.state[r]) for r in self.rows}}

    def set_state(self, state: dict) -> None:
        """Takes this iterator's rows from ``state`` (which may hold more rows, e.g. every host's)."""
        if "rows" not in state:
            if {"epoch", "cursor", "offset"} <= set(state):
                raise DataStateError(
                    "this data position is one stream for all hosts, written by an older jaxllm whose "
                    "batches were packed differently; it cannot be resumed exactly with per-row streams"
                )
            raise DataStateError(f"not a data position of this pipeline (keys {sorted(state)[:8]})")
        want = self.layout()
        diff = [f"{k}: saved {state.get(k)!r} vs now {v!r}" for k, v in want.items() if state.get(k) != v]
        if diff:
            raise DataStateError(
                "the saved data position belongs to another data layout (" + "; ".join(diff) + "); "
                "batch_size, seed and the dataset must stay the same to resume"
            )
        saved = state["rows"]
        missing = [r for r in self.rows if str(r) not in saved]
        if missing:
            raise DataStateError(
                f"the saved data position lacks rows {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                f"of {len(self.rows)} this host packs (it holds {len(saved)} rows)"
            )
        new = {}
        for r in self.rows:
            try:
                rs = RowState(**{k: int(saved[str(r)][k]) for k in ("epoch", "cursor", "offset")})
            except (KeyError, TypeError, ValueError) as e:
                raise DataStateError(
                    f"row {r} of the saved data position is malformed: {saved[str(r)]!r} ({e})"
                ) from None
            visit = rs.epoch * self.num_docs + rs.cursor
            if (
                not (0 <= rs.cursor < self.num_docs and rs.epoch >= 0 and rs.offset >= 0)
                or visit % self.batch_size != r
            ):
                raise DataStateError(
                    f"row {r} of the saved data position, {dataclasses.asdict(rs)}, is not a position of "
                    f"row {r} (its visits are {r} mod {self.batch_size}); was it saved for another row?"
                )
            new[r] = rs
        self.state = new

    def __iter__(self) -> Iterator[dict]:
        return self

    def next_rows(self) -> dict[str, np.ndarray]:
        """This iterator's rows of the next batch, ``[len(rows), seq_len]`` each, in ``self.rows`` order."""
        width = self.seq_len + 1
        tokens = np.empty((len(self.rows), width), np.int32)
        segs = np.empty((len(self.rows), width), np.int32)
        new = {}
        for i, r in enumerate(self.rows):
            tokens[i], segs[i], new[r] = pack_row(
                self._doc,
                self._order,
                self.state[r],
                self.num_docs,
                self.batch_size,
                self.seq_len,
                self.tokenizer.pad_id,
            )
        self.state = new
        return rows_to_batch(tokens, segs)

    def __next__(self) -> dict[str, np.ndarray]:
        if len(self.rows) != self.batch_size:
            raise ValueError(
                f"this iterator packs {len(self.rows)} of the batch's {self.batch_size} rows; "
                "use next_rows() for a partial batch"
            )
        shape = (self.grad_accum, self.batch_size // self.grad_accum, self.seq_len)
        return {k: v.reshape(shape) for k, v in self.next_rows().items()}
