"""Pallas kernels for jaxllm. Depends on jax alone: importable without flax or any jaxllm code."""
