"""AutoDeco heads: a thin Flax Linen module around the official architecture.

Exactly as the official code (Zacks917/AutoDeco, ``model/templlm_auto.py``) builds them, on the
base model's final-normed hidden state ``h`` (the tensor the LM head reads):

* temperature ``T = 2 * sigmoid(W2 relu(W1 h + b1) + b2)``, W1: H -> 256, W2: 256 -> 1;
* top-p ``P = sigmoid(W4 relu(W3 x + b3) + b4)`` with ``x = [h, stop_grad(T), stats]``, the four
  statistics of ``softmax(logits / (T + 1e-8))`` from :func:`jaxllm.ops.autodeco.prob_stats`
  (``x = [h, stop_grad(T)]`` when ``use_enhanced_features=False``).

Parameters are plain pytrees carrying logical axis names; the layout mirrors the official keys::

    params["temp_head"]["mlp_0"]["kernel"]  <->  temp_head.mlp.0.weight.T
    params["top_p_head"]["mlp_2"]["bias"]   <->  top_p_head.mlp.2.bias

:func:`heads_from_official` / :func:`heads_to_official` convert to and from the official
state dict (torch ``nn.Linear`` weights are ``(out, in)``; Flax kernels are ``(in, out)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.ops.autodeco import prob_stats

HEADS = ("temp_head", "top_p_head")
LAYERS = ("mlp_0", "mlp_2")
N_STATS = 4

# Logical axis names. The top-p head's input is H + 5 wide, which no mesh axis divides evenly,
# so it stays unnamed (replicated); the heads are ~1-2M parameters in total.
AXES = {
    "temp_head": {
        "mlp_0": {"kernel": ("embed", "mlp"), "bias": ("mlp",)},
        "mlp_2": {"kernel": ("mlp", None), "bias": (None,)},
    },
    "top_p_head": {
        "mlp_0": {"kernel": (None, "mlp"), "bias": ("mlp",)},
        "mlp_2": {"kernel": ("mlp", None), "bias": (None,)},
    },
}


def _torch_linear_init(fan_in: int):
    # PyTorch's default nn.Linear init (kaiming_uniform(a=sqrt(5))): U(+-1/sqrt(fan_in)) for the
    # weight and the bias, so fresh heads start where the official ones do (T ~ 1 at init).
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class _Linear(nn.Module):
    """``x @ kernel + bias`` with torch-default init and logical axis names."""

    features: int
    axes: Mapping
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        init = _torch_linear_init(fan_in)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init, self.axes["kernel"]),
            (fan_in, self.features),
            self.param_dtype,
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(init, self.axes["bias"]), (self.features,), self.param_dtype
        )
        dtype = jnp.promote_types(x.dtype, kernel.dtype)
        # HIGHEST: heads are tiny, and TPU/GPU default matmul precision would cost parity.
        y = jnp.matmul(x.astype(dtype), kernel.astype(dtype), precision=jax.lax.Precision.HIGHEST)
        return y + bias.astype(dtype)


class _MLPHead(nn.Module):
    """Linear -> ReLU -> Linear -> sigmoid (torch ``mlp.0`` / ``mlp.2``)."""

    mlp_dim: int
    axes: Mapping
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = _Linear(self.mlp_dim, self.axes["mlp_0"], self.param_dtype, name="mlp_0")(x)
        x = nn.relu(x)
        x = _Linear(1, self.axes["mlp_2"], self.param_dtype, name="mlp_2")(x)
        return nn.sigmoid(x)


class AutoDecoHeads(nn.Module):
    """Temperature and top-p heads. ``apply(params, hidden, logits) -> (T, P)``.

    Args (call):
      hidden: ``[..., H]`` final-normed hidden states (``[B, S, H]`` in training).
      logits: ``[..., V]`` unscaled logits for the same positions; needed for the statistics
        when ``use_enhanced_features`` (the default and what every released head uses).

    Returns:
      ``T`` and ``P``, each ``[..., 1]``, computed in at least float32. ``T`` is in (0, 2) and
      differentiable; the top-p head sees it through ``stop_gradient`` (as the official forward
      does), while gradients of a loss through ``T`` itself still reach the temperature head.
    """

    mlp_dim: int = 256
    use_enhanced_features: bool = True
    param_dtype: jnp.dtype = jnp.float32
    stats_chunk_size: int | None = None

    @nn.compact
    def __call__(self, hidden, logits=None):
        if hidden.ndim < 1:
            raise ValueError(f"hidden must be [..., H], got shape {tuple(hidden.shape)}")
        dtype = jnp.promote_types(hidden.dtype, jnp.float32)
        h = hidden.astype(dtype)
        temperature = 2.0 * _MLPHead(self.mlp_dim, AXES["temp_head"], self.param_dtype, name="temp_head")(h)
        t_in = jax.lax.stop_gradient(temperature)
        features = [h, t_in.astype(dtype)]
        if self.use_enhanced_features:
            if logits is None:
                raise ValueError(
                    "logits are required: use_enhanced_features=True feeds the top-p "
                    "head statistics of softmax(logits / T)"
                )
            lead = hidden.shape[:-1]
            if tuple(logits.shape[:-1]) != tuple(lead):
                raise ValueError(
                    f"logits must be [..., V] with leading dims {tuple(lead)} like "
                    f"hidden, got shape {tuple(logits.shape)}"
                )
            V = logits.shape[-1]
            stats = prob_stats(
                logits.reshape(1, -1, V), t_in.reshape(1, -1, 1), chunk_size=self.stats_chunk_size
            )
            features.append(stats.reshape(*lead, N_STATS).astype(dtype))
        x = jnp.concatenate(features, axis=-1)
        top_p = _MLPHead(self.mlp_dim, AXES["top_p_head"], self.param_dtype, name="top_p_head")(x)
        return temperature, top_p


# --------------------------------------------------------------------------------------------
# official checkpoint format


def _official_key(head: str, layer: str, kind: str) -> str:
    return f"{head}.mlp.{layer[-1]}.{'weight' if kind == 'kernel' else 'bias'}"


def heads_from_official(state_dict: Mapping, *, param_dtype=jnp.float32, stats_chunk_size=None):
    """Build ``(module, variables)`` from the official heads' state dict.

    ``state_dict`` maps official keys (``temp_head.mlp.0.weight`` ...) to arrays (numpy, JAX, or
    anything ``np.asarray`` takes; torch tensors via ``.numpy()`` first). Keys outside the two
    heads (e.g. ``llm.*`` in merged checkpoints) are ignored; a missing, unknown or misshapen head
    key is an error. ``variables`` is ``{"params": ...}`` with logically-partitioned leaves, ready
    for ``module.apply(variables, hidden, logits)``. Use ``param_dtype=jnp.float64`` (under
    ``jax_enable_x64``) to keep float64 weights.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"state_dict must be a mapping of official keys to arrays, got {type(state_dict).__name__}"
        )
    expected = {_official_key(h, l, k) for h in HEADS for l in LAYERS for k in ("kernel", "bias")}
    head_keys = {k for k in state_dict if k.split(".", 1)[0] in HEADS}
    missing = sorted(expected - head_keys)
    unknown = sorted(head_keys - expected)
    if missing:
        raise ValueError(f"state_dict is missing AutoDeco head keys: {missing}")
    if unknown:
        raise ValueError(f"state_dict has unknown AutoDeco head keys: {unknown}")
    sd = {k: np.asarray(state_dict[k]) for k in expected}

    w_t0 = sd["temp_head.mlp.0.weight"]
    if w_t0.ndim != 2:
        raise ValueError(f"temp_head.mlp.0.weight must be (mlp_dim, H), got shape {w_t0.shape}")
    mlp_dim, H = w_t0.shape
    n_in_p = sd["top_p_head.mlp.0.weight"].shape[-1]
    if n_in_p == H + 1 + N_STATS:
        enhanced = True
    elif n_in_p == H + 1:
        enhanced = False
    else:
        raise ValueError(
            f"top_p_head.mlp.0.weight must be (mlp_dim, H+5) or (mlp_dim, H+1) with "
            f"H={H}, got shape {sd['top_p_head.mlp.0.weight'].shape}"
        )
    shapes = {
        "temp_head.mlp.0.weight": (mlp_dim, H),
        "temp_head.mlp.0.bias": (mlp_dim,),
        "temp_head.mlp.2.weight": (1, mlp_dim),
        "temp_head.mlp.2.bias": (1,),
        "top_p_head.mlp.0.weight": (mlp_dim, n_in_p),
        "top_p_head.mlp.0.bias": (mlp_dim,),
        "top_p_head.mlp.2.weight": (1, mlp_dim),
        "top_p_head.mlp.2.bias": (1,),
    }
    for k, shape in shapes.items():
        if sd[k].shape != shape:
            raise ValueError(f"{k} must have shape {shape}, got {sd[k].shape}")

    params = {}
    for head in HEADS:
        params[head] = {}
        for layer in LAYERS:
            params[head][layer] = {}
            for kind in ("kernel", "bias"):
                value = sd[_official_key(head, layer, kind)]
                if kind == "kernel":
                    value = value.T  # torch (out, in) -> flax (in, out)
                params[head][layer][kind] = nn.LogicallyPartitioned(
                    jnp.asarray(value, param_dtype), AXES[head][layer][kind]
                )
    module = AutoDecoHeads(
        mlp_dim=mlp_dim,
        use_enhanced_features=enhanced,
        param_dtype=param_dtype,
        stats_chunk_size=stats_chunk_size,
    )
    return module, {"params": params}


def heads_to_official(params) -> dict:
    """The official state dict (numpy arrays, torch ``(out, in)`` layout) for head params.

    Accepts ``{"params": ...}`` or the inner dict, boxed (logically partitioned) or plain.
    """
    if isinstance(params, Mapping) and "params" in params:
        params = params["params"]
    params = nn.meta.unbox(params)
    if not isinstance(params, Mapping) or set(params) != set(HEADS):
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"params must hold exactly {HEADS}, got {got}")
    out = {}
    for head in HEADS:
        for layer in LAYERS:
            for kind in ("kernel", "bias"):
                try:
                    value = np.asarray(params[head][layer][kind])
                except KeyError as e:
                    raise ValueError(f"params[{head!r}] lacks {layer}/{kind}") from e
                # contiguous: safetensors' save_file writes a transposed view's memory as is
                out[_official_key(head, layer, kind)] = np.ascontiguousarray(
                    value.T if kind == "kernel" else value
                )
    return out
