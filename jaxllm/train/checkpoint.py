"""Orbax checkpoints: train state + every host's data position + a fingerprint of what was trained.

Each checkpoint step holds three items:
  ``state``       the train state pytree (params, optimizer state, step, RNG), sharded;
  ``data_state``  the data position, one JSON file per process (``process_<i>-of-<n>.json``,
                  written by ``PerProcessJsonHandler``): each host saves the rows it packs;
  ``meta``        model name/args, tokenizer and every param's path and shape (JSON, host 0),
                  so a checkpoint from another model fails with a message, not a shape dump.

Restoring takes an abstract state whose leaves carry the *current* mesh's
shardings, so a checkpoint written on one mesh restores onto another; each host reads
its own rows' data position from whichever file holds them, so a run may also resume on
another number of hosts. Checkpoints of older versions hold one data position for all
hosts (item ``data``, written by host 0 alone); they restore their weights (``data=False``)
but refuse to resume training with a ``CheckpointError`` that says why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxllm.errors import CheckpointError

DATA_ITEM = "data_state"
OLD_DATA_ITEM = "data"  # one JSON for all hosts, before per-process data states
_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def process_file_name(index: int, count: int) -> str:
    return f"process_{index}-of-{count}.json"


class PerProcessJsonHandler(ocp.CheckpointHandler):
    """Every process writes its own JSON object; restoring merges the ``rows`` each process asks for.

    The saved object is ``{..., "rows": {"<row>": ...}}``: the keys other than ``rows`` (the
    layout) must agree between processes; ``rows`` are the process's own entries (entries held by
    several processes must be equal). ``restore(rows=[...])`` reads the process's own file first and
    every file only when that lacks a row (e.g. when the process count changed since the save).
    """

    def save(self, directory: epath.Path, args: "PerProcessJsonSave"):
        path = epath.Path(directory) / process_file_name(jax.process_index(), jax.process_count())
        path.write_text(json.dumps(args.item, sort_keys=True))

    def restore(self, directory: epath.Path, args: "PerProcessJsonRestore | None" = None) -> dict:
        directory = epath.Path(directory)
        want = None if args is None or args.rows is None else [str(int(r)) for r in args.rows]
        own = directory / process_file_name(jax.process_index(), jax.process_count())
        if want is not None and own.exists():
            item = json.loads(own.read_text())
            if all(r in item.get("rows", {}) for r in want):
                return {**item, "rows": {r: item["rows"][r] for r in want}}
        files = sorted(p for p in directory.iterdir() if _PROCESS_FILE.fullmatch(p.name))
        if not files:
            raise FileNotFoundError(f"no process_<i>-of-<n>.json files in {directory}")
        merged: dict = {}
        rows: dict = {}
        for p in files:
            item = json.loads(p.read_text())
            head = {k: v for k, v in item.items() if k != "rows"}
            if merged and head != merged:
                raise ValueError(
                    f"{p.name} disagrees with {files[0].name} about the data layout: {head} vs {merged}"
                )
            merged = head
            for r, entry in item.get("rows", {}).items():
                if rows.setdefault(r, entry) != entry:
                    raise ValueError(f"two process files disagree about row {r}: {rows[r]} vs {entry}")
        if want is not None:
            missing = [r for r in want if r not in rows]
            if missing:
                raise ValueError(
                    f"rows {missing[:8]} are in none of the {len(files)} process files of {directory}"
                )
            rows = {r: rows[r] for r in want}
        return {**merged, "rows": rows} if rows or want is not None else merged


@ocp.args.register_with_handler(PerProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class PerProcessJsonSave(ocp.args.CheckpointArgs):
    item: dict


@ocp.args.register_with_handler(PerProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class PerProcessJsonRestore(ocp.args.CheckpointArgs):
    rows: Sequence[int] | None = None  # None: every row of every file


def param_signature(params) -> dict[str, list[int]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(p): [int(d) for d in x.shape] for p, x in flat}


def make_meta(config, params) -> dict[str, Any]:
    return {
        "model": config.model,
        "model_args": dict(config.model_args),
        "tokenizer": config.tokenizer,
        "params": param_signature(params),
    }


def _meta_mismatch(saved: dict, current: dict) -> str | None:
    lines = []
    for key in ("model", "model_args", "tokenizer"):
        if saved.get(key) != current.get(key):
            lines.append(f"  {key}: checkpoint {saved.get(key)!r} vs run {current.get(key)!r}")
    sp, cp = saved.get("params", {}), current.get("params", {})
    for name in sorted(set(sp) | set(cp)):
        if sp.get(name) != cp.get(name):
            lines.append(f"  param {name}: checkpoint {sp.get(name)} vs run {cp.get(name)}")
            if len(lines) > 12:
                lines.append("  ...")
                break
    return "\n".join(lines) if lines else None


def _is_url(path: str) -> bool:
    return "://" in path


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` with clear errors.

    ``directory`` may be a local path or a URL orbax/etils understand (``gs://bucket/...``; needs
    ``gcsfs`` or TensorFlow for etils' GCS backend). Every process must call ``save``/``restore``.
    """

    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
        self.directory = directory if _is_url(directory) else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", DATA_ITEM, "meta")
        )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        """Saves ``state`` (sharded), this process's ``data_state`` (its own file) and ``meta`` (host 0)."""
        return self._mngr.save(
            step,
            args=ocp.args.Composite(
                **{
                    "state": ocp.args.StandardSave(state),
                    DATA_ITEM: PerProcessJsonSave(data_state),
                    "meta": ocp.args.JsonSave(meta),
                }
            ),
            force=force,
        )

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def step_path(self, step: int) -> epath.Path:
        return epath.Path(self.directory) / str(step)

    def read_meta(self, step: int) -> dict:
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(out["meta"])
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds; name the checkpoint.
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} is unreadable or corrupted "
                f"(meta: {type(e).__name__}: {e})"
            ) from e

    def restore(
        self,
        step: int,
        abstract_state,
        expected_meta: dict,
        *,
        data: bool = True,
        rows: Sequence[int] | None = None,
    ) -> tuple[Any, dict | None]:
        """(state, data position) of ``step``, the state placed on ``abstract_state``'s shardings.

        The data position holds ``rows`` (default: every saved row), merged from the process files;
        ``data=False`` restores the state alone (and returns ``None`` for the data), which also works
        for checkpoints written before per-process data states.
        """
        saved = self.read_meta(step)
        diff = _meta_mismatch(saved, expected_meta)
        if diff:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match this run's model:\n{diff}\n"
                "Use a fresh --workdir, or the config the checkpoint was trained with."
            )
        if data:
            self._check_data_item(step)  # before the (long) state restore
        try:
            out = self._mngr.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} is corrupted or incomplete: "
                f"{type(e).__name__}: {str(e)[:500]}"
            ) from e
        return out["state"], (self.read_data_state(step, rows) if data else None)

    def restore_params(self, step: int, abstract_params, expected_meta: dict):
        """The params of ``step`` alone, placed on ``abstract_params``' shardings: the optimizer's
        moments are never read (with AdamW, a third of the state's bytes)."""
        saved = self.read_meta(step)
        diff = _meta_mismatch(saved, expected_meta)
        if diff:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match this run's model:\n{diff}"
            )
        item = {"params": abstract_params}
        reader = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(read_only=True),
            item_handlers={"state": ocp.PyTreeCheckpointHandler()},
        )
        try:
            out = reader.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=item,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                        partial_restore=True,
                    )
                ),
            )
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} is corrupted or incomplete: "
                f"{type(e).__name__}: {str(e)[:500]}"
            ) from e
        finally:
            reader.close()
        return out["state"]["params"]

    def _check_data_item(self, step: int) -> None:
        path = self.step_path(step)
        if not (path / DATA_ITEM).exists():
            if (path / OLD_DATA_ITEM).exists():
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} was written by an older jaxllm: it holds one data "
                    "position for all hosts, packed in another order, so training cannot resume from it exactly. "
                    "Start a fresh --workdir; its weights still load for generation (jaxllm generate)."
                )
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} has no data position ({DATA_ITEM}/)"
            )

    def read_data_state(self, step: int, rows: Sequence[int] | None = None) -> dict:
        """The data position of ``rows`` (default: all saved rows), merged from the step's process files.

        Local file reads only (no collective), so a process that fails here fails alone and the
        caller can tell the others (see ``loop.restore``).
        """
        path = self.step_path(step)
        self._check_data_item(step)
        try:
            return PerProcessJsonHandler().restore(
                path / DATA_ITEM, PerProcessJsonRestore(None if rows is None else list(rows))
            )
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory}: data position unreadable: "
                f"{type(e).__name__}: {e}"
            ) from e
