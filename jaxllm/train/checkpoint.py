"""Orbax checkpoints: train state + data position + a fingerprint of what was trained.

Each checkpoint step holds three items:
  ``state``  the train state pytree (params, optimizer state, step, RNG), sharded;
  ``data``   the data iterator position (JSON);
  ``meta``   model name/args, tokenizer and every param's path and shape (JSON), so
             a checkpoint from another model fails with a message, not a shape dump.

Restoring takes an abstract state whose leaves carry the *current* mesh's
shardings, so a checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored into the current run."""


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


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` with clear errors."""

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
    return self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)),
                           force=force)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def read_meta(self, step: int) -> dict:
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return dict(out["meta"])
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds; name the checkpoint.
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable or corrupted "
                            f"(meta: {type(e).__name__}: {e})") from e

  def restore(self, step: int, abstract_state, expected_meta: dict) -> tuple[Any, dict]:
    """(state, data position) of ``step``, placed on ``abstract_state``'s shardings."""
    saved = self.read_meta(step)
    diff = _meta_mismatch(saved, expected_meta)
    if diff:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} does not match this run's model:\n{diff}\n"
                            "Use a fresh --workdir, or the config the checkpoint was trained with.")
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is corrupted or incomplete: "
                            f"{type(e).__name__}: {str(e)[:500]}") from e
    return out["state"], dict(out["data"])
