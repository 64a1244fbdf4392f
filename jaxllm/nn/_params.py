"""Small helpers shared by the layer modules: logically-partitioned params and dense projections."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

DEFAULT_INIT_STD = 0.02


def param(module: nn.Module, name: str, shape, axes, *, dtype=jnp.float32, init=None):
    """Declare a parameter with logical axis names (`axes`, one per dim, None = unnamed)."""
    if len(axes) != len(shape):
        raise ValueError(f"{name}: {len(axes)} axis names {axes} for shape {shape}")
    init = init or nn.initializers.normal(DEFAULT_INIT_STD)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def project(x, kernel, n_in: int = 1, *, dtype=None, out_dtype=None):
    """Contract the last `n_in` dims of x with the first `n_in` dims of kernel (a Dense layer).

    Inputs are cast to `dtype` (default x's), accumulation is float32, the result is `out_dtype`
    (default `dtype`).
    """
    dtype = dtype or x.dtype
    x = x.astype(dtype)
    kernel = kernel.astype(dtype)
    y = jax.lax.dot_general(
        x,
        kernel,
        (((tuple(range(x.ndim - n_in, x.ndim))), tuple(range(n_in))), ((), ())),
        preferred_element_type=jnp.float32,
    )
    return y.astype(out_dtype or dtype)


def fan_in_init(fan_in: int):
    return nn.initializers.normal(1.0 / math.sqrt(fan_in))
