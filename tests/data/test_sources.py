"""TFDS array_record sources (no TensorFlow): embedded stdlib corpus and local files."""

import json
import sys

import pytest

from jaxllm.data.sources import DatasetError, load_source


def test_stdlib_corpus_builds_and_reads(tmp_path):
    train = load_source("stdlib", "train", data_dir=str(tmp_path))
    val = load_source("stdlib", "validation", data_dir=str(tmp_path))
    assert len(train) > 500 and len(val) > 0
    doc = train[0]
    assert isinstance(doc, (bytes, str)) and len(doc) > 0
    assert list((tmp_path / "jaxllm_text").glob("*/1.0.0/*.array_record*"))

    assert "tensorflow" not in sys.modules


def test_local_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n\n\nsecond document")
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"text": f"record {i}"}) + "\n")
    src = load_source(
        f"files:{tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'}", "train", data_dir=str(tmp_path / "d")
    )
    val = load_source(
        f"files:{tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'}", "validation", data_dir=str(tmp_path / "d")
    )
    texts = {
        (x.decode() if isinstance(x, bytes) else x) for s in (src, val) for x in (s[i] for i in range(len(s)))
    }
    assert {"first document", "second document", "record 0", "record 4"} <= texts


def test_missing_dataset_path_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_source(f"files:{tmp_path / 'nope.txt'}", data_dir=str(tmp_path))
    with pytest.raises(DatasetError, match="matches no files"):
        load_source(f"files:{tmp_path}/*.none", data_dir=str(tmp_path))


def test_bad_jsonl_and_spec(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(DatasetError, match="string field 'text'"):
        load_source(f"files:{tmp_path / 'x.jsonl'}", data_dir=str(tmp_path / "d"))
    with pytest.raises(DatasetError, match="allowed: 'stdlib'"):
        load_source("wikipedia", data_dir=str(tmp_path))
