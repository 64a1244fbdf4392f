"""tools/gpu_ptxas.py's first step (no GPU, no triton): the Triton IR that Pallas emits for each
GPU kernel is captured, with the operand types and dot forms the precision asks for and the
state passes' V slice the tool sets. The second step (compiling it with the triton wheel) is not run here."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_ptxas", ROOT / "tools" / "gpu_ptxas.py")
gpu_ptxas = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_ptxas)


@pytest.mark.parametrize("precision", ["highest", "default"])
def test_ttir_of_every_kernel_is_captured(tmp_path, precision):
    paths = gpu_ptxas.dump_ttir(tmp_path, T=128, precision=precision, bv=16)
    assert sorted(paths) == sorted(gpu_ptxas.KERNELS)
    for name, path in paths.items():
        text = path.read_text()
        assert f"tt.func public @{name}(" in text
        dots = re.findall(r"tt\.dot .*: tensor<\d+x\d+x(\w+)> \* tensor<\d+x\d+x(\w+)>", text)
        assert dots, name
        tf32x3 = text.count("inputPrecision = tf32x3")
        if precision == "highest":  # f32 operands: TF32x3 tensor-core dots but in the intra kernel
            assert all(a == b == "f32" for a, b in dots), name
            if name == "kda_chunk_intra_gpu":  # IEEE: as TF32x3 it asks 320 KiB of shared memory
                assert tf32x3 == 0
            elif name == "kda_chunk_grads_gpu":  # all data matmuls; gate picks stay IEEE
                assert 0 < tf32x3 < len(dots)
            else:  # matmuls only
                assert tf32x3 == len(dots), name
        else:  # the data matmuls on bf16 operands
            assert any(a == b == "bf16" for a, b in dots), name
            assert tf32x3 == 0, name
    # the state passes carry a [K, BV] float32 slice of the state through their chunk loop
    for name in gpu_ptxas.STATE_KERNELS:
        assert paths[name].name == f"{name}_{precision}_bv16.ttir"
        assert "scf.for" in paths[name].read_text()
        assert "tensor<128x16xf32>" in paths[name].read_text()
