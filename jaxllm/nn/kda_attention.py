"""The Kimi Delta Attention layer, as in the released Kimi-Linear checkpoints.

    q,k,v = SiLU(ShortConv(W_{q,k,v} x))                 per head [H,K]; conv kernel W taps, no bias
    g     = -exp(A_log[h]) * softplus(f_b(f_a(x)) + dt_bias)      float32, softplus linear above 20
    beta  = sigmoid(b_proj x)                                       float32
    o     = KDA(q, k, v, g, beta) with in-kernel q/k L2 norm, scale K^-1/2
    y     = o_proj( RMSNorm_head(o) * sigmoid(g_b(g_a(x))) )         no biases anywhere

Decode cache: `KDACache(state_BHKV float32, conv_q/conv_k/conv_v [B,W-1,H,K])`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm import sharding as shd
from jaxllm.nn import context_parallel as cp
from jaxllm.nn._params import fan_in_init, param, project
from jaxllm.nn.conv import causal_conv, causal_conv_context, causal_conv_step, conv_state_after
from jaxllm.nn.norms import gated_rms_norm
from pallas_kernels.kda import kda, kda_context, kda_step, resolve_impl
from pallas_kernels.kda.chunk import CHUNK


class KDACache(NamedTuple):
    state_BHKV: jax.Array  # float32 recurrent state
    conv_q: jax.Array  # [B, W-1, H, K] last inputs of the q short conv
    conv_k: jax.Array
    conv_v: jax.Array


def kda_gate(graw_BTHK, A_log_H, dt_bias_HK):
    """`-exp(A_log[h]) * softplus(graw + dt_bias)` in float32 (softplus = x above 20)."""
    x = graw_BTHK.astype(jnp.float32) + dt_bias_HK.astype(jnp.float32)
    sp = jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))
    return -jnp.exp(A_log_H.astype(jnp.float32))[:, None] * sp


def _a_log_init(key, shape, dtype):
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


def _dt_bias_init(key, shape, dtype):
    lo, hi = math.log(1e-3), math.log(1e-1)
    dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32) * (hi - lo) + lo)
    dt = jnp.maximum(dt, 1e-4)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _per_shard_if_pallas(fn, impl, q_BTHK, k_BTHK, v_BTHV, g_BTHK, beta_BTH, h0_BHKV, seg_BT):
    """`fn(q, k, v, g, beta, h0, seg) -> (o_BTHV, state_BHKV or None)`, once per shard when `impl`
    is a Pallas kernel and a mesh is set (`jax.set_mesh`, as the train loop does).

    XLA cannot partition a Mosaic kernel ("Mosaic kernels cannot be automatically partitioned"),
    so a multi-chip TPU step fails to compile unless the kernel runs under `shard_map`. Rows and
    heads are independent in KDA, so splitting the batch over the mesh's batch axes and the heads
    over its head axis (the rules of `jaxllm.sharding`) gives the same result. Pure-JAX impls and
    meshes without jaxllm's axis names are left to XLA.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if (
        not resolve_impl(impl).startswith("pallas")
        or mesh.empty
        or mesh.size == 1
        or not set(shd.MESH_AXES) <= set(mesh.axis_names)
    ):
        return fn(q_BTHK, k_BTHK, v_BTHV, g_BTHK, beta_BTH, h0_BHKV, seg_BT)

    spec = tuple(shd.logical_to_spec(("batch", None, "heads", None), q_BTHK.shape, mesh))
    b, h = (spec + (None,) * 4)[0], (spec + (None,) * 4)[2]
    tok, state = P(b, None, h, None), P(b, h, None, None)
    args = [q_BTHK, k_BTHK, v_BTHV, g_BTHK, beta_BTH, h0_BHKV, seg_BT]
    specs = [tok, tok, tok, tok, P(b, None, h), state, P(b, None)]
    present = [i for i, a in enumerate(args) if a is not None]

    def body(*xs):
        full = [None] * len(args)
        for i, x in zip(present, xs):
            full[i] = x
        return fn(*full)

    out_specs = (tok, state if h0_BHKV is not None else None)
    return jax.shard_map(
        body, mesh=mesh, in_specs=tuple(specs[i] for i in present), out_specs=out_specs, check_vma=False
    )(*(args[i] for i in present))


