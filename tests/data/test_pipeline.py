"""Packing, determinism, resumption and host sharding of the index-sampled pipeline."""

import numpy as np
import pytest

from jaxllm.data.pipeline import PackedBatches, TokenIdError, check_token_ids, epoch_order
from jaxllm.data.tokenizers import ByteTokenizer, make_tokenizer

DOCS = [("doc %d " % i) * (1 + (i * 7) % 13) for i in range(40)]


def batches(n, **kw):
  it = PackedBatches(DOCS, ByteTokenizer(), **{"seq_len": 16, "local_batch": 4, **kw})
  return [next(it) for _ in range(n)], it


def test_byte_tokenizer_roundtrip():
  tok = ByteTokenizer()
  text = "héllo\nwörld ✓"
  ids = tok.encode(text)
  assert ids.min() >= tok.offset and ids.max() < tok.vocab_size
  assert tok.decode(np.concatenate([[tok.bos_id], ids, [tok.eos_id]])) == text


def test_tokenizer_spec_errors():
  with pytest.raises(ValueError, match="allowed: 'byte'"):
    make_tokenizer("bpe")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    make_tokenizer("hf:/nonexistent/tokenizer.json")


def test_rows_layout_and_loss_mask():
  (b,), _ = batches(1)
  assert set(b) == {"inputs", "targets", "segment_ids", "loss_mask"}
  assert b["inputs"].shape == (1, 4, 16)
  inp, tgt, seg, mask = (b[k][0] for k in ("inputs", "targets", "segment_ids", "loss_mask"))
  np.testing.assert_array_equal(inp[:, 1:], tgt[:, :-1])  # targets are inputs shifted by one
  assert (seg[:, 1:] >= seg[:, :-1]).all()  # segments increase along a row
  assert mask[seg == 0].sum() == 0  # padding never counts
  # a position counts exactly when the next slot is in the same segment
  assert ((mask == 1) <= (seg > 0)).all()


def test_every_document_transition_is_trained_exactly_once():
  tok = ByteTokenizer()
  want = []
  order = epoch_order(len(DOCS), 0, 0, 0, 1)
  for i in order:
    ids = np.concatenate([[tok.bos_id], tok.encode(DOCS[i]), [tok.eos_id]])
    want += list(zip(ids[:-1], ids[1:]))
  got = []
  it = PackedBatches(DOCS, tok, seq_len=16, local_batch=2)
  while it.state.epoch == 0:
    b = next(it)
    inp, tgt, mask = (b[k].reshape(-1, 16) for k in ("inputs", "targets", "loss_mask"))
    for r in range(inp.shape[0]):
      got += [(a, t) for a, t, m in zip(inp[r], tgt[r], mask[r]) if m]
  assert got[:len(want)] == want


def test_deterministic_and_resumable():
  ref, _ = batches(6, grad_accum=2)
  first, it = batches(3, grad_accum=2)
  state = it.get_state()
  it2 = PackedBatches(DOCS, ByteTokenizer(), seq_len=16, local_batch=4, grad_accum=2)
  it2.set_state(state)
  rest = [next(it2) for _ in range(3)]
  for a, b in zip(ref, first + rest):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  other, _ = batches(1, seed=1, grad_accum=2)
  assert not np.array_equal(other[0]["inputs"], ref[0]["inputs"])


def test_hosts_read_disjoint_documents():
  orders = [epoch_order(40, 3, 0, h, 4) for h in range(4)]
  allidx = np.concatenate(orders)
  assert len(allidx) == 40 and len(set(allidx.tolist())) == 40


def test_token_ids_outside_vocab_raise():
  with pytest.raises(TokenIdError, match=r"outside the model vocabulary \[0, 100\)"):
    batches(1, vocab_size=100)
  check_token_ids(np.array([0, 5, 99]), 100)
  with pytest.raises(TokenIdError, match="-1"):
    check_token_ids(np.array([3, -1]), 100)


def test_grad_accum_must_divide_batch():
  with pytest.raises(ValueError, match="grad_accum"):
    PackedBatches(DOCS, ByteTokenizer(), seq_len=8, local_batch=3, grad_accum=2)
