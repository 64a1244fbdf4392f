"""A tiny Linen LM for training-stack tests: the model contract's call and the Kimi model's logical
axis names, registered as model_type "tiny_test".

`TinyLM(TinyConfig(...)).apply(variables, input_ids_BT, segment_ids=segment_ids_BT) -> ModelOutput`.
Causal attention within segments plus a softly-gated expert FFN (every expert used,
so there are no routing near-ties and sharded runs match single-device runs).
"""

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.models import registry
from jaxllm.models.base import ModelOutput
from jaxllm.train import RunConfig
from jaxllm.train.config import apply_overrides


def _param(mod, name, shape, names, init=None):
    init = init or nn.initializers.normal(0.02)
    return mod.param(name, nn.with_logical_partitioning(init, names), shape, jnp.float32)


def rms_norm(x, w, eps=1e-6):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps) * w).astype(x.dtype)


class Block(nn.Module):
    dim: int
    heads: int
    head_dim: int
    mlp: int
    experts: int

    @nn.compact
    def __call__(self, x_BTD, seg_BT):
        D, H, K, F, E = self.dim, self.heads, self.head_dim, self.mlp, self.experts
        T = x_BTD.shape[1]
        h = rms_norm(x_BTD, _param(self, "attn_norm", (D,), ("embed",), nn.initializers.ones))
        q_BTHK = jnp.einsum(
            "btd,dhk->bthk", h, _param(self, "wq", (D, H, K), ("embed", "heads", "kv")).astype(h.dtype)
        )
        k_BTHK = jnp.einsum(
            "btd,dhk->bthk", h, _param(self, "wk", (D, H, K), ("embed", "heads", "kv")).astype(h.dtype)
        )
        v_BTHK = jnp.einsum(
            "btd,dhk->bthk", h, _param(self, "wv", (D, H, K), ("embed", "heads", "kv")).astype(h.dtype)
        )
        s_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BTHK).astype(jnp.float32) / jnp.sqrt(K)
        causal = jnp.tril(jnp.ones((T, T), bool))
        same = seg_BT[:, :, None] == seg_BT[:, None, :]
        s_BHTS = jnp.where((causal[None] & same)[:, None], s_BHTS, -1e30)
        p_BHTS = jax.nn.softmax(s_BHTS, axis=-1).astype(h.dtype)
        o_BTHK = jnp.einsum("bhts,bshk->bthk", p_BHTS, v_BTHK)
        x_BTD = x_BTD + jnp.einsum(
            "bthk,hkd->btd", o_BTHK, _param(self, "wo", (H, K, D), ("heads", "kv", "embed")).astype(h.dtype)
        )
        h = rms_norm(x_BTD, _param(self, "ffn_norm", (D,), ("embed",), nn.initializers.ones))
        gate_BTE = jax.nn.softmax(
            jnp.einsum(
                "btd,de->bte", h, _param(self, "router", (D, E), ("embed", None)).astype(h.dtype)
            ).astype(jnp.float32),
            -1,
        ).astype(h.dtype)
        up_BTEF = jax.nn.silu(
            jnp.einsum(
                "btd,edf->btef", h, _param(self, "w1", (E, D, F), ("expert", "embed", "mlp")).astype(h.dtype)
            )
        )
        y_BTED = jnp.einsum(
            "btef,efd->bted",
            up_BTEF,
            _param(self, "w2", (E, F, D), ("expert", "mlp", "embed")).astype(h.dtype),
        )
        b = _param(self, "bias", (D,), ("embed",), nn.initializers.zeros)
        return x_BTD + jnp.einsum("bted,bte->btd", y_BTED, gate_BTE) + b.astype(h.dtype)


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    model_type: ClassVar[str] = "tiny_test"
    vocab_size: int = 320
    dim: int = 32
    layers: int = 2
    heads: int = 2
    head_dim: int = 8
    mlp: int = 32
    experts: int = 4

    @property
    def hidden_size(self):
        return self.dim


class TinyLM(nn.Module):
    config: TinyConfig
    remat: str = "none"

    @nn.compact
    def __call__(self, input_ids_BT, *, positions=None, segment_ids=None, cache=None):
        del positions
        if cache is not None:
            raise ValueError("TinyLM has no decode cache")
        c = self.config
        seg = jnp.ones_like(input_ids_BT) if segment_ids is None else segment_ids
        emb = _param(self, "embed", (c.vocab_size, c.dim), ("vocab", "embed"))
        x = jnp.take(emb, input_ids_BT, axis=0)
        block = Block
        if self.remat != "none":
            policy = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}[self.remat]
            block = nn.remat(Block, policy=policy)
        for i in range(c.layers):
            x = block(c.dim, c.heads, c.head_dim, c.mlp, c.experts, name=f"block_{i}")(x, seg)
        x = rms_norm(x, _param(self, "final_norm", (c.dim,), ("embed",), nn.initializers.ones))
        head = _param(self, "lm_head", (c.dim, c.vocab_size), ("embed", "vocab"))
        logits = jnp.einsum("btd,dv->btv", x, head.astype(x.dtype)).astype(jnp.float32)
        return ModelOutput(logits, x)


def register():
    registry.register(registry.Architecture("tiny_test", TinyConfig, TinyLM, hf_key_specs=lambda config: []))


def run_config(data_dir, *overrides, **fields):
    """A quick RunConfig for the tiny test LM (1 device, no samples, no progress bar, sync checkpoints);
    ``fields`` replace the defaults, ``overrides`` are ``key=value`` strings as on the command line."""
    base = dict(
        model="tiny_test",
        seq_len=32,
        batch_size=8,
        steps=12,
        lr=1e-2,
        warmup_steps=2,
        save_every=4,
        data_dir=data_dir,
        num_samples=0,
        progress=False,
        async_checkpoints=False,
    )
    return apply_overrides(RunConfig(**{**base, **fields}), overrides)


def quiet(_msg):
    pass
