"""Per-process data states in checkpoints: the orbax handler's files, merging on restore, old checkpoints."""

import json

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
import tiny_lm
from etils import epath

from jaxllm.train import checkpoint as ckpt_lib
from jaxllm.train import loop


def _layout(**kw):
    return {"format": "jaxllm.packed_rows.v1", "batch_size": 8, "seed": 0, "num_docs": 40, **kw}


def _row(r):
    return {"epoch": 0, "cursor": r, "offset": 0}


def _write(directory, files):
    directory.mkdir(parents=True, exist_ok=True)
    for name, item in files.items():
        (directory / name).write_text(json.dumps(item))


def test_restore_merges_rows_from_every_process_file(tmp_path):
    """One process reads the rows it asks for from a 2-process checkpoint's two files."""
    d = epath.Path(tmp_path) / "data_state"
    _write(
        d,
        {
            "process_0-of-2.json": {**_layout(), "rows": {str(r): _row(r) for r in (0, 1, 4, 5)}},
            "process_1-of-2.json": {**_layout(), "rows": {str(r): _row(r) for r in (2, 3, 6, 7)}},
            "commit_success.txt": "x",
        },
    )
    h = ckpt_lib.PerProcessJsonHandler()
    got = h.restore(d, ckpt_lib.PerProcessJsonRestore(rows=[1, 2, 7]))
    assert got == {**_layout(), "rows": {"1": _row(1), "2": _row(2), "7": _row(7)}}
    assert sorted(map(int, h.restore(d, ckpt_lib.PerProcessJsonRestore())["rows"])) == list(range(8))
    with pytest.raises(ValueError, match=r"rows \['9'\] are in none of the 2 process files"):
        h.restore(d, ckpt_lib.PerProcessJsonRestore(rows=[9]))


def test_own_file_is_read_first(tmp_path):
    d = epath.Path(tmp_path) / "data_state"
    # This (single) process's own file holds its rows: the other, broken file is never opened.
    _write(d, {"process_0-of-1.json": {**_layout(), "rows": {"0": _row(0)}}})
    (d / "process_5-of-9.json").write_text("not json")
    got = ckpt_lib.PerProcessJsonHandler().restore(d, ckpt_lib.PerProcessJsonRestore(rows=[0]))
    assert got["rows"] == {"0": _row(0)}


def test_disagreeing_process_files_are_an_error(tmp_path):
    d = epath.Path(tmp_path) / "a"
    _write(
        d,
        {
            "process_0-of-2.json": {**_layout(), "rows": {"0": _row(0)}},
            "process_1-of-2.json": {**_layout(seed=1), "rows": {"1": _row(1)}},
        },
    )
    with pytest.raises(ValueError, match="disagrees .* about the data layout"):
        ckpt_lib.PerProcessJsonHandler().restore(d, ckpt_lib.PerProcessJsonRestore(rows=[1]))
    d = epath.Path(tmp_path) / "b"
    _write(
        d,
        {
            "process_0-of-2.json": {**_layout(), "rows": {"0": _row(0)}},
            "process_1-of-2.json": {**_layout(), "rows": {"0": _row(8)}},
        },
    )
    with pytest.raises(ValueError, match="disagree about row 0"):
        ckpt_lib.PerProcessJsonHandler().restore(d, ckpt_lib.PerProcessJsonRestore(rows=[0]))


def _tiny_setup(data_dir):
    tiny_lm.register()
    config = tiny_lm.run_config(data_dir)
    s = loop.setup(config)
    abstract = loop.abstract_state(s)
    return config, s, abstract, ckpt_lib.make_meta(config, abstract["params"])


def test_checkpointer_round_trip_writes_one_file_per_process(tmp_path, data_dir):
    config, s, abstract, meta = _tiny_setup(data_dir)
    with jax.set_mesh(s.mesh):
        state = loop.init_state(s)
        data = loop.make_data(s)
        data.next_rows()
        ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), save_every=1, keep=2, async_save=False)
        ck.save(1, state, data.get_state(), meta, force=True)
        assert sorted(p.name for p in (tmp_path / "ck" / "1" / "data_state").glob("process_*")) == [
            "process_0-of-1.json"
        ]
        restored, data_state = ck.restore(1, abstract, meta, rows=[2, 5])
        assert sorted(data_state["rows"]) == ["2", "5"]
        assert data_state["rows"]["5"] == data.get_state()["rows"]["5"]
        assert int(restored["step"]) == 0
        ck.close()


def test_old_single_stream_checkpoint_refuses_to_resume_but_loads_weights(tmp_path, data_dir):
    """A checkpoint of the previous layout (one JSON `data` item from host 0): training stops with a clear error
    instead of resuming at the wrong batches; its weights still load."""
    config, s, abstract, meta = _tiny_setup(data_dir)
    directory = tmp_path / "old"
    with jax.set_mesh(s.mesh):
        state = loop.init_state(s)
        mngr = ocp.CheckpointManager(
            str(directory),
            options=ocp.CheckpointManagerOptions(create=True),
            item_names=("state", "data", "meta"),
        )
        mngr.save(
            4,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave({"epoch": 0, "cursor": 17, "offset": 3}),
                meta=ocp.args.JsonSave(meta),
            ),
        )
        mngr.wait_until_finished()
        mngr.close()
        ck = ckpt_lib.Checkpointer(str(directory), save_every=1, keep=2, async_save=False)
        with pytest.raises(
            ckpt_lib.CheckpointError, match="written by an older jaxllm.*cannot resume from it exactly"
        ):
            ck.restore(4, abstract, meta)
        restored, none = ck.restore(4, abstract, meta, data=False)
        assert none is None
        assert jnp.array_equal(restored["params"]["params"]["embed"], state["params"]["params"]["embed"])
        ck.close()
    # and the training loop says so (a workdir whose checkpoints/ holds it)
    (tmp_path / "w").mkdir()
    directory.rename(tmp_path / "w" / "checkpoints")
    with pytest.raises(ckpt_lib.CheckpointError, match="older jaxllm"):
        loop.train(config, str(tmp_path / "w"), log=tiny_lm.quiet)
