"""SwiGLU feed-forward: `down(silu(gate x) * up x)`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.nn._params import fan_in_init, param, project


def swiglu(x, w_gate_DF, w_up_DF, w_down_FD):
    h = jax.nn.silu(project(x, w_gate_DF)) * project(x, w_up_DF)
    return project(h, w_down_FD)


class MLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD):
        D, F, pd = self.hidden_size, self.intermediate_size, self.param_dtype
        wg = param(self, "gate_proj", (D, F), ("embed", "mlp"), dtype=pd, init=fan_in_init(D))
        wu = param(self, "up_proj", (D, F), ("embed", "mlp"), dtype=pd, init=fan_in_init(D))
        wd = param(self, "down_proj", (F, D), ("mlp", "embed"), dtype=pd, init=fan_in_init(F))
        return swiglu(x_BTD.astype(self.dtype), wg, wu, wd)
