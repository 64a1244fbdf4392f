"""Deterministic, resumable, per-host packed batches.

An index sampler, not a stream: documents are visited in the order of a seeded
permutation per epoch, each host takes every ``host_count``-th document of that
order, and each document (``bos + tokens + eos``) is packed into fixed-length rows.
A document that does not fit continues in the next row as a new segment.

The iterator's whole position is three integers (``epoch``, ``cursor``,
``offset``) returned by ``get_state()`` and accepted by ``set_state()``; the
trainer stores it in every checkpoint, so a resumed run sees exactly the batches
an uninterrupted run would have seen.

Row layout (``seq_len`` inputs per row, built from ``seq_len + 1`` slots):
  inputs      slots[:-1]
  targets     slots[1:]
  segment_ids segment of each input; 1, 2, ... per piece of document, 0 = padding
  loss_mask   1 where the target belongs to the same segment as the input
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import numpy as np


@dataclasses.dataclass
class PackState:
  epoch: int = 0
  cursor: int = 0  # index into this host's share of the epoch's permutation
  offset: int = 0  # token offset inside the document at ``cursor``


def epoch_order(num_docs: int, seed: int, epoch: int, host_index: int, host_count: int) -> np.ndarray:
  """This host's document indices for one epoch (same on every run)."""
  perm = np.random.default_rng([seed, epoch]).permutation(num_docs)
  return perm[host_index::host_count]


def pack_rows(docs: Callable[[int], np.ndarray], order_fn: Callable[[int], np.ndarray],
              state: PackState, num_rows: int, seq_len: int, pad_id: int):
  """Packs ``num_rows`` rows starting at ``state``; returns (rows dict, new state).

  ``docs(i)`` gives document i's tokens (already with bos/eos), ``order_fn(epoch)``
  this host's visiting order for an epoch. Pure apart from reading documents.
  """
  width = seq_len + 1
  tokens = np.full((num_rows, width), pad_id, dtype=np.int32)
  segs = np.zeros((num_rows, width), dtype=np.int32)
  epoch, cursor, offset = state.epoch, state.cursor, state.offset
  order = order_fn(epoch)
  if len(order) == 0:
    raise ValueError("this host has no documents: the dataset has fewer documents than hosts")
  for r in range(num_rows):
    pos, seg = 0, 0
    while width - pos >= 2:
      if cursor >= len(order):
        epoch, cursor, offset = epoch + 1, 0, 0
        order = order_fn(epoch)
      doc = docs(int(order[cursor]))
      piece = doc[offset:offset + width - pos]
      seg += 1
      tokens[r, pos:pos + len(piece)] = piece
      segs[r, pos:pos + len(piece)] = seg
      pos += len(piece)
      if offset + len(piece) >= len(doc):
        cursor, offset = cursor + 1, 0
      else:  # continue this document in the next row, repeating its last token as context
        offset += len(piece) - 1
        break
  rows = {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "segment_ids": segs[:, :-1],
      "loss_mask": ((segs[:, 1:] == segs[:, :-1]) & (segs[:, :-1] > 0)).astype(np.int32),
  }
  return rows, PackState(epoch, cursor, offset)


class TokenIdError(ValueError):
  """A token id outside the model's vocabulary."""


def check_token_ids(ids: np.ndarray, vocab_size: int, where: str = "batch") -> None:
  ids = np.asarray(ids)
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    raise TokenIdError(f"{where} holds token id {int(bad[0])} outside the model vocabulary [0, {vocab_size}) "
                       f"({bad.size} such ids); use a tokenizer whose vocab_size <= the model's vocab_size")


class PackedBatches:
  """Iterator of per-host batches ``{inputs, targets, segment_ids, loss_mask}``.

  Each array is ``[grad_accum, local_batch // grad_accum, seq_len]`` int32.
  """

  def __init__(self, source: Sequence, tokenizer, *, seq_len: int, local_batch: int, grad_accum: int = 1,
               seed: int = 0, host_index: int = 0, host_count: int = 1, vocab_size: int | None = None,
               cache_size: int = 4096):
    if local_batch % grad_accum:
      raise ValueError(f"per-host batch {local_batch} is not divisible by grad_accum={grad_accum}")
    self.source, self.tokenizer = source, tokenizer
    self.seq_len, self.local_batch, self.grad_accum = seq_len, local_batch, grad_accum
    self.seed, self.host_index, self.host_count = seed, host_index, host_count
    self.vocab_size = vocab_size
    self.state = PackState()
    self._cache: dict[int, np.ndarray] = {}
    self._cache_size = cache_size
    self._orders: dict[int, np.ndarray] = {}

  def _doc(self, i: int) -> np.ndarray:
    hit = self._cache.get(i)
    if hit is None:
      tok = self.tokenizer
      hit = np.concatenate([[tok.bos_id], tok.encode(self.source[i]), [tok.eos_id]]).astype(np.int32)
      if self.vocab_size is not None:
        check_token_ids(hit, self.vocab_size, where=f"document {i} of {getattr(self.source, 'description', 'dataset')}")
      if len(self._cache) >= self._cache_size:
        self._cache.pop(next(iter(self._cache)))
      self._cache[i] = hit
    return hit

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      self._orders = {epoch: epoch_order(len(self.source), self.seed, epoch, self.host_index, self.host_count)}
    return self._orders[epoch]

  def get_state(self) -> dict:
    return dataclasses.asdict(self.state)

  def set_state(self, state: dict) -> None:
    self.state = PackState(**{k: int(state[k]) for k in ("epoch", "cursor", "offset")})

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    rows, self.state = pack_rows(self._doc, self._order, self.state, self.local_batch, self.seq_len,
                                 self.tokenizer.pad_id)
    shape = (self.grad_accum, self.local_batch // self.grad_accum, self.seq_len)
    return {k: v.reshape(shape) for k, v in rows.items()}
