"""The Pallas TPU attention kernels compile with the real TPU compiler (Mosaic), forward and
backward, at the default block sizes: libtpu's compile-only v5e, no chip. Interpret mode does not
check Mosaic's layouts or VMEM limits (2048-row query blocks overflowed the dq kernel's 16 MiB
scoped VMEM: MAX_BLOCK_ROWS). Skipped where libtpu is not installed (it needs Python >= 3.12).
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding

from pallas_kernels.attention.tpu import attention_pallas_tpu, attention_pallas_tpu_lse

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")


def _v5e_args(*shapes_dtypes):
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    dev = topologies.get_topology_desc(platform="tpu", topology_name="v5e:1x1").devices[0]
    return [jax.ShapeDtypeStruct(s, d, sharding=SingleDeviceSharding(dev)) for s, d in shapes_dtypes]


def test_training_fwd_bwd_compiles_packed_gqa():
    # MLA's training head dims (192 / 128), 4 q heads per kv head, packed rows
    B, T, H, G, bf = 1, 1024, 8, 2, jnp.bfloat16
    seg = jnp.zeros((B, T), jnp.int32).at[:, T // 2 :].set(1)

    def loss(q, k, v):
        return jnp.sum(attention_pallas_tpu(q, k, v, segment_ids=seg).astype(jnp.float32))

    args = _v5e_args(((B, T, H, 192), bf), ((B, T, G, 192), bf), ((B, T, G, 128), bf))
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    for name in ("attention_fwd_tpu", "attention_dkdv_tpu", "attention_dq_tpu"):
        assert name in text


def test_absorbed_append_compiles():
    # absorbed MLA's cached append: 32 heads on one kv head, keys = latent (512) + rope (64)
    B, T, S, H, bf = 2, 16, 2048, 32, jnp.bfloat16

    def append(q, latent, rope, pos):
        return attention_pallas_tpu(q, (latent, rope), latent, q_offset=pos, kv_length=pos + T)

    args = _v5e_args(((B, T, H, 576), bf), ((B, S, 512), bf), ((B, S, 64), bf), ((B,), jnp.int32))
    assert "attention_fwd_tpu" in jax.jit(append).lower(*args).compile().as_text()


def test_span_of_keys_with_lse_compiles():
    # context parallelism's MLA: 2048 queries at an offset over one 2048-key span (16 heads,
    # documents as indices), o and lse both differentiated, as the spans combine by lse
    B, T, H, bf = 1, 2048, 16, jnp.bfloat16

    def loss(q, k, v, q_doc, k_doc):
        o, lse = attention_pallas_tpu_lse(q, k, v, q_doc=q_doc, k_doc=k_doc, q_offset=jnp.full((B,), 4096))
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(lse > -1e20, lse, 0.0))

    i32 = jnp.int32
    args = _v5e_args(
        ((B, T, H, 192), bf), ((B, T, H, 192), bf), ((B, T, H, 128), bf), ((B, T), i32), ((B, T), i32)
    )
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    for name in ("attention_fwd_tpu", "attention_dkdv_tpu", "attention_dq_tpu"):
        assert name in text
