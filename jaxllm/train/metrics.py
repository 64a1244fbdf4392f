"""Metrics: a JSONL log, a live progress line, and FLOP/MFU estimates."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import ConfigError
from jaxllm.train.step import DROPPED_COUNT

# Dense peak FLOP/s per chip (bf16), by substring of ``device.device_kind``. Rough public numbers.
PEAK_TFLOPS = (
    ("v6", 918.0),
    ("v5p", 459.0),
    ("v5 lite", 197.0),
    ("v5e", 197.0),
    ("v4", 275.0),
    ("v3", 123.0),
    ("h200", 989.0),
    ("h100", 989.0),
    ("a100", 312.0),
    ("l4", 121.0),
    ("t4", 65.0),
)


class MetricsLog:
    """Appends one JSON object per logged step to ``path``; drops entries past a resume step."""

    def __init__(self, path: str, resume_step: int = 0):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path):
            kept = [line for line in read_jsonl(path) if line.get("step", 0) <= resume_step]
            with open(path, "w", encoding="utf-8") as f:
                for rec in kept:
                    f.write(json.dumps(rec) + "\n")
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# metrics.jsonl key -> TensorBoard tag.
TENSORBOARD_TAGS = {
    "loss": "train/loss",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "aux_loss": "train/aux_loss",
    "moe_max_mean_load": "moe/max_mean_load",
    "moe_overflow": "moe/overflow",
    "moe_dropped": "moe/dropped",
    "tokens_per_s": "perf/tokens_per_s",
    "mfu": "perf/mfu",
    "step_time_s": "perf/step_time_s",
    "val_loss": "val/loss",
}


def dropped_fractions(m: dict) -> dict[str, float]:
    """``moe/<layer>/dropped`` (the layer's dropped assignments over its ``expert_load`` total) and
    ``moe_dropped`` (their mean over layers) from a step's host metrics; {} without drop counts."""
    out = {}
    for key, count in m.items():
        if key.startswith(DROPPED_COUNT):
            layer = key[len(DROPPED_COUNT) :]
            assigned = float(np.sum(m[f"expert_load/{layer}"]))
            out[f"moe/{layer}/dropped"] = float(count) / max(assigned, 1.0)
    if out:
        out["moe_dropped"] = float(np.mean(list(out.values())))
    return out


def aux_and_load_record(m: dict) -> dict[str, float]:
    """The metrics.jsonl entries of a step's auxiliary losses (when any is non-zero) and MoE load
    (``moe_max_mean_load``, ``moe_overflow``, ``moe_dropped``, ``moe/<layer>/...``, when the model
    routes)."""
    rec = {}
    if float(m.get("aux_loss", 0.0)):
        rec.update({k: float(v) for k, v in m.items() if k == "aux_loss" or k.startswith("aux/")})
    rec.update({k: float(v) for k, v in m.items() if k.startswith("moe")})
    rec.update(dropped_fractions(m))
    return rec


def require_tensorboardx():
    """tensorboardX's ``SummaryWriter``, or a ConfigError that says how to install it."""
    try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415 (optional dependency: tensorboardX)
    except ImportError:
        raise ConfigError(
            "tensorboard=true needs the tensorboardX package, which is not installed; "
            "pip install 'jaxllm[tb]' (or pip install tensorboardX), or set tensorboard=false"
        ) from None
    return SummaryWriter


class TensorBoardLog:
    """The metrics.jsonl scalars as TensorBoard events (``TENSORBOARD_TAGS``), via tensorboardX.

    On resume from step ``resume_step`` the events of later steps from the interrupted run are
    purged (TensorBoard hides them), as ``MetricsLog`` drops their JSONL lines.
    """

    def __init__(self, logdir: str, resume_step: int = 0):
        writer_cls = require_tensorboardx()
        self._w = writer_cls(
            logdir=logdir, purge_step=resume_step + 1 if resume_step else None, flush_secs=10
        )

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for key, tag in TENSORBOARD_TAGS.items():
            if key in record:
                self._w.add_scalar(tag, float(record[key]), step)
        for key, value in record.items():  # per-layer MoE load and named aux losses keep their names
            if key.startswith(("moe/", "aux/")):
                self._w.add_scalar(key, float(value), step)

    def close(self) -> None:
        self._w.close()


def read_jsonl(path: str) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed process
    return out


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled function, from XLA's cost analysis (per device)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    flops = cost.get("flops")
    return float(flops) if flops and flops > 0 else None


def measured_matmul_tflops(n: int = 1024, repeats: int = 5) -> float:
    """Achieved f32 matmul TFLOP/s of one device: the 'peak' used for MFU on CPU."""
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def peak_tflops_per_device(override: float = 0.0) -> tuple[float, str]:
    """(peak TFLOP/s per device, where the number came from)."""
    if override > 0:
        return override, "config"
    dev = jax.devices()[0]
    kind = dev.device_kind.lower()
    for key, value in PEAK_TFLOPS:
        if key in kind:
            return value, f"table:{dev.device_kind}"
    return measured_matmul_tflops(), "measured-matmul"


def param_count(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


class Progress:
    """One live status line: step, loss, tokens/s, ETA (tqdm when available and a TTY)."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.total, self.enabled = total, enabled
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm  # noqa: PLC0415 (used when importable: a plain status line without it)

                self._bar = tqdm(
                    total=total,
                    initial=initial,
                    unit="step",
                    dynamic_ncols=True,
                    file=sys.stderr,
                    mininterval=0.5,
                )
            except ImportError:
                self._bar = None
        self._last_print = 0.0

    def update(self, step: int, loss: float, tok_s: float) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {loss:.4f}  {tok_s:,.0f} tok/s", refresh=False)
            self._bar.update(step - self._bar.n)
            return
        now = time.time()
        if now - self._last_print > 2 or step == self.total:
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  {tok_s:,.0f} tok/s", file=sys.stderr, flush=True
            )
            self._last_print = now

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
