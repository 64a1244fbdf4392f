"""Loss curves from ``metrics.jsonl`` files as a PNG (needs matplotlib: ``pip install matplotlib``).

Runs of MoE models also get a second panel: each MoE layer's max/mean expert load per step
(``moe/<layer>/max_mean_load``; 1 = perfectly even), with the overflow fraction in the legend; and,
when some run dropped assignments (an expert-parallel capacity factor), a third: each layer's
dropped fraction per step (``moe/<layer>/dropped``).
"""

from __future__ import annotations

import os

import numpy as np

from jaxllm import run_dir
from jaxllm.train.metrics import read_jsonl


def _metrics_path(path: str) -> str:
    full = run_dir.metrics_file(path) if os.path.isdir(path) else path
    if not os.path.exists(full):
        raise FileNotFoundError(f"no metrics file at {full!r} (give a training workdir or a metrics.jsonl)")
    return full


def metric_curve(path: str, key: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric of one run, last record per step winning (a resumed run
    rewrites the steps after its checkpoint)."""
    by_step = {}
    for rec in read_jsonl(_metrics_path(path)):
        if "step" in rec and key in rec:
            by_step[int(rec["step"])] = float(rec[key])
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def layer_curves(path: str, metric: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{MoE layer: (steps, values of ``moe/<layer>/<metric>``)} of one run; empty when none logged it."""
    suffix = f"/{metric}"
    layers = set()
    for rec in read_jsonl(_metrics_path(path)):
        layers.update(
            k[len("moe/") : -len(suffix)] for k in rec if k.startswith("moe/") and k.endswith(suffix)
        )
    return {layer: metric_curve(path, f"moe/{layer}{suffix}") for layer in sorted(layers)}


def load_curves(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{MoE layer: (steps, max/mean expert load)} of one run; empty for a dense model."""
    return layer_curves(path, "max_mean_load")


def drop_curves(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{MoE layer: (steps, fraction of assignments dropped)} of one run; empty when it logged none."""
    return layer_curves(path, "dropped")


def loss_curve(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, training losses) of one run."""
    return metric_curve(path, "loss")


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(x) < window:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    head = c[1:window] / np.arange(1, window)
    return np.concatenate([head, (c[window:] - c[:-window]) / window])


def plot_loss(paths, out: str, smooth: int = 1) -> str:
    try:
        import matplotlib  # noqa: PLC0415 (matplotlib on demand: Agg backend set before pyplot)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 (after matplotlib.use)
    except ImportError as e:
        raise ImportError("`jaxllm plot` needs matplotlib: pip install matplotlib") from e
    paths = [paths] if isinstance(paths, str) else list(paths)
    loads = {path: load_curves(path) for path in paths}
    drops = {path: drop_curves(path) for path in paths}
    with_load = any(loads.values())
    with_drops = any(np.any(v > 0) for curves in drops.values() for _, v in curves.values())
    panels = 1 + with_load + with_drops
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels if panels > 1 else 7, 4), squeeze=False)
    ax = axes[0, 0]
    for path in paths:
        steps, losses = loss_curve(path)
        label = (
            os.path.basename(os.path.normpath(path if os.path.isdir(path) else os.path.dirname(path))) or path
        )
        (line,) = ax.plot(steps, moving_average(losses, smooth), label=label)
        val_steps, val_losses = metric_curve(path, "val_loss")
        if len(val_steps):  # runs with eval_every > 0: held-out loss, same colour, markers
            ax.plot(val_steps, val_losses, "o--", color=line.get_color(), label=f"{label} (validation)")
        for layer, (load_steps, ratio) in loads[path].items():
            over_steps, over = metric_curve(path, f"moe/{layer}/overflow")
            last = f", overflow {over[-1]:.2f}" if len(over) else ""
            axes[0, 1].plot(load_steps, moving_average(ratio, smooth), label=f"{label} {layer}{last}")
        for layer, (drop_steps, dropped) in drops[path].items() if with_drops else ():
            axes[0, -1].plot(drop_steps, moving_average(dropped, smooth), label=f"{label} {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if with_load:
        lax = axes[0, 1]
        lax.axhline(1.0, color="grey", lw=0.8)
        lax.set_xlabel("step")
        lax.set_ylabel("max / mean expert load (1 = even)")
        lax.grid(alpha=0.3)
        lax.legend(fontsize=7)
    if with_drops:
        dax = axes[0, -1]
        dax.set_xlabel("step")
        dax.set_ylabel("fraction of assignments dropped (capacity)")
        dax.grid(alpha=0.3)
        dax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
