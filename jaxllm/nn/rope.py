"""Rotary position embeddings in the Hugging Face "rotate_half" convention (not interleaved).

A head vector x of size D is split into halves (x1, x2); at position p with frequencies f (D/2):

    rope(x)_p = x * cos(p f ++ p f) + rotate_half(x) * sin(p f ++ p f),   rotate_half(x) = (-x2, x1)

`inverse_frequencies` gives f for `rope_type` "default" (theta^(-2i/D)) and "llama3" (long
wavelengths divided by `factor`, short ones kept, a smooth ramp between), computed in float32 at
trace time exactly as transformers' `ROPE_INIT_FUNCTIONS` do, so the angles match to the ulp.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def default_inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """theta^(-2i/D) for i < D/2, float32 (torch computes `1 / theta ** (arange(0, D, 2) / D)`)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)


def llama3_inverse_frequencies(
    inv_freq: np.ndarray,
    *,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> np.ndarray:
    """Llama 3's frequency rescaling of `inv_freq` (float32, as transformers' `_compute_llama3_parameters`)."""
    f32 = np.float32
    old_len = original_max_position_embeddings
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = f32(2 * math.pi) / inv_freq
    # wavelengths longer than the old context are slowed down by `factor`; shorter than
    # old_len / high_freq_factor kept; in between, interpolated
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / f32(factor), inv_freq)
    smooth = (f32(old_len) / wavelen - f32(low_freq_factor)) / f32(high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / f32(factor) + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def inverse_frequencies(head_dim: int, theta: float, rope_type: str = "default", **scaling) -> np.ndarray:
    """[head_dim // 2] float32 inverse frequencies for `rope_type` ("llama3" takes LLAMA3_KEYS)."""
    if head_dim % 2:
        raise ValueError(f"rope: head_dim must be even, got {head_dim}")
    inv_freq = default_inverse_frequencies(head_dim, theta)
    if rope_type == "default":
        return inv_freq
    if rope_type == "llama3":
        missing = [k for k in LLAMA3_KEYS if k not in scaling]
        if missing:
            raise ValueError(f"rope: rope_type 'llama3' needs {missing}")
        return llama3_inverse_frequencies(inv_freq, **{k: scaling[k] for k in LLAMA3_KEYS})
    raise ValueError(f"rope: rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rope_angles(positions_BT, inv_freq):
    """cos, sin [B,T,1,D] float32 for per-row positions (angles repeated over both halves)."""
    freqs_BTF = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb_BTD = jnp.concatenate([freqs_BTF, freqs_BTF], axis=-1)
    return jnp.cos(emb_BTD)[:, :, None, :], jnp.sin(emb_BTD)[:, :, None, :]


def apply_rope(x_BTHD, positions_BT, inv_freq):
    """Rotate every head of x by its token's position; float32 inside, x's dtype out."""
    cos, sin = rope_angles(positions_BT, inv_freq)
    x = x_BTHD.astype(jnp.float32)
    return (x * cos + rotate_half(x) * sin).astype(x_BTHD.dtype)


__all__ = ["ROPE_TYPES", "apply_rope", "inverse_frequencies", "rope_angles", "rotate_half"]
