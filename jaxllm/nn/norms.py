"""RMS norms (float32 inside whatever the input dtype)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.nn._params import param


def rms_norm(x, weight, eps: float):
    """`x * rsqrt(mean(x^2) + eps) * weight` over the last axis, computed in float32; x's dtype out."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def gated_rms_norm(x, weight, gate, eps: float):
    """`rms_norm(x) * sigmoid(gate)` in float32 (the KDA output norm); x's dtype out."""
    y = rms_norm(x.astype(jnp.float32), weight, eps)
    return (y * jax.nn.sigmoid(gate.astype(jnp.float32))).astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned scale (named `weight`, like the checkpoints)."""

    eps: float = 1e-5
    axis_name: str | None = "embed"
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = param(
            self,
            "weight",
            (x.shape[-1],),
            (self.axis_name,),
            dtype=self.param_dtype,
            init=nn.initializers.ones,
        )
        return rms_norm(x, w, self.eps)
