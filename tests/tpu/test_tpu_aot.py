"""Compiled for real TPUs without one: libtpu's compile-only devices run the whole TPU compiler.

`jax.jit(f).lower(abstract args placed on TPU devices of a named topology).compile()` runs XLA:TPU
and Mosaic (the Pallas TPU compiler) exactly as on a chip, so what interpret mode cannot see fails
here: block shapes that break the TPU's (8, 128) tiling, layouts Mosaic cannot lower, kernels that
need more VMEM than they are given, a Mosaic kernel XLA is asked to partition over a mesh.
Numerics stay with the interpret-mode tests (tests/kernels/test_kda_pallas.py).

Needs the `[tpu-aot]` extra (libtpu; Python >= 3.12), which CI's newest leg installs; skipped where
libtpu cannot be imported. Shapes are the smallest that still take every branch (two chunks, two
heads, two sequences), so each compile takes seconds.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

try:
    import libtpu  # noqa: F401
except ImportError as e:
    pytest.skip(
        f"libtpu cannot be imported ({e}): the TPU compile checks need pip install -e '.[tpu-aot]' "
        "(Python >= 3.12)",
        allow_module_level=True,
    )

from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding, SingleDeviceSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxllm import sharding as shd  # noqa: E402
from jaxllm.decode import decode_step  # noqa: E402
from jaxllm.models import registry  # noqa: E402
from jaxllm.nn import MLA  # noqa: E402
from pallas_kernels.kda import kda, tpu  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("tpu_aot", ROOT / "tools" / "tpu_aot.py")
tpu_aot = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("tpu_aot", tpu_aot)
_spec.loader.exec_module(tpu_aot)

TOPOLOGY = "v5e:2x2"  # 4 chips of TPU v5e (16 MiB default scoped VMEM per core)


@pytest.fixture(scope="module")
def v5e():
    return topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGY).devices


def _placed(sharding, *shapes_dtypes):
    return tuple(jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes_dtypes)


def _kda_args(dev, K, dtype, mode):
    """Abstract KDA inputs on one v5e chip: q,k,v in `dtype`, gates/beta/state f32, and the
    cu_seqlens [N+1] (B=1, two packed sequences) or segment ids [B,T] (B=2)."""
    B, T, H = (2, 128, 2) if mode == "segment_ids" else (1, 128, 2)
    N = B if mode == "segment_ids" else 2
    ids = ((B, T), jnp.int32) if mode == "segment_ids" else ((N + 1,), jnp.int32)
    f32 = jnp.float32
    return _placed(
        SingleDeviceSharding(dev),
        ((B, T, H, K), dtype),
        ((B, T, H, K), dtype),
        ((B, T, H, K), dtype),
        ((B, T, H, K), f32),
        ((B, T, H), f32),
        ((N, H, K, K), f32),
        ids,
    )


def _kda_tpu(q, k, v, g, beta, h0, ids, *, mode, precision="highest"):
    return kda(
        q,
        k,
        v,
        g,
        beta,
        initial_state=h0,
        output_final_state=True,
        use_qk_l2norm=True,
        impl="pallas_tpu",
        precision=precision,
        **{mode: ids},
    )


def _kernels(compiled):
    text = compiled.as_text()
    return {name for name in ("kda_chunk_fwd_tpu", "kda_chunk_bwd_tpu") if name in text}


@pytest.mark.parametrize("mode", ["cu_seqlens", "segment_ids"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("K,precision", [(64, "highest"), (128, "default")])
def test_kda_kernel_fwd_bwd_compiles_for_v5e(v5e, K, precision, dtype, mode):
    """Forward+backward of the Pallas TPU KDA kernel (K = V) compile with Mosaic for a v5e, with
    float32 matmul operands (K = 64) and bf16 ones with bf16 saved states (K = 128, Kimi's)."""

    def loss(q, k, v, g, beta, h0, ids):
        o, ht = _kda_tpu(q, k, v, g, beta, h0, ids, mode=mode, precision=precision)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(ht)

    grad_fn = jax.jit(jax.grad(loss, argnums=tuple(range(6))))
    compiled = grad_fn.lower(*_kda_args(v5e[0], K, dtype, mode)).compile()
    assert _kernels(compiled) == {"kda_chunk_fwd_tpu", "kda_chunk_bwd_tpu"}
    # a few MiB at these shapes; a layout blow-up (e.g. [.., 1] columns padded to 128 lanes
    # everywhere) would show as tens
    assert compiled.memory_analysis().temp_size_in_bytes < 16 * 2**20


@pytest.mark.parametrize(
    "mode,K,dtype,precision",
    [("cu_seqlens", 64, jnp.float32, "highest"), ("segment_ids", 128, jnp.bfloat16, "default")],
)
def test_kda_kernel_forward_compiles_for_v5e(v5e, mode, K, dtype, precision):
    """The forward alone (inference: no residuals kept for a backward pass)."""
    fwd = jax.jit(lambda *a: _kda_tpu(*a, mode=mode, precision=precision))
    compiled = fwd.lower(*_kda_args(v5e[0], K, dtype, mode)).compile()
    assert _kernels(compiled) == {"kda_chunk_fwd_tpu"}


@pytest.mark.parametrize("precision", ["highest", "default"])
def test_kda_kernel_saved_states_at_kimi_shape(precision):
    """Kimi's shape (B = 1, T = 4096, H = 32, K = V = 128, bf16), forward+backward on a v5e at the
    kernel's default `state_stride`: the backward's windows over a group of chunks fit the scoped
    VMEM at 16 heads per step, and the temporaries are the saved states (every stride-th chunk's,
    f32 under "highest", bf16 under "default") plus the ~34 MiB the rest takes (docs/kernels.md:
    162.1 / 98.1 MiB at stride 1, 66.1 / 50.1 MiB at stride 4)."""
    B, T, H, K = 1, 4096, 32, 128
    S = tpu.STATE_STRIDE
    assert tpu.head_block(H, S, K, K, 2) == 16
    compiled, _, _ = tpu_aot.compile_kda_op(
        (B, T, H, K), TOPOLOGY, impl="pallas_tpu", backward=True, precision=precision
    )
    assert _kernels(compiled) == {"kda_chunk_fwd_tpu", "kda_chunk_bwd_tpu"}
    saved = B * (T // 64 // S) * H * K * K * (4 if precision == "highest" else 2)
    assert compiled.memory_analysis().temp_size_in_bytes <= saved + 36 * 2**20


def test_decode_step_compiles_for_v5e(v5e):
    """`jaxllm.decode.decode_step` of the small Kimi Linear config (KDA state update, MLA over the
    latent cache, MoE), traced as on a TPU, compiles for one v5e chip."""
    config = registry.config_from_file(str(ROOT / "configs" / "small.json"), dtype="bfloat16")
    model = registry.build(tpu_aot.keep_layers(config, 4))  # kda, kda, kda, mla; dense then MoE
    B, S = 2, 256
    mesh = shd.make_mesh(shd.MeshConfig(data=1), devices=v5e[:1])
    on_chip = NamedSharding(mesh, P())

    def place(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_chip), tree)

    ids = jnp.zeros((B, 1), jnp.int32)
    params = place(jax.eval_shape(lambda: shd.unbox(model.init(jax.random.PRNGKey(0), ids))))
    cache = place(jax.eval_shape(lambda: model.init_cache(B, S)))
    token = jax.ShapeDtypeStruct((B,), jnp.int32, sharding=on_chip)
    step = jax.jit(lambda p, t, c: decode_step(model, p, t, c))
    with tpu_aot.traced_as_on_tpu(), jax.set_mesh(mesh):
        compiled = step.lower(params, token, cache).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 64 * 2**20


def test_kimi_linear_train_step_compiles_on_v5e_mesh():
    """One full train step (forward, backward, AdamW update) of the small Kimi Linear config on a
    v5e:2x4 mesh of fsdp=2 x expert=2 x context=2, with the shardings `jaxllm train` uses, traced as
    on a TPU. KDA runs the Pallas TPU kernels once per span inside `kda_context` (XLA cannot
    partition a Mosaic kernel: without the shard_map this fails with "Mosaic kernels cannot be
    automatically partitioned"); the conv halo is a collective-permute; MLA all-gathers the latent
    KV and runs its Pallas attention per shard; the MoE sends tokens to their experts with
    all-to-all (expert parallelism).

    Two of the config's twelve layers, so that it compiles in about two minutes: a KDA layer with
    the dense FFN and an MLA layer with the MoE; the other ten repeat them (one mesh with every
    axis compiles in less time than two meshes with two axes each)."""
    compiled, _, _ = tpu_aot.compile_train_step(
        str(ROOT / "configs" / "small.json"),
        "v5e:2x4",
        {"data": 1, "fsdp": 2, "tensor": 1, "expert": 2, "context": 2},
        seq_len=256,
        batch=4,
        layers=2,
        model_args={"layer_types": ["kda", "mla"] + ["kda"] * 10},
        compute_dtype="bfloat16",
    )
    text = compiled.as_text()
    assert "kda_chunk_fwd_tpu" in text and "kda_chunk_bwd_tpu" in text
    assert "all-gather" in text and "collective-permute" in text and "all-to-all" in text
    report = tpu_aot.memory_report(compiled)
    assert report["flops"] > 0 and report["temp_bytes"] > 0
    assert report["peak_bytes"] < 16 * 2**30  # a v5e chip's HBM


def test_mla_pallas_attention_on_mesh(v5e):
    """An MLA layer, forward and backward, with its default attention (the Pallas TPU kernel on a
    TPU) and a batch split over the v5e:2x2 mesh, as in training: XLA cannot partition a Mosaic
    kernel, so the layer runs it per shard (`mla_sharded_expanded`)."""
    c = registry.config_from_file(str(ROOT / "configs" / "small.json"), dtype="bfloat16")
    layer = MLA(
        hidden_size=c.hidden_size,
        num_heads=c.num_attention_heads,
        kv_lora_rank=c.kv_lora_rank,
        qk_nope_head_dim=c.qk_nope_head_dim,
        qk_rope_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim,
        dtype=jnp.bfloat16,
    )
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=2, tensor=1, expert=2), devices=v5e)
    x = jnp.zeros((4, 128, c.hidden_size), jnp.bfloat16)
    params = jax.eval_shape(lambda: shd.unbox(layer.init(jax.random.PRNGKey(0), x)))
    rows = NamedSharding(mesh, shd.batch_spec())
    params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())), params
    )
    x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P(rows.spec[0])))
    loss = lambda p, x: jnp.sum(layer.apply(p, x)[0].astype(jnp.float32))  # (y, cache)
    with tpu_aot.traced_as_on_tpu(), jax.set_mesh(mesh):
        jax.jit(jax.grad(loss)).lower(params, x).compile()