def kda_context_parallel(
    mesh, qkv_raw, conv_ws, g_BTHK, beta_BTH, segment_ids, *, scale, impl="auto", axis_names=None
):
    """Short convs + SiLU + KDA of a sequence split over the mesh's `context` axis: one
    `shard_map` in which each device convolves its span with the previous span's halo
    (`causal_conv_context`) and runs `kda_context` (span state transitions across devices).

    qkv_raw: the projected q, k, v `[B,T,H,K]` before the convs; conv_ws: their kernels `[W,H,K]`.
    Returns o_BTHV (v's dtype). Rows go over the batch axes and heads over `tensor` as the rules say."""
    q, k, v = qkv_raw
    B, T, H = q.shape[:3]
    tok, rows, h = cp.token_specs(mesh, B, H, T)
    seg_in = () if segment_ids is None else (segment_ids,)

    def body(q, k, v, cq, ck, cv, g, beta, *seg):
        seg = seg[0] if seg else None
        q, k, v = (
            jax.nn.silu(causal_conv_context(x, w, segment_ids_BT=seg)) for x, w in ((q, cq), (k, ck), (v, cv))
        )
        o, _ = kda_context(
            q,
            k,
            v,
            g,
            beta,
            axis_name=cp.CONTEXT_AXIS,
            scale=scale,
            use_qk_l2norm=True,
            impl=impl,
            segment_ids=seg,
        )
        return o

    w_spec = P(None, h)
    # check_vma=False: the chunk op's loops start from unvarying zeros; gradients were checked
    # against one device (tests/kernels/test_kda_context.py, tests/train/test_context_parallel.py)
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tok, tok, tok, w_spec, w_spec, w_spec, tok, tok) + (rows,) * len(seg_in),
        out_specs=tok,
        check_vma=False,
    )(q, k, v, *conv_ws, g_BTHK, beta_BTH, *seg_in)


