"""Packing, determinism, resumption and per-row host sharding of the index-sampled pipeline."""

import json

import numpy as np
import pytest

from jaxllm.data.pipeline import DataStateError, PackedBatches, TokenIdError, check_token_ids, epoch_order
from jaxllm.data.tokenizers import ByteTokenizer, make_tokenizer

DOCS = [("doc %d " % i) * (1 + (i * 7) % 13) for i in range(40)]


def batches(n, **kw):
    it = PackedBatches(DOCS, ByteTokenizer(), **{"seq_len": 16, "batch_size": 4, **kw})
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


def _transitions(b, seq_len=16):
    inp, tgt, mask = (b[k].reshape(-1, seq_len) for k in ("inputs", "targets", "loss_mask"))
    return [[(int(a), int(t)) for a, t, m in zip(inp[r], tgt[r], mask[r]) if m] for r in range(inp.shape[0])]


@pytest.mark.parametrize("batch_size", [2, 4, 64])  # 64 rows > 40 documents: rows read across epochs
def test_every_document_transition_is_trained_exactly_once_per_epoch(batch_size):
    """Row r reads visits r, r+B, r+2B, ... of the epochs' permutations laid end to end: each row's
    trained transitions are exactly those of its documents, in order, and each epoch covers every document."""
    tok = ByteTokenizer()
    n = len(DOCS)
    orders = [epoch_order(n, 0, e) for e in range(40)]
    it = PackedBatches(DOCS, tok, seq_len=16, batch_size=batch_size)
    got = [[] for _ in range(batch_size)]
    for _ in range(max(30, 300 // batch_size)):  # at least 1.5 epochs
        for r, t in enumerate(_transitions(next(it))):
            got[r] += t
    visited = set()
    for r in range(batch_size):
        want = []
        for v in range(r, 40 * n, batch_size):
            ids = np.concatenate([[tok.bos_id], tok.encode(DOCS[orders[v // n][v % n]]), [tok.eos_id]])
            want += [(int(a), int(b)) for a, b in zip(ids[:-1], ids[1:])]
            if len(want) >= len(got[r]):
                visited.add(v)
                break
            visited.add(v)
        assert got[r] == want[: len(got[r])], r
        assert len(got[r]) > 20
    assert set(range(n)) <= visited  # the first epoch was read in full
    assert sorted(orders[0]) == list(range(n))


def test_deterministic_and_resumable():
    ref, _ = batches(6, grad_accum=2)
    first, it = batches(3, grad_accum=2)
    state = it.get_state()
    it2 = PackedBatches(DOCS, ByteTokenizer(), seq_len=16, batch_size=4, grad_accum=2)
    it2.set_state(json.loads(json.dumps(state)))  # survives JSON
    rest = [next(it2) for _ in range(3)]
    for a, b in zip(ref, first + rest):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    other, _ = batches(1, seed=1, grad_accum=2)
    assert not np.array_equal(other[0]["inputs"], ref[0]["inputs"])


def test_any_split_of_rows_gives_the_same_global_batch():
    """Hosts packing row subsets (even interleaved ones) together produce the one-host batch, and each reads only
    its rows' documents; each subset resumes from its own rows of a state."""
    ref, _ = batches(5, batch_size=8, grad_accum=2)
    for split in (
        [range(0, 4), range(4, 8)],
        [range(0, 8, 2), range(1, 8, 2)],
        [[0], [1, 2, 3, 4, 5, 6], [7]],
    ):
        parts = [
            PackedBatches(DOCS, ByteTokenizer(), seq_len=16, batch_size=8, grad_accum=2, rows=rows)
            for rows in split
        ]
        for step in range(5):
            if step == 2:  # restore each part from a merged state, the way checkpoints are read back
                merged = {
                    **parts[0].get_state(),
                    "rows": {k: v for p in parts for k, v in p.get_state()["rows"].items()},
                }
                parts = [
                    PackedBatches(DOCS, ByteTokenizer(), seq_len=16, batch_size=8, grad_accum=2, rows=rows)
                    for rows in split
                ]
                for p in parts:
                    p.set_state(merged)
            outs = [(p.rows, p.next_rows()) for p in parts]
            for k in ref[step]:
                flat = ref[step][k].reshape(8, 16)
                for rows, out in outs:
                    np.testing.assert_array_equal(out[k], flat[list(rows)])


def test_a_row_reads_only_its_own_documents():
    read = []

    class Source(list):
        def __getitem__(self, i):
            read.append(i)
            return list.__getitem__(self, i)

    it = PackedBatches(Source(DOCS), ByteTokenizer(), seq_len=16, batch_size=8, rows=[3])
    for _ in range(20):
        it.next_rows()
    order = epoch_order(len(DOCS), 0, 0)
    assert read and set(read) <= {int(order[v]) for v in range(3, len(DOCS), 8)}


def test_state_errors_are_clear():
    _, it = batches(2, batch_size=8)
    state = it.get_state()
    with pytest.raises(DataStateError, match="another data layout .*batch_size: saved 8 vs now 4"):
        PackedBatches(DOCS, ByteTokenizer(), seq_len=16, batch_size=4).set_state(state)
    with pytest.raises(DataStateError, match="seed: saved 0 vs now 1"):
        PackedBatches(DOCS, ByteTokenizer(), seq_len=16, batch_size=8, seed=1).set_state(state)
    with pytest.raises(DataStateError, match="num_docs: saved 40 vs now 39"):
        PackedBatches(DOCS[:39], ByteTokenizer(), seq_len=16, batch_size=8).set_state(state)
    part = PackedBatches(DOCS, ByteTokenizer(), seq_len=16, batch_size=8, rows=[0, 1])
    with pytest.raises(DataStateError, match=r"lacks rows \[1\]"):
        part.set_state({**state, "rows": {"0": state["rows"]["0"]}})
    with pytest.raises(DataStateError, match="not a position of row 1.*saved for another row"):
        part.set_state({**state, "rows": {"0": state["rows"]["0"], "1": state["rows"]["0"]}})
    with pytest.raises(DataStateError, match="older jaxllm"):
        part.set_state({"epoch": 0, "cursor": 3, "offset": 0})
    with pytest.raises(ValueError, match="has no documents"):
        PackedBatches([], ByteTokenizer(), seq_len=16, batch_size=8)
    with pytest.raises(ValueError, match="use next_rows"):
        next(part)
    with pytest.raises(ValueError, match="subset of the batch's rows 0..7"):
        PackedBatches(DOCS, ByteTokenizer(), seq_len=16, batch_size=8, rows=[8])


def test_reset_returns_to_the_first_batch():
    (first,), it = batches(1)
    next(it)
    it.reset()
    again = next(it)
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])


def test_one_document_fills_every_row():
    it = PackedBatches(DOCS[:1], ByteTokenizer(), seq_len=16, batch_size=4)
    b = next(it)
    assert (b["loss_mask"].sum(-1) > 0).all()


def test_token_ids_outside_vocab_raise():
    with pytest.raises(TokenIdError, match=r"outside the model vocabulary \[0, 100\)"):
        batches(1, vocab_size=100)
    check_token_ids(np.array([0, 5, 99]), 100)
    with pytest.raises(TokenIdError, match="-1"):
        check_token_ids(np.array([3, -1]), 100)


def test_grad_accum_must_divide_batch():
    with pytest.raises(ValueError, match="grad_accum"):
        PackedBatches(DOCS, ByteTokenizer(), seq_len=8, batch_size=3, grad_accum=2)