class KimiDeltaAttention(nn.Module):
    hidden_size: int
    num_heads: int
    head_dim: int
    conv_kernel: int = 4
    norm_eps: float = 1e-5
    impl: str = "auto"  # passed to pallas_kernels.kda.kda ("auto" | "recurrent" | "chunk")
    dtype: jnp.dtype = jnp.float32  # activations
    param_dtype: jnp.dtype = jnp.float32

    def init_cache(self, batch: int, dtype=None) -> KDACache:
        return init_kda_cache(batch, self.num_heads, self.head_dim, self.conv_kernel, dtype or self.dtype)

    @nn.compact
    def __call__(self, x_BTD, *, segment_ids=None, cache: KDACache | None = None, lengths=None):
        """lengths: with a cache, int32 [B]: only the first lengths[b] of row b's T tokens are real
        (ragged appends, finished rows); the others leave the row's state and conv state as they were."""
        D, H, K, W = self.hidden_size, self.num_heads, self.head_dim, self.conv_kernel
        pd = self.param_dtype
        init_d = fan_in_init(D)
        x = x_BTD.astype(self.dtype)
        B, T = x.shape[:2]

        def proj(name):
            return param(self, name, (D, H, K), ("embed", "heads", "kv"), dtype=pd, init=init_d)

        def conv_w(name):
            return param(
                self,
                name,
                (W, H, K),
                ("conv", "heads", "kv"),
                dtype=pd,
                init=nn.initializers.normal(1.0 / math.sqrt(W)),
            )

        wq, wk, wv = proj("q_proj"), proj("k_proj"), proj("v_proj")
        cq, ck, cv = conv_w("q_conv"), conv_w("k_conv"), conv_w("v_conv")
        A_log = param(self, "A_log", (H,), ("heads",), dtype=jnp.float32, init=_a_log_init)
        dt_bias = param(self, "dt_bias", (H, K), ("heads", "kv"), dtype=jnp.float32, init=_dt_bias_init)
        f_a = param(self, "f_a_proj", (D, K), ("embed", None), dtype=pd, init=init_d)
        f_b = param(self, "f_b_proj", (K, H, K), (None, "heads", "kv"), dtype=pd, init=fan_in_init(K))
        b_proj = param(self, "b_proj", (D, H), ("embed", "heads"), dtype=pd, init=init_d)
        g_a = param(self, "g_a_proj", (D, K), ("embed", None), dtype=pd, init=init_d)
        g_b = param(self, "g_b_proj", (K, H, K), (None, "heads", "kv"), dtype=pd, init=fan_in_init(K))
        o_norm = param(self, "o_norm", (K,), ("kv",), dtype=pd, init=nn.initializers.ones)
        o_proj = param(self, "o_proj", (H, K, D), ("heads", "kv", "embed"), dtype=pd, init=fan_in_init(H * K))

        q, k, v = project(x, wq), project(x, wk), project(x, wv)  # [B,T,H,K]
        graw = project(project(x, f_a), f_b)
        g_BTHK = kda_gate(graw, A_log, dt_bias)
        beta_BTH = jax.nn.sigmoid(project(x, b_proj, dtype=jnp.float32))
        scale = 1.0 / math.sqrt(K)

        new_cache = None
        if cache is not None and lengths is not None:
            # a token past its row's length neither decays (g = 0) nor writes (beta = 0) the state
            valid_BT = jnp.arange(T)[None, :] < lengths[:, None]
            g_BTHK = jnp.where(valid_BT[:, :, None, None], g_BTHK, 0.0)
            beta_BTH = jnp.where(valid_BT[:, :, None], beta_BTH, 0.0)
            conv_after = [
                conv_state_after(s, raw, lengths)
                for s, raw in ((cache.conv_q, q), (cache.conv_k, k), (cache.conv_v, v))
            ]
        mesh = cp.context_mesh() if cache is None else None
        if mesh is not None:
            o_BTHK = kda_context_parallel(
                mesh, (q, k, v), (cq, ck, cv), g_BTHK, beta_BTH, segment_ids, scale=scale, impl=self.impl
            ).astype(self.dtype)
        elif cache is not None and T == 1 and segment_ids is None:
            q1, sq = causal_conv_step(q[:, 0], cq, cache.conv_q)
            k1, sk = causal_conv_step(k[:, 0], ck, cache.conv_k)
            v1, sv = causal_conv_step(v[:, 0], cv, cache.conv_v)
            q1, k1, v1 = jax.nn.silu(q1), jax.nn.silu(k1), jax.nn.silu(v1)
            o1, state = kda_step(
                q1, k1, v1, g_BTHK[:, 0], beta_BTH[:, 0], cache.state_BHKV, scale=scale, use_qk_l2norm=True
            )
            o_BTHK = o1[:, None].astype(self.dtype)
            new_cache = KDACache(state, sq, sk, sv)
        else:
            states = (None, None, None) if cache is None else (cache.conv_q, cache.conv_k, cache.conv_v)
            q, sq = causal_conv(q, cq, state_BSC=states[0], segment_ids_BT=segment_ids)
            k, sk = causal_conv(k, ck, state_BSC=states[1], segment_ids_BT=segment_ids)
            v, sv = causal_conv(v, cv, state_BSC=states[2], segment_ids_BT=segment_ids)
            q, k, v = jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)
            impl = self.impl if cache is None else append_impl(self.impl, T)
            o_BTHK, state = _per_shard_if_pallas(
                lambda q, k, v, g, beta, h0, seg: kda(
                    q,
                    k,
                    v,
                    g,
                    beta,
                    scale=scale,
                    initial_state=h0,
                    output_final_state=cache is not None,
                    use_qk_l2norm=True,
                    impl=impl,
                    segment_ids=seg,
                ),
                impl,
                q,
                k,
                v,
                g_BTHK,
                beta_BTH,
                None if cache is None else cache.state_BHKV,
                segment_ids,
            )
            if cache is not None:
                new_cache = KDACache(state, sq, sk, sv)
        if cache is not None and lengths is not None:
            new_cache = KDACache(new_cache.state_BHKV, *conv_after)

        gate = project(project(x, g_a), g_b)
        o_BTHK = gated_rms_norm(o_BTHK.astype(jnp.float32), o_norm, gate, self.norm_eps).astype(self.dtype)
        y_BTD = project(o_BTHK, o_proj, n_in=2)
        return y_BTD, new_cache


SHORT_APPEND = CHUNK  # tokens: a cached append this short runs the recurrence on CPU/GPU


def append_impl(impl: str, T: int) -> str:
    """The KDA implementation for a cached T-token append under `impl`.

    With `auto` on CPU/GPU (the pure-JAX chunk op), an append of at most one chunk runs the
    recurrence instead: the chunk op pads it to a whole chunk and keeps several state-sized and
    chunk x K x sub-chunk temporaries (1.1 GiB against 0.29 GiB for a 32-token append to 64 rows
    at the 48B widths, tools/mla_memory.py), and reading the state once per token costs what
    decoding those tokens would. The Pallas kernels keep the state on chip, so they stay."""
    if impl == "auto" and T <= SHORT_APPEND and resolve_impl(impl) == "chunk":
        return "recurrent"
    return impl


def init_kda_cache(batch, num_heads, head_dim, conv_kernel, dtype=jnp.float32) -> KDACache:
    conv = jnp.zeros((batch, conv_kernel - 1, num_heads, head_dim), dtype)
    return KDACache(jnp.zeros((batch, num_heads, head_dim, head_dim), jnp.float32), conv, conv, conv)
