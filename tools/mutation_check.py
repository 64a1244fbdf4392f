"""Mutation check: every test listed here must fail when its mutation is applied to the code, and
pass without it (issue 18: tests that could not catch the bug they name).

Each entry is a hand-written (file, old text, new text, test ids) mutation. The script copies the
working tree (tracked files and untracked files git does not ignore) to a temporary folder, runs
every listed test there unmutated (expects green), then, per mutation, makes a fresh copy, applies
the mutation (the old text must occur exactly once) and runs that mutation's tests (expects at
least one red). The checkout itself is never modified. It prints a table, one row per mutation,
and exits 1 if any mutation survives, any clean run is red, or a run errs (a mutation whose old
text is no longer in its file is an error too: update the entry).

    python tools/mutation_check.py               # all mutations, one at a time
    python tools/mutation_check.py -k sandbox    # the entries whose id or test contains "sandbox"
    python tools/mutation_check.py -k decode -k moe   # either
    python tools/mutation_check.py --list        # the entries, without running anything
    python tools/mutation_check.py --jobs 2      # two pytest runs at once

A test that is skipped on this host (the sandbox's namespace tests without root or unshare), or a
mutation only a module this environment lacks can see (libtpu, for Mosaic's own VMEM check), is
reported as "skipped here", neither killed nor survived, and does not fail the check.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutation:
    id: str
    path: str  # file, relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple  # pytest node ids (a test without [...]: all its cases; a class: its tests)
    what: str  # the bug the mutation stands for
    needs: str = ""  # a module the test needs to see this mutation (else "skipped here")


SANDBOX_TESTS = "tests/agent/test_sandbox.py::"

MUTATIONS = [
    # 1. make_optimizer's clipping, seen through the optimizer (not optax alone)
    Mutation(
        "optim-no-clipping",
        "jaxllm/train/optim.py",
        "      optax.clip_by_global_norm(config.clip_norm),\n",
        "",
        ("tests/train/test_optim.py::test_clipping_bounds_update_norm",),
        "make_optimizer no longer clips gradients",
    ),
    # 2. question text read back through the graph
    Mutation(
        "synth-relations-reversed",
        "jaxllm/agent/synth.py",
        '    for rel in path:\n        phrase = f"the {RELATIONS[rel].phrase} of {phrase}"',
        '    for rel in reversed(path):\n        phrase = f"the {RELATIONS[rel].phrase} of {phrase}"',
        ("tests/agent/test_synth.py::test_sampled_questions_have_the_graph_answer",),
        "the question names the relations in reverse order",
    ),
    # 3. the AutoDeco heads drive sampling
    Mutation(
        "decode-heads-ignored",
        "jaxllm/decode.py",
        "kw = dict(temperature_B=t_B.reshape(-1), top_p_B=p_B.reshape(-1))",
        "kw = dict(temperature_B=jnp.ones_like(t_B).reshape(-1), top_p_B=jnp.ones_like(p_B).reshape(-1))",
        (
            "tests/test_decode.py::test_autodeco_heads_drive_sampling",
            "tests/agent/test_rollout.py::test_scan_equals_segmented_with_autodeco_sampling",
        ),
        "the sampler ignores the heads' temperature and top-p",
    ),
    Mutation(
        "decode-top-p-ignored",
        "jaxllm/decode.py",
        "top_p_B=p_B.reshape(-1))",
        "top_p_B=jnp.ones_like(p_B).reshape(-1))",
        ("tests/test_decode.py::test_autodeco_heads_drive_sampling",),
        "the sampler ignores the heads' top-p (the old test's hot half passed this)",
    ),
    Mutation(
        "decode-heads-see-zero-hidden",
        "jaxllm/decode.py",
        "heads_module.apply(heads_params, hidden_BD, logits_BV)",
        "heads_module.apply(heads_params, jnp.zeros_like(hidden_BD), logits_BV)",
        ("tests/test_decode.py::test_autodeco_heads_drive_sampling",),
        "the heads are not given the hidden state",
    ),
    # 4. the MoE module against an independent float64 computation
    Mutation(
        "moe-no-shared-expert",
        "jaxllm/nn/moe.py",
        "            y = y + swiglu(x_BTD.astype(cd), sg, su, sd)",
        "            y = y",
        ("tests/nn/test_moe.py::test_moe_module_shared_expert_and_axes",),
        "the shared expert's output is dropped",
    ),
    Mutation(
        "moe-no-routed-scaling",
        "jaxllm/nn/moe.py",
        "scaling=self.routed_scaling_factor",
        "scaling=1.0",
        ("tests/nn/test_moe.py::test_moe_module_shared_expert_and_axes",),
        "routed_scaling_factor is ignored",
    ),
    # 5. a checkpoint placed on 8 devices by the logical-axis rules
    Mutation(
        "sharding-mlp-rule",
        "jaxllm/sharding.py",
        '    ("mlp", ("tensor",)),',
        '    ("mlp", ()),',
        ("tests/test_sharding.py::test_param_shardings_place_each_param",),
        "a wrong rule: mlp no longer sharded over tensor",
    ),
    # 6. what the lowered kernels launch
    Mutation(
        "kda-tpu-chunk-axis-parallel",
        "pallas_kernels/kda/tpu.py",
        '_SEMANTICS = ("parallel", "parallel", "arbitrary")',
        '_SEMANTICS = ("parallel", "parallel", "parallel")',
        (
            "tests/kernels/test_kda_pallas.py::TestKDAPallas::test_lowers_for_hardware[pallas_tpu-segment_ids]",
        ),
        "the chunk axis, which carries the state, may be split across TensorCores",
    ),
    Mutation(
        "kda-gpu-state-grid",
        "pallas_kernels/kda/gpu.py",
        "f32_dot=_tf32x3(interpret)\n        ),\n        grid=(B, H, V // BV),\n        in_specs=[\n            _whole((NC,)),\n            _whole((NC,)),\n            _seq_spec(Tp, K),\n            _seq_vspec(Tp, V, BV=BV),",
        "f32_dot=_tf32x3(interpret)\n        ),\n        grid=(B, H, 1),\n        in_specs=[\n            _whole((NC,)),\n            _whole((NC,)),\n            _seq_spec(Tp, K),\n            _seq_vspec(Tp, V, BV=BV),",
        (
            "tests/kernels/test_kda_pallas.py::TestKDAPallas::test_lowers_for_hardware[pallas_gpu-segment_ids]",
        ),
        "the forward state kernel launches one V slice instead of V/64",
    ),
    Mutation(
        "kda-tpu-vmem-limit",
        "pallas_kernels/kda/tpu.py",
        "VMEM_LIMIT = 48 * 2**20",
        "VMEM_LIMIT = 256 * 1024",
        (
            "tests/kernels/test_kda_pallas.py::TestKDAPallas::test_lowers_for_hardware[pallas_tpu-segment_ids]",
        ),
        "the kernels need more VMEM than they ask for (the windows estimate sees it; Mosaic too, with libtpu)",
    ),
    Mutation(
        "kda-tpu-bwd-vmem-overrun",
        "pallas_kernels/kda/tpu.py",
        'compiler_params=_params(),\n        interpret=interpret,\n        name="kda_chunk_bwd_tpu",',
        "compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS, vmem_limit_bytes=512 * 1024),\n"
        '        interpret=interpret,\n        name="kda_chunk_bwd_tpu",',
        (
            "tests/tpu/test_tpu_aot.py::test_kda_kernel_fwd_bwd_compiles_for_v5e[128-default-bf16-segment_ids]",
        ),
        "the backward kernel's windows and scratch overrun the VMEM it is given: interpret mode runs it, "
        "Mosaic (tests/tpu, libtpu) refuses it",
        needs="libtpu",
    ),
    Mutation(
        "kda-tpu-state-head-block",
        "pallas_kernels/kda/tpu.py",
        "lambda b, h, c, s, f: (b + s[ch(c)], h, 0, 0)",
        "lambda b, h, c, s, f: (b + s[ch(c)], 0, 0, 0)",
        ("tests/kernels/test_kda_pallas.py::test_tpu_head_blocks",),
        "every head block reads h0 / writes ht, dh0 of the first head block",
    ),
    Mutation(
        "kda-tpu-dglc-dropped",
        "pallas_kernels/kda/tpu.py",
        "dG = jnp.where(_iota((C, K), 0) == C - 1, dG + _row_of(dglc, _eye(K)), dG)",
        "dG = dG",
        ("tests/kernels/test_kda_pallas.py::test_tpu_head_blocks",),
        "the chunk decay's use of G's last row (the state step) no longer reaches dg",
    ),
    Mutation(
        "kda-diag-always-factorised",
        "pallas_kernels/kda/tpu.py",
        "flags = flags | pm.factorisable_flags(g, NC, time_axis=1)",
        "flags = flags | pm.FAST",
        ("tests/kernels/test_kda_pallas.py::TestKDAPallas::test_extreme_gates_ragged_length[pallas_tpu]",),
        "the diagonal blocks are factorised for any gate: exp(+-G) factors clip (or overflow) at -20 per step",
    ),
    Mutation(
        "kda-diag-span-lenient",
        "pallas_kernels/kda/_pallas_math.py",
        "jnp.max(span, axis=other) <= SAFE_SPAN, FAST, 0)",
        "jnp.max(span, axis=other) <= 2 * SAFE_SPAN, FAST, 0)",
        ("tests/kernels/test_kda_pallas.py::test_diagonal_block_form_choice",),
        "chunks whose decay spans up to 120 within a sub-chunk take the factorised form",
    ),
    Mutation(
        "kda-diag-exact-only",
        "pallas_kernels/kda/_pallas_math.py",
        "return lax.cond(fast, lambda *x: _pair_fast(*x, strict), lambda *x: _pair_exact(*x, strict), a, b, G)",
        "return lax.cond(fast, lambda *x: _pair_exact(*x, strict), lambda *x: _pair_exact(*x, strict), a, b, G)",
        ("tests/kernels/test_kda_pallas.py::test_tpu_kernel_work_is_matmul_shaped",),
        "the diagonal blocks always go column by column (exact, but ~10x the elementwise work)",
    ),
    Mutation(
        "kda-chunk-groups-cpu-everywhere",
        "pallas_kernels/kda/chunk.py",
        "bwd_rows, fwd_rows = group_rows(jax.default_backend())",
        'bwd_rows, fwd_rows = group_rows("cpu")',
        ("tests/kernels/test_kda.py::test_chunk_loop_groups_follow_the_backend",),
        "the chunk path's loop groups ignore the backend (one chunk per step on GPU/TPU at Kimi shapes)",
    ),
    # issue 19: the kernels' precision option
    Mutation(
        "kda-precision-not-applied",
        "pallas_kernels/kda/_pallas_math.py",
        "        a.astype(dt), b.astype(dt), (contract, ((), ())), precision=precision, preferred_element_type=F32",
        "        a, b, (contract, ((), ())), precision=precision, preferred_element_type=F32",
        ("tests/kernels/test_kda_pallas.py::test_default_precision_feeds_bf16_operands",),
        'precision="default" no longer rounds the matmul operands to bf16 (float32 on every backend)',
    ),
    Mutation(
        "kda-tpu-gate-cumsum-follows-precision",
        "pallas_kernels/kda/tpu.py",
        "    G = _exact(_tril(C), g, ((1,), (0,)))",
        "    G = pm._dot(_tril(C), g)",
        ("tests/kernels/test_kda_pallas.py::test_default_precision_feeds_bf16_operands[pallas_tpu]",),
        'the in-kernel gate cumsum takes bf16 operands under precision="default" (DESIGN.md: gates f32)',
    ),
    Mutation(
        "kda-row-pick-follows-precision",
        "pallas_kernels/kda/_pallas_math.py",
        "        onehot, x, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=F32",
        "        onehot.astype(_MATMUL_DTYPE.get()), x.astype(_MATMUL_DTYPE.get()), (((1,), (0,)), ((), ())),\n"
        "        precision=lax.Precision.HIGHEST, preferred_element_type=F32",
        ("tests/kernels/test_kda_pallas.py::test_default_precision_feeds_bf16_operands[pallas_gpu]",),
        'picking a sub-chunk\'s reference row G_r rounds it to bf16 under precision="default" '
        "(the exp(SAFE_SPAN) clamp then cuts factors of spans near 60)",
    ),
    Mutation(
        "kda-default-precision-float16",
        "pallas_kernels/kda/_pallas_math.py",
        'return F32 if precision_name(precision) == "highest" else BF16',
        'return F32 if precision_name(precision) == "highest" else jnp.float16',
        (
            "tests/kernels/test_kda_pallas.py::TestKDAPallas::test_bf16_inputs[pallas_tpu-default]",
            "tests/kernels/test_kda_pallas.py::TestKDAPallas::test_bf16_inputs[pallas_gpu-default]",
        ),
        'precision="default" rounds to float16 (TF32-like mantissa, 5-bit exponent): the factorised '
        "decay factors (up to exp(60)) overflow",
    ),
    Mutation(
        "kda-precision-ignored-off-the-kernels",
        "pallas_kernels/kda/__init__.py",
        '    if precision != "highest" and not impl.startswith("pallas"):',
        "    if False:",
        ("tests/kernels/test_kda_pallas.py::test_precision_applies_to_the_pallas_kernels_only",),
        'kda(impl="chunk", precision="default") silently computes at full precision',
    ),
    # 7. K = V = 128: the GPU kernel's V slices
    Mutation(
        "kda-gpu-fwd-v-slice",
        "pallas_kernels/kda/gpu.py",
        'one program walks all chunks of one (batch, head, V-slice)."""\n'
        "    b, hh, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)\n"
        "    C = pm.CHUNK\n    cols = pl.ds(pl.multiple_of(vb * BV, BV), BV)",
        'one program walks all chunks of one (batch, head, V-slice)."""\n'
        "    b, hh, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)\n"
        "    C = pm.CHUNK\n    cols = pl.ds(0, BV)",
        ("tests/kernels/test_kda_head128.py::test_head_size_128_matches_recurrence[pallas_gpu]",),
        "every forward state program reads and writes the first 64 columns of V",
    ),
    Mutation(
        "kda-gpu-bwd-v-slice",
        "pallas_kernels/kda/gpu.py",
        'chunks in reverse: dhs[c] = cotangent of the state after chunk c."""\n'
        "    b, hh, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)\n"
        "    C = pm.CHUNK\n    cols = pl.ds(pl.multiple_of(vb * BV, BV), BV)",
        'chunks in reverse: dhs[c] = cotangent of the state after chunk c."""\n'
        "    b, hh, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)\n"
        "    C = pm.CHUNK\n    cols = pl.ds(0, BV)",
        ("tests/kernels/test_kda_head128.py::test_head_size_128_matches_recurrence[pallas_gpu]",),
        "the backward state programs all use the first 64 columns of V (forward still right)",
    ),
    # 10. bf16 compute and remat in the train step, read off its jaxpr
    Mutation(
        "train-bf16-cast-disabled",
        "jaxllm/train/step.py",
        "    if dtype == jnp.float32:\n        return params\n",
        "    if True:\n        return params\n",
        ("tests/train/test_train.py::test_bf16_compute_and_remat_run",),
        "compute_dtype=bfloat16 leaves the step in float32",
    ),
    Mutation(
        "train-remat-ignored",
        "jaxllm/train/loop.py",
        "            remat=config.remat,\n",
        '            remat="none",\n',
        ("tests/train/test_train.py::test_bf16_compute_and_remat_run",),
        "the remat setting never reaches the model",
    ),
    # 11. the values of the restored data position
    Mutation(
        "data-state-positions-lost",
        "jaxllm/data/pipeline.py",
        '"rows": {str(r): dataclasses.asdict(self.state[r]) for r in self.rows}}',
        '"rows": {str(r): dataclasses.asdict(RowState(*divmod(r, self.num_docs))) for r in self.rows}}',
        ("tests/train/test_multidevice.py::test_checkpoint_restores_onto_a_different_mesh",),
        "checkpoints save every row at its first position (right keys, wrong values)",
    ),
    # 12. float32 upcasts under bf16 compute
    Mutation(
        "norm-upcast-removed",
        "jaxllm/nn/norms.py",
        "    x32 = x.astype(jnp.float32)\n",
        "    x32 = x\n",
        ("tests/models/test_kimi_linear.py::test_bf16_compute_close_to_f32",),
        "RMSNorm computed in the input dtype (bf16)",
    ),
    Mutation(
        "norm-upcast-removed-hf",
        "jaxllm/nn/norms.py",
        "    x32 = x.astype(jnp.float32)\n",
        "    x32 = x\n",
        ("tests/models/test_hf.py::test_bf16_load_keeps_gates_float32",),
        "RMSNorm in bf16, seen by the tightened bound alone (19% > 15%)",
    ),
    Mutation(
        "kda-gate-upcast-removed",
        "jaxllm/nn/kda_attention.py",
        "    x = graw_BTHK.astype(jnp.float32) + dt_bias_HK.astype(jnp.float32)",
        "    x = graw_BTHK + dt_bias_HK.astype(graw_BTHK.dtype)",
        ("tests/models/test_kimi_linear.py::test_bf16_compute_close_to_f32",),
        "the KDA gate's softplus computed in bf16",
    ),
    Mutation(
        "kda-beta-upcast-removed",
        "jaxllm/nn/kda_attention.py",
        "project(x, b_proj, dtype=jnp.float32)",
        "project(x, b_proj)",
        ("tests/models/test_kimi_linear.py::test_bf16_compute_close_to_f32",),
        "beta computed in bf16",
    ),
    Mutation(
        "kda-beta-upcast-removed-hf",
        "jaxllm/nn/kda_attention.py",
        "project(x, b_proj, dtype=jnp.float32)",
        "project(x, b_proj)",
        ("tests/models/test_hf.py::test_bf16_load_keeps_gates_float32",),
        "beta in bf16, seen by the tightened bound alone (17% > 15%)",
    ),
    # The sandbox's guards (docs/agent.md, "Tests"): each removed, a test turns red.
    Mutation(
        "sandbox-directory-fds",
        "jaxllm/agent/sandbox.py",
        "        if strict and path is not None and isdir(path):",
        "        if False and strict and path is not None and isdir(path):",
        (SANDBOX_TESTS + "test_process_mode_denies_directory_file_descriptors",),
        "process mode allows directory file descriptors",
    ),
    Mutation(
        "sandbox-dir-fd-arguments",
        "jaxllm/agent/sandbox.py",
        "                    if strict and i < _len(args) and args[i] not in (None, no_dir_fd):",
        "                    if False and strict and i < _len(args) and args[i] not in (None, no_dir_fd):",
        (SANDBOX_TESTS + "test_process_mode_denies_directory_file_descriptors",),
        "process mode allows dir_fd arguments",
    ),
    Mutation(
        "sandbox-code-objects",
        "jaxllm/agent/sandbox.py",
        '    "code.__new__",\n',
        "",
        (SANDBOX_TESTS + "test_audit_hook_denies_constructing_code_objects",),
        "the audit hook allows constructing code objects",
    ),
    Mutation(
        "sandbox-marshal",
        "jaxllm/agent/sandbox.py",
        '_STRICT_DENY_PREFIXES = ("marshal.load",)',
        "_STRICT_DENY_PREFIXES = ()",
        (SANDBOX_TESTS + "test_audit_hook_denies_constructing_code_objects[process]",),
        "process mode allows marshal.loads",
    ),
    Mutation(
        "sandbox-no-seccomp",
        "jaxllm/agent/sandbox.py",
        "            if seccomp_lib is not None:\n                _install_seccomp(seccomp_lib, isolation)",
        "            if False:\n                _install_seccomp(seccomp_lib, isolation)",
        (SANDBOX_TESTS + "test_seccomp_filter_denies_what_the_namespaces_allow",),
        "the seccomp filter is never loaded",
    ),
    Mutation(
        "sandbox-supervisor-takes-signals",
        "jaxllm/agent/sandbox.py",
        "        previous[sig] = signal.signal(sig, signal.SIG_IGN)",
        "        previous[sig] = signal.getsignal(sig)",
        (SANDBOX_TESTS + "test_hostile_set_is_contained[userns_os_only]",),
        "the supervisor does not ignore signals from the user process",
    ),
    Mutation(
        "sandbox-no-cgroup",
        "jaxllm/agent/sandbox.py",
        "        cgroup = _create_run_cgroup(",
        "        cgroup = [] and _create_run_cgroup(",
        (SANDBOX_TESTS + "test_cgroup_limits_the_memory_of_all_processes_together",),
        "no cgroup is made for a run",
    ),
    Mutation(
        "sandbox-capabilities-kept",
        "jaxllm/agent/sandbox.py",
        "        os.setuid(uid)\n    _drop_capabilities(libc)",
        "        os.setuid(uid)",
        (SANDBOX_TESTS + "test_user_code_holds_no_capabilities",),
        "capabilities are not dropped",
    ),
    Mutation(
        "sandbox-no-user-namespace",
        "jaxllm/agent/sandbox.py",
        '_USERNS_FLAGS = ("--user", "--map-root-user")',
        "_USERNS_FLAGS = ()",
        (SANDBOX_TESTS + "test_hostile_set_is_contained_as_an_unprivileged_user",),
        "userns mode without a user namespace",
    ),
    Mutation(
        "sandbox-auto-fails-open",
        "jaxllm/agent/sandbox.py",
        "            raise SandboxUnavailableError(NO_ISOLATION_MESSAGE)",
        '            return "process"',
        (SANDBOX_TESTS + "test_auto_refuses_to_run_without_os_isolation",),
        "auto falls back to process mode",
    ),
    # issue 14: the released-model families and the streaming loader
    Mutation(
        "qwen-no-qk-norm",
        "jaxllm/nn/attention.py",
        "        if self.qk_norm:  # Qwen3",
        "        if False:  # Qwen3",
        ("tests/models/test_qwen.py::test_logits_match_transformers",),
        "Qwen3's per-head q/k RMSNorm is skipped",
    ),
    Mutation(
        "rope-interleaved",
        "jaxllm/nn/rope.py",
        "    x1, x2 = jnp.split(x, 2, axis=-1)\n    return jnp.concatenate([-x2, x1], axis=-1)",
        "    x1, x2 = x[..., 0::2], x[..., 1::2]\n    return jnp.stack([-x2, x1], axis=-1).reshape(x.shape)",
        ("tests/nn/test_rope_attention.py", "tests/models/test_qwen.py::test_logits_match_transformers"),
        "GPT-J style interleaved rotation instead of Hugging Face's rotate_half",
    ),
    Mutation(
        "hf-load-holds-everything",
        "jaxllm/models/hf.py",
        "                    finish(s.path, w)\n                    continue",
        "                    finish.__dict__.setdefault('held', []).append(w)\n"
        "                    finish(s.path, w)\n                    continue",
        ("tests/models/test_hf_streaming.py::test_peak_host_memory_is_near_one_shard",),
        "the loader keeps every converted tensor on the host until the end",
    ),
    Mutation(
        "hf-load-reads-whole-tensors",
        "jaxllm/models/hf.py",
        "boxes[s.path] = host_box(sharding_of(s.path), ",
        "boxes[s.path] = host_box(None, ",
        ("tests/models/test_hf_host_reads.py::test_each_process_reads_what_its_devices_hold",),
        "every process reads every tensor whole from the files, not only what its devices hold",
    ),
    Mutation(
        "hf-read-box-linear-widens",
        "jaxllm/models/hf_keys.py",
        "        box_in, box_out = _widen(box[:n], shape[:n]), _widen(box[n:], shape[n:])",
        "        box_in, box_out = tuple((0, d) for d in shape[:n]), _widen(box[n:], shape[n:])",
        ("tests/models/test_hf_host_reads.py::test_a_box_split_along_a_leading_dimension_reads_only_itself",),
        "a Linear read takes every input row instead of the box's",
    ),
    # issue 15: the engine
    Mutation(
        "kda-ragged-writes-padding",
        "jaxllm/nn/kda_attention.py",
        "            beta_BTH = jnp.where(valid_BT[:, :, None], beta_BTH, 0.0)\n",
        "",
        ("tests/test_engine.py::test_ragged_batch_equals_each_prompt_alone[kimi_linear_tiny]",),
        "a row's padding tokens write the KDA state",
    ),
    Mutation(
        "kda-ragged-conv-state",
        "jaxllm/nn/kda_attention.py",
        "            new_cache = KDACache(new_cache.state_BHKV, *conv_after)",
        "            new_cache = new_cache",
        ("tests/test_engine.py::test_ragged_batch_equals_each_prompt_alone[kimi_linear_tiny]",),
        "the short conv's state is taken after a row's padding, not after its last real token",
    ),
    Mutation(
        "engine-pos-counts-padding",
        "jaxllm/models/base.py",
        "    return cache.pos + (T if lengths_B is None else lengths_B)",
        "    return cache.pos + T",
        ("tests/test_engine.py::test_ragged_batch_equals_each_prompt_alone[qwen3_tiny]",),
        "a row's cache position advances over its padding",
    ),
    Mutation(
        "engine-one-key-for-all-rows",
        "jaxllm/ops/sampling.py",
        "        drawn_B = jax.vmap(lambda key, row: jax.random.categorical(key, row))(rng, final_BV)",
        "        drawn_B = jax.random.categorical(rng[0], final_BV, axis=-1)",
        ("tests/test_engine.py::test_sampled_rows_depend_only_on_their_keys",),
        "every row draws with the first row's key",
    ),
    # issue 16: blockwise attention (pallas_kernels/attention) and MLA on it
    Mutation(
        "attention-no-causal-mask",
        "pallas_kernels/attention/common.py",
        "        mask = mask & (k_pos <= q_pos)\n",
        "        mask = mask & (k_pos >= 0)\n",
        (
            "tests/kernels/test_attention.py::TestAttention::test_causal_packed_gqa_ragged_qk_ne_v",
            "tests/nn/test_mla_blockwise.py::test_blockwise_equals_expanded",
        ),
        "the blockwise attention lets queries see later keys",
    ),
    Mutation(
        "attention-raw-segment-ids",
        "pallas_kernels/attention/common.py",
        "        k_doc = document_index(segment_ids)\n",
        "        k_doc = segment_ids\n",
        (
            "tests/kernels/test_attention.py::TestAttention::test_causal_packed_gqa_ragged_qk_ne_v",
            "tests/nn/test_mla_blockwise.py::test_blockwise_equals_expanded",
        ),
        "raw segment ids compared: a reused id joins two documents",
    ),
    Mutation(
        "attention-no-online-rescale",
        "pallas_kernels/attention/common.py",
        "    return m_new, alpha * l + jnp.sum(p, axis=-1, keepdims=True), alpha * acc + pv(p)",
        "    return m_new, l + jnp.sum(p, axis=-1, keepdims=True), acc + pv(p)",
        ("tests/kernels/test_attention.py::TestAttention::test_causal_packed_gqa_ragged_qk_ne_v",),
        "earlier key blocks' sums are not rescaled when the running max grows",
    ),
    Mutation(
        "attention-blockwise-reads-past-reach",
        "pallas_kernels/attention/blockwise.py",
        "        n_blocks = jnp.clip(_cdiv(hi, cfg.bk), 0, nk)\n",
        "        n_blocks = nk\n",
        ("tests/kernels/test_attention.py::TestAttention::test_mqa_cached_append_key_parts[blockwise]",),
        "the blockwise path reads every key block of the buffer, past each row's length",
    ),
    Mutation(
        "attention-tpu-reads-past-reach",
        "pallas_kernels/attention/tpu.py",
        "    return jnp.minimum(_div(hi + cfg.bk - 1, cfg.bk), cfg.nk) - 1",
        "    return cfg.nk - 1 + 0 * hi",
        ("tests/kernels/test_attention.py::TestAttention::test_mqa_cached_append_key_parts[pallas_tpu]",),
        "the TPU kernel fetches and computes every key block, past each row's length",
    ),
    Mutation(
        "attention-bwd-skips-diagonal",
        "pallas_kernels/attention/blockwise.py",
        "            jnp.clip((j * cfg.bk - off[b]) // cfg.bq, 0, nq) if cfg.causal else 0",
        "            jnp.clip((j * cfg.bk - off[b]) // cfg.bq + 1, 0, nq) if cfg.causal else 0",
        ("tests/kernels/test_attention.py::TestAttention::test_causal_packed_gqa_ragged_qk_ne_v[blockwise]",),
        "the backward starts one query block late and misses the diagonal block's gradients",
    ),
    Mutation(
        "mla-append-reads-wrong-rows",
        "jaxllm/nn/mla.py",
        "        kv_rows = n * g + jnp.arange(g, dtype=jnp.int32)",
        "        kv_rows = jnp.arange(g, dtype=jnp.int32)",
        ("tests/nn/test_mla_blockwise.py::test_cached_append_equals_dense",),
        "every row group of the absorbed append reads the first group's cache rows",
    ),
    Mutation(
        "mla-train-dense-scores",
        "jaxllm/nn/mla.py",
        '        if self.impl == "auto":\n',
        '        if self.impl == "auto" and cache is not None:\n',
        ("tests/nn/test_mla_memory.py::test_fwd_bwd_temporaries_linear_in_T",),
        "training/prefill materialises [B,H,T,T] scores again (quadratic memory)",
    ),
    Mutation(
        "mla-append-expands-capacity",
        "jaxllm/nn/mla.py",
        '        if self.impl == "auto":\n',
        '        if self.impl == "auto" and cache is None:\n',
        ("tests/nn/test_mla_memory.py::test_append_temporaries_flat_in_capacity",),
        "a cached append expands per-head K/V over the whole cache capacity again",
    ),
    # issue 17: MoE load balancing (aux-loss-free bias update, aux losses) and the one step builder
    Mutation(
        "moe-bias-update-sign-flipped",
        "jaxllm/nn/moe.py",
        "    step_E = rate * jnp.sign(jnp.mean(load_E) - load_E)\n",
        "    step_E = rate * jnp.sign(load_E - jnp.mean(load_E))\n",
        (
            "tests/nn/test_moe_balance.py::test_bias_moves_towards_the_mean_load_by_the_rate",
            "tests/train/test_step.py::test_bias_update_moves_each_bias_towards_the_mean_load_and_nothing_else",
            "tests/train/test_moe_balancing.py::test_bias_update_balances_a_skewed_router_and_off_stays_skewed",
        ),
        "over-loaded experts get a higher correction bias (the update drives collapse)",
    ),
    Mutation(
        "moe-bias-from-optimizer-output",
        "jaxllm/train/step.py",
        "        return update_correction_bias(old, loads[layer], rate)\n",
        "        return update_correction_bias(new, loads[layer], rate)\n",
        (
            "tests/train/test_step.py::test_bias_update_moves_each_bias_towards_the_mean_load_and_nothing_else",
        ),
        "the bias update starts from the optimizer's output (weight decay shrinks the bias)",
    ),
    Mutation(
        "moe-bias-not-checkpointed",
        "jaxllm/train/checkpoint.py",
        '                    "state": ocp.args.StandardSave(state),\n',
        '                    "state": ocp.args.StandardSave(jax.tree_util.tree_map_with_path(lambda p, x: x * 0 '
        'if "e_score_correction_bias" in jax.tree_util.keystr(p) else x, state)),\n',
        ("tests/train/test_resume.py::test_sigkill_then_resume_matches_uninterrupted[moe]",),
        "checkpoints hold zero correction biases: a resumed run loses the balancing state",
    ),
    Mutation(
        "nan-policy-update-applied",
        "jaxllm/train/step.py",
        '            "params": keep_finite(new_params, params),\n',
        '            "params": new_params,\n',
        (
            "tests/train/test_step.py::test_nonfinite_step_is_not_applied",
            "tests/train/test_autodeco_step.py::test_nonfinite_step_is_not_applied",
            "tests/agent/test_agent_train.py::test_one_rl_update_moves_logprobs_with_the_advantage_sign",
        ),
        "a non-finite step writes its NaN params into the state",
    ),
    Mutation(
        "nan-policy-sft-unchecked",
        "jaxllm/agent/train.py",
        "            check_finite(m, step, last_good=ck.latest_step(), directory=ck.directory)\n",
        "",
        ("tests/agent/test_agent_train_nan.py::test_sft_stops_at_the_first_nonfinite_step",),
        "agent SFT trains (and checkpoints) on after a non-finite step: the NaN policy in one loop only",
    ),
    Mutation(
        "kimi-moe-aux-losses-dropped",
        "jaxllm/models/kimi_linear.py",
        "        return ModelOutput(logits.astype(jnp.float32), hidden, new_cache, aux_losses)\n",
        "        return ModelOutput(logits.astype(jnp.float32), hidden, new_cache)\n",
        (
            "tests/train/test_step.py::test_kimi_moe_aux_losses_reach_the_objective",
            "tests/train/test_moe_metrics.py::test_metrics_jsonl_has_per_layer_load_and_named_aux_losses",
        ),
        "the MoE balance and router z losses never reach the objective",
    ),
    Mutation(
        "moe-load-sown-at-init",
        "jaxllm/nn/moe.py",
        "        if not self.is_initializing():  # counts are per call, never part of the variables\n",
        "        if True:\n",
        (
            "tests/train/test_step.py::test_bias_update_moves_each_bias_towards_the_mean_load_and_nothing_else",
        ),
        "init's routing counts land in the variables and are added to every step's counts",
    ),
    # issue 17 part 3: expert parallelism
    Mutation(
        "moe-ep-capacity-off-by-one",
        "jaxllm/nn/moe_parallel.py",
        "    keep = rank < cap\n",
        "    keep = rank <= cap\n",
        ("tests/nn/test_moe_parallel.py::test_pack_slots_and_drops",),
        "one assignment too many per device pair is kept: it overwrites the next device's first slot",
    ),
    Mutation(
        "moe-ep-no-return-trip",
        "jaxllm/nn/moe_parallel.py",
        "    back = jax.lax.all_to_all(y_r.astype(x_nD.dtype).reshape(ep, cap, D), EXPERT_AXIS, 0, 0)\n",
        "    back = y_r.astype(x_nD.dtype).reshape(ep, cap, D)\n",
        ("tests/nn/test_moe_parallel.py::test_expert_parallel_matches_dense",),
        "the experts' outputs stay on the expert's device instead of returning to the token's",
    ),
    Mutation(
        "moe-grouped-ffn-counts-empty-rows",
        "jaxllm/nn/moe.py",
        "        gs = jnp.bincount(e_or_end, length=E).astype(jnp.int32)",
        "        gs = jnp.bincount(e_R, length=E).astype(jnp.int32)",
        ("tests/nn/test_moe_parallel.py::test_grouped_ffn_empty_rows",),
        "empty receive slots (-1) counted into expert 0's group (jnp.bincount clips -1 to 0)",
    ),
    # issue 17, the rest: drop metrics, GPU block rule, tensor-split experts
    Mutation(
        "moe-drop-counts-not-reported",
        "jaxllm/train/step.py",
        "        DROPPED_COUNT + k: v.astype(jnp.float32) for k, v in sown_by_layer(load_tree, DROPPED_NAME).items()\n",
        "        DROPPED_COUNT + k: v.astype(jnp.float32) for k, v in {}.items()\n",
        (
            "tests/nn/test_moe_parallel.py::test_train_step_records_the_layers_drop_count",
            "tests/train/test_moe_metrics.py::test_metrics_jsonl_has_per_layer_load_and_named_aux_losses",
        ),
        "the layers' dropped assignments never reach metrics.jsonl",
    ),
    Mutation(
        "moe-dropped-count-not-a-fraction",
        "jaxllm/train/metrics.py",
        '            out[f"moe/{layer}/dropped"] = float(count) / max(assigned, 1.0)\n',
        '            out[f"moe/{layer}/dropped"] = float(count)\n',
        ("tests/nn/test_moe_parallel.py::test_train_step_records_the_layers_drop_count",),
        "the dropped metric is the raw count, not the fraction of the layer's assignments",
    ),
    Mutation(
        "moe-ep-drops-not-sown",
        "jaxllm/nn/moe.py",
        "            y, dropped = moe_parallel.expert_parallel_moe(\n",
        "            y, _ = moe_parallel.expert_parallel_moe(\n",
        ("tests/nn/test_moe_parallel.py::test_train_step_records_the_layers_drop_count",),
        "the expert-parallel layer reports 0 dropped whatever its capacity dropped",
    ),
    Mutation(
        "moe-gpu-blocks-whole-groups",
        "jaxllm/nn/moe.py",
        '_GPU_RULE = DispatchRule("blocked", block_divisor=4)\n',
        '_GPU_RULE = DispatchRule("blocked", block_divisor=1)\n',
        ("tests/nn/test_moe.py::test_block_rows_per_backend_meet_the_flop_target",),
        "GPU blocks as large as an expert's even share: 2x the ideal FLOPs at the 48B widths",
    ),
    Mutation(
        "moe-ep-tensor-duplicated",
        "jaxllm/nn/moe_parallel.py",
        "    inner = inner_axes(mesh, w1_EDF.shape[-1], rules)\n",
        "    inner = ()\n",
        ("tests/nn/test_moe_parallel.py::test_expert_parallel_matches_dense",),
        "every tensor shard runs the whole expert width on the same tokens (tp x the expert FLOPs)",
    ),
    Mutation(
        "moe-ep-tensor-partials-not-summed",
        "jaxllm/nn/moe_parallel.py",
        "    y_r = _sum_over(ffn(recv_x.reshape(ep * cap, D), recv_e, w1_lDF, w3_lDF, w2_lFD), inner)\n",
        "    y_r = ffn(recv_x.reshape(ep * cap, D), recv_e, w1_lDF, w3_lDF, w2_lFD)\n",
        ("tests/nn/test_moe_parallel.py::test_expert_parallel_matches_dense",),
        "each tensor shard returns its partial (1/tp of the width) expert output as the whole",
    ),
    Mutation(
        "moe-ragged-exchange-return-offsets",
        "jaxllm/nn/moe_parallel.py",
        "    back_off = tiled_a2a(in_off)  # where each source's rows for me started in its sorted order\n",
        "    back_off = in_off\n",
        ("tests/nn/test_moe_parallel.py::test_expert_parallel_matches_dense",),
        "the ragged return trip writes each source's outputs at the expert device's own offsets",
    ),
    # issue 14: the compiled rollout on any byte-string tokenizer
    Mutation(
        "rollout-scan-no-stop-ids",
        "jaxllm/agent/react_jnp.py",
        "    hit |= live_B & (tok_B[:, None] == tt.stop_ids[None]).any(-1)\n",
        "",
        (
            "tests/agent/test_agent_hf.py::test_stop_hit_finds_the_stops_of_cut_turn_ids",
            "tests/agent/test_agent_hf.py::test_scan_loop_equals_the_segmented_loop",
        ),
        "the scan loop ignores the tokenizer's stop ids (<|im_end|>, eos): turns run to the cap",
    ),
    Mutation(
        "rollout-scan-stop-at-token-end-only",
        "jaxllm/agent/react_jnp.py",
        "    ends_here_BW = jnp.arange(W)[None] < n_B[:, None]\n",
        "    ends_here_BW = jnp.arange(W)[None] == n_B[:, None] - 1\n",
        ("tests/agent/test_agent_hf.py::test_stop_hit_finds_the_stops_of_cut_turn_ids",),
        "a stop string that ends inside a multi-byte token is missed",
    ),
    Mutation(
        "rollout-scan-specials-add-text",
        "jaxllm/agent/react_jnp.py",
        "        if i >= tokenizer.vocab_size or (i in tokenizer.special_ids and i not in kept):\n",
        "        if i >= tokenizer.vocab_size:\n",
        ("tests/agent/test_agent_hf.py::test_stop_hit_finds_the_stops_of_cut_turn_ids",),
        "special ids add their text to the turn, though decoding drops them",
    ),
    # context parallelism (issue 16)
    Mutation(
        "kda-context-no-reset-at-span-boundary",
        "pallas_kernels/kda/context.py",
        "        s = jnp.where(reset[:, None, None, None], 0.0, s)\n",
        "",
        ("tests/kernels/test_kda_context.py::test_context_parallel_kda_matches_whole_sequence",),
        "a document starting on a span boundary inherits the previous span's state",
    ),
    Mutation(
        "kda-context-no-incoming-state",
        "pallas_kernels/kda/context.py",
        '    o = o0.astype(jnp.float32) + jnp.einsum("bthk,bhkv->bthv", c.astype(jnp.float32), mine)\n',
        "    o = o0.astype(jnp.float32)\n",
        ("tests/kernels/test_kda_context.py::test_context_parallel_kda_matches_whole_sequence",),
        "a span's outputs ignore the state carried in from earlier spans",
    ),
    Mutation(
        "kda-context-transition-not-chained",
        "pallas_kernels/kda/context.py",
        '        return jnp.einsum("bhkj,bhjv->bhkv", a, s) + b, s\n',
        "        return b, s\n",
        ("tests/kernels/test_kda_context.py::test_span_transition_is_the_affine_map_of_the_incoming_state",),
        "the state entering a span drops what came before the previous span (A ignored)",
    ),
    Mutation(
        "attention-span-queries-document-from-offset",
        "pallas_kernels/attention/common.py",
        "        q_pos = jnp.clip(offset[:, None] + jnp.arange(T, dtype=jnp.int32)[None], 0, S - 1)\n",
        "        q_pos = jnp.clip(jnp.arange(T, dtype=jnp.int32)[None] + 0 * offset[:, None], 0, S - 1)\n",
        ("tests/kernels/test_attention_context.py::test_span_queries_against_all_keys_match_self_attention",),
        "a span's queries take the documents of the sequence's first tokens, not their own",
    ),
    Mutation(
        "conv-context-halo-crosses-documents",
        "jaxllm/nn/conv.py",
        "        keep_BS = doc_BS[:, :-1] == doc_BS[:, -1:]\n",
        "        keep_BS = doc_BS[:, :-1] >= 0\n",
        ("tests/train/test_context_parallel.py",),
        "the short conv reads the previous span's tokens of another document",
    ),
    Mutation(
        "mla-context-no-query-offset",
        "jaxllm/nn/mla.py",
        "        offset = cp.span_offset(q.shape[1])\n",
        "        offset = 0 * cp.span_offset(q.shape[1])\n",
        (
            "tests/train/test_context_parallel.py::test_train_step_with_context_parallelism_matches_one_device",
        ),
        "MLA spans attend as if they were the sequence's start: later keys leak in",
    ),
    Mutation(
        "rollout-penalties-forget-history",
        "jaxllm/agent/rollout.py",
        "            count_R = count_R + active_R.astype(jnp.int32)\n",
        "",
        ("tests/agent/test_rollout.py::test_penalties_see_each_rows_assistant_tokens",),
        "the segmented loop's penalties never see the row's earlier tokens",
    ),
    Mutation(
        "rollout-penalties-skip-forced",
        "jaxllm/agent/rollout.py",
        "(r.tokens, (r.kind == KIND_MODEL) | (r.kind == KIND_FORCED))",
        "(r.tokens, r.kind == KIND_MODEL)",
        ("tests/agent/test_rollout.py::test_penalties_see_each_rows_assistant_tokens",),
        "the scan loop's penalties skip the forced tokens of assistant turns",
    ),
    Mutation(
        "rollout-rows-not-split",
        "jaxllm/decode.py",
        "    return jax.tree_util.tree_map(place, tree)\n",
        "    return tree\n",
        ("tests/agent/test_rollout.py::test_rows_split_over_the_data_axis_equal_one_device",),
        "rollouts given a mesh keep every row on one device",
    ),
    Mutation(
        "rollout-compact-wrong-rows",
        "jaxllm/agent/rollout.py",
        "        take = np.array(live + [live[0]] * (size - len(live)))  # fillers copy a live row's state\n",
        "        take = np.arange(size)\n",
        ("tests/agent/test_rollout.py::test_scan_rollout_equals_the_segmented_rollout",),
        "after finished rows leave the batch, rows are matched to the wrong cache slots",
    ),
    Mutation(
        "scan-compact-first-slots",
        "jaxllm/decode.py",
        "            idx_DN = jax.vmap(lambda m: jnp.nonzero(m, size=n, fill_value=per_block)[0])(live_DB)\n",
        "            idx_DN = jnp.broadcast_to(jnp.arange(n), (D, n))\n",
        ("tests/agent/test_rollout.py::test_scan_rollout_equals_the_segmented_rollout",),
        "the scan loop's smaller batch holds the first rows instead of the running ones",
    ),
    Mutation(
        "finished-rows-stay",
        "jaxllm/decode.py",
        "    return (batch, *reversed(smaller))\n",
        "    return (batch,)\n",
        (
            "tests/agent/test_rollout.py::test_scan_rollout_equals_the_segmented_rollout",
            "tests/test_engine.py::test_finished_rows_leave_the_batch",
        ),
        "finished rows stay in the batch of the scan rollout and of `complete` (every step costs them)",
    ),
    Mutation(
        "kda-short-append-chunk-op",
        "jaxllm/nn/kda_attention.py",
        '    if impl == "auto" and T <= SHORT_APPEND and resolve_impl(impl) == "chunk":\n',
        "    if False:\n",
        ("tests/nn/test_mla_memory.py::test_short_kda_append_within_twice_the_state_plus_weights",),
        "a short cached KDA append goes through the chunk op (padded to a whole chunk: 3.4x the memory)",
    ),
    Mutation(
        "moe-width-gathered-in-wrong-order",
        "jaxllm/nn/moe_parallel.py",
        "jax.lax.all_gather(w, axes, axis=dim, tiled=True)",
        "jax.lax.all_gather(w, axes[::-1], axis=dim, tiled=True)",
        ("tests/nn/test_moe_parallel.py::test_expert_parallel_matches_dense",),
        "expert weights split over fsdp x context are reassembled in the wrong order inside the expert-parallel body",
    ),
    Mutation(
        "gpu-ptxas-ignores-bv",
        "tools/gpu_ptxas.py",
        "    gpu.state_block_v = lambda *_: bv\n",
        "",
        ("tests/kernels/test_gpu_ptxas.py::test_ttir_of_every_kernel_is_captured",),
        "tools/gpu_ptxas.py reports the kernel's own V slice whatever --bv asks",
    ),
    Mutation(
        "gpu-grads-ieee-dots",
        "pallas_kernels/kda/gpu.py",
        "    return None if interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3\n",
        "    return None\n",
        ("tests/kernels/test_gpu_ptxas.py::test_ttir_of_every_kernel_is_captured",),
        "the GPU grads kernels go back to IEEE float32 dots under 'highest' (over an H200's shared memory at K = V = 128)",
    ),
    Mutation(
        "gpu-state-grads-swapped",
        "pallas_kernels/kda/gpu.py",
        ")(ch.flags, *_chunk_inputs(ch), dD, dA, dW, dqh, dkd)",
        ")(ch.flags, *_chunk_inputs(ch), dD, dA, dqh, dW, dkd)",
        ("tests/kernels/test_kda_pallas.py::TestKDAPallas::test_golden",),
        "the GPU grads kernel reads the state side's dW and do h^T in each other's place",
    ),
    Mutation(
        "op-counts-recompute-every-step",
        "tools/kda_op_counts.py",
        "round(r1[key] + (rs[key] - r1[key]) / state_stride, 3)",
        "round(rs[key], 3)",
        ("tests/kernels/test_kda_pallas.py::test_tpu_kernel_work_is_matmul_shaped",),
        "tools/kda_op_counts.py counts the TPU backward's group recompute at every chunk (107.6 MFLOP at stride 4, not 69.6)",
    ),
    Mutation(
        "kda-drops-state-stride",
        "pallas_kernels/kda/__init__.py",
        '            kwargs["state_stride"] = state_stride\n',
        "            pass\n",
        ("tests/kernels/test_kda_pallas.py::test_kda_passes_state_stride_to_the_tpu_kernel_only",),
        "kda(..., impl='pallas_tpu', state_stride=) silently runs the kernel's default stride",
    ),
    Mutation(
        "attention-lse-cotangent-dropped",
        "pallas_kernels/attention/blockwise.py",
        "axis=-1) - dlse  # [B,Tp,G,R]",
        "axis=-1)  # [B,Tp,G,R]",
        ("tests/kernels/test_attention_context.py::test_spans_of_keys_combine_by_their_lse",),
        "the blockwise backward ignores the lse cotangent: spans of keys combined by lse get wrong q/k gradients",
    ),
    Mutation(
        "tpu-attention-lse-cotangent-dropped",
        "pallas_kernels/attention/tpu.py",
        "keepdims=True) - dlse\n",
        "keepdims=True)\n",
        ("tests/kernels/test_attention_context.py::test_spans_of_keys_combine_by_their_lse",),
        "the Pallas TPU attention's backward ignores the lse cotangent: spans combined by lse get wrong q/k gradients",
    ),
    Mutation(
        "tpu-attention-lse-heads-transposed",
        "pallas_kernels/attention/tpu.py",
        "    lse = jnp.swapaxes(lse.reshape(B, G, Tp, R), 1, 2).reshape(B, Tp, H)\n",
        "    lse = lse.reshape(B, Tp, H)\n",
        ("tests/kernels/test_attention_context.py::test_lse_is_the_log_sum_exp_of_the_visible_scores",),
        "the Pallas TPU attention returns lse in its kernel layout (heads and tokens mixed up)",
    ),
    Mutation(
        "unseen-query-lse-zero",
        "pallas_kernels/attention/common.py",
        "m + jnp.log(jnp.where(seen, l, 1.0)), NEG)",
        "m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)",
        ("tests/kernels/test_attention_context.py::test_spans_of_keys_combine_by_their_lse",),
        "a query that sees no key of a span gets lse 0, so that span's zero output takes a share of its softmax",
    ),
    Mutation(
        "mla-span-keys-at-wrong-offset",
        "jaxllm/nn/mla.py",
        "            q_offset=q_offset - j * n,\n",
        "            q_offset=q_offset,\n",
        ("tests/nn/test_mla_blockwise.py::test_spanwise_expansion_equals_the_whole_sequence",),
        "context-parallel MLA places every span of keys at the sequence start (wrong causal mask)",
    ),
    Mutation(
        "run-mesh-ignores-context",
        "jaxllm/train/loop.py",
        "config.mesh_data, config.mesh_fsdp, config.mesh_tensor, config.mesh_expert, config.mesh_context",
        "config.mesh_data, config.mesh_fsdp, config.mesh_tensor, config.mesh_expert, 1",
        ("tests/train/test_context_parallel.py::test_cli_trains_a_32k_sequence_split_over_8_context_shards",),
        "jaxllm train drops mesh_context: no context parallelism from the command line",
    ),
    Mutation(
        "weights-replicated-over-context",
        "jaxllm/sharding.py",
        '    ("embed", ("fsdp", "context", "expert")),',
        '    ("embed", ("fsdp",)),',
        ("tests/test_sharding.py::test_activation_rules_split_the_sequence_over_context",),
        "weights and Adam moments are stored whole on every context (and expert) shard",
    ),
    Mutation(
        "indivisible-dim-fully-replicated",
        "jaxllm/sharding.py",
        "        while axes and dim % math.prod(mesh.shape[a] for a in axes):\n            axes.pop()\n",
        "        if axes and dim % math.prod(mesh.shape[a] for a in axes):\n            axes = []\n",
        ("tests/test_sharding.py::test_dim_splits_over_the_longest_dividing_prefix_of_its_axes",),
        "a dim that the product of its mesh axes does not divide is replicated instead of split over the axes that do",
    ),
    Mutation(
        "grads-promoted-to-f32",
        "jaxllm/train/step.py",
        "grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)",
        "grads = jax.tree.map(lambda g: g / denom, grads)",
        ("tests/train/test_step.py::test_step_keeps_the_state_types_under_bfloat16_params",),
        "bfloat16 gradients become float32 (double bytes; AdamW moments change type, the loop's compiled step refuses step 2)",
    ),
    Mutation(
        "rl-state-not-on-mesh",
        "jaxllm/train/loop.py",
        "    return jax.device_put(state, s.state_shardings)\n",
        "    return state\n",
        ("tests/agent/test_rollout.py::test_rows_split_over_the_data_axis_equal_one_device",),
        "the RL trainer's state stays on one device instead of the run's mesh",
    ),
    Mutation(
        "moe-exchange-config-not-threaded",
        "jaxllm/models/kimi_linear.py",
        "                expert_exchange=c.moe_expert_exchange,\n",
        "",
        ("tests/nn/test_moe_parallel.py::test_expert_exchange_config_reaches_every_moe_layer",),
        "the Kimi config's moe_expert_exchange never reaches the MoE blocks",
    ),
    # issue 16: the chunked LM head + cross-entropy (loss_chunk)
    Mutation(
        "chunked-loss-targets-not-strided",
        "jaxllm/train/step.py",
        "strided(targets_BT, ())",
        "jnp.moveaxis(targets_BT.reshape(B, n, chunk), 1, 0)",
        ("tests/train/test_step.py::test_chunked_loss_equals_full_logits_loss_and_gradients",),
        "the chunked loss pairs strided hidden states with contiguous targets (each token scored on another's label)",
    ),
    Mutation(
        "chunked-loss-mask-ignored",
        "jaxllm/train/step.py",
        "strided(mask_BT, ())",
        "strided(jnp.ones_like(mask_BT), ())",
        ("tests/train/test_step.py::test_chunked_loss_equals_full_logits_loss_and_gradients",),
        "the chunked loss counts masked tokens",
    ),
    Mutation(
        "loss-chunk-divisor-unchecked",
        "jaxllm/train/config.py",
        "(self.loss_chunk and self.seq_len % self.loss_chunk)",
        "False",
        ("tests/train/test_config.py::test_bad_values_name_field_and_allowed_values",),
        "a loss_chunk that does not divide seq_len is accepted and fails inside the jitted step",
    ),
    Mutation(
        "kda-tpu-recompute-wrong-offset",
        "pallas_kernels/kda/tpu.py",
        "state = jnp.where(i == 0, state, hbuf_ref[jnp.maximum(i - 1, 0), h])",
        "state = jnp.where(i == 0, state, hbuf_ref[jnp.maximum(i - 2, 0), h])",
        ("tests/kernels/test_kda_pallas.py::test_tpu_state_stride_varlen",),
        "the backward takes the recomputed state of the chunk before (one slot off in the group)",
    ),
    Mutation(
        "kda-tpu-recompute-ignores-restart",
        "pallas_kernels/kda/tpu.py",
        "state = jnp.where(restart, h0_buf[...], state)",
        "state = state",
        ("tests/kernels/test_kda_pallas.py::test_tpu_state_stride_varlen",),
        "a sequence starting inside a group is recomputed from the previous sequence's state, not its h0",
    ),
    Mutation(
        "kda-tpu-checkpoint-wrong-chunk",
        "pallas_kernels/kda/tpu.py",
        "@pl.when(lax.rem(c, stride) == 0)",
        "@pl.when(lax.rem(c, stride) == stride - 1)",
        ("tests/kernels/test_kda_pallas.py::test_tpu_state_stride_segment_ids",),
        "the forward saves the state entering a group's last chunk instead of its first",
    ),
    Mutation(
        "kda-tpu-saves-every-state",
        "pallas_kernels/kda/tpu.py",
        "(B, NC // stride, H, K, V), pm.matmul_dtype(precision)",
        "(B, NC, H, K, V), pm.matmul_dtype(precision)",
        ("tests/tpu/test_tpu_aot.py::test_kda_kernel_saved_states_at_kimi_shape",),
        "the saved states keep a slot per chunk again (4x the HBM); numerics cannot see it, the compiled "
        "temporaries can",
        needs="libtpu",
    ),
]


def tree_files(root: pathlib.Path) -> list[str]:
    out = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout
    return [p for p in out.decode().split("\0") if p and (root / p).is_file()]


def copy_tree(root: pathlib.Path, files: list[str], dest: pathlib.Path) -> None:
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def apply(m: Mutation, tree: pathlib.Path) -> None:
    path = tree / m.path
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        raise ValueError(f"{m.id}: the old text occurs {n} times in {m.path} (expected once)")
    path.write_text(text.replace(m.old, m.new))


def _case_id(case: ET.Element) -> str:
    """pytest node id of a junit testcase ("tests.x.test_y.Class" + name -> path::Class::name)."""
    parts = case.get("classname", "").split(".")
    for i in range(len(parts), 0, -1):  # the longest prefix that is a file
        if (ROOT / ("/".join(parts[:i]) + ".py")).is_file():
            return "::".join(["/".join(parts[:i]) + ".py"] + parts[i:] + [case.get("name", "")])
    return case.get("classname", "") + "::" + case.get("name", "")


def tree_env(tree: pathlib.Path) -> dict:
    """The environment that makes Python import the packages from `tree` (then from PYTHONPATH)."""
    return dict(
        os.environ,
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONPATH=os.pathsep.join([str(tree)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
    )


def run_tests(tree: pathlib.Path, tests, timeout: float) -> dict:
    """Run pytest on `tests` inside `tree`; returns {"rc", "cases": {node id: outcome}, "why", "tail"}."""
    junit = tree / ".mutation-junit.xml"
    env = tree_env(tree)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:xdist",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        *tests,
    ]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e)
    cases, why = {}, {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            kinds = {child.tag: child for child in case}
            bad = kinds.get("failure", kinds.get("error"))
            outcome = "failed" if bad is not None else "skipped" if "skipped" in kinds else "passed"
            cases[_case_id(case)] = outcome
            if bad is not None:
                why[_case_id(case)] = " ".join((bad.get("message") or "").split())
    return {"rc": rc, "cases": cases, "why": why, "tail": tail}


def _under(case: str, test: str) -> bool:
    """`case` is `test`, one of its parametrized cases, or a test of the module/class `test`."""
    return case == test or case.startswith((test + "[", test + "::"))


def outcomes_of(test: str, cases: dict) -> list[str]:
    return [v for k, v in cases.items() if _under(k, test)]


def verdict(m: Mutation, clean: dict, mutated: dict) -> str:
    clean_out = [o for t in m.tests for o in outcomes_of(t, clean["cases"])]
    if not clean_out or "failed" in clean_out:
        return "CLEAN RUN RED" if "failed" in clean_out else "ERROR (no test ran)"
    if all(o == "skipped" for o in clean_out):
        return "skipped here"
    mut_out = [o for t in m.tests for o in outcomes_of(t, mutated["cases"])]
    if "failed" in mut_out:
        return "killed"
    if not mut_out or mutated["rc"] not in (0, 1):
        return f"ERROR (pytest rc {mutated['rc']})"
    return "SURVIVED"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "-k",
        dest="select",
        action="append",
        default=[],
        help="only entries whose id or tests contain this text (repeatable: any of them)",
    )
    ap.add_argument("--list", action="store_true", help="print the entries and exit")
    ap.add_argument("--jobs", type=int, default=1, help="pytest runs at once (default 1)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies")
    args = ap.parse_args(argv)
    # Started in the background by a shell, this process would inherit SIGINT ignored and pass that
    # on to every test: the sandbox's supervisor would then shrug off the user code's SIGINT with or
    # without its own guard. A handler here is reset to the default in every child (exec).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    chosen = [
        m
        for m in MUTATIONS
        if not args.select or any(k in m.id or any(k in t for t in m.tests) for k in args.select)
    ]
    if args.list:
        for m in chosen:
            print(f"{m.id}: {m.path}: {m.what}\n    " + "\n    ".join(m.tests))
        return 0
    if not chosen:
        print(f"no mutation matches {args.select}")
        return 2

    t0 = time.time()
    work = pathlib.Path(tempfile.mkdtemp(prefix="jaxllm-mutation-"))
    try:
        files = tree_files(ROOT)
        base = work / "clean"
        copy_tree(ROOT, files, base)
        try:
            for m in chosen:  # every old text must still be there, once, before anything runs
                apply(m, _scratch(base, m, work))
        except ValueError as e:
            print(f"{e}; update the entry in {pathlib.Path(__file__).name}")
            return 2
        where = subprocess.run(
            [
                sys.executable,
                "-c",
                "import jaxllm, pallas_kernels; print(jaxllm.__file__, pallas_kernels.__file__)",
            ],
            cwd=base,
            capture_output=True,
            text=True,
            env=tree_env(base),
        ).stdout.split()
        if len(where) != 2 or not all(w.startswith(str(base)) for w in where):
            print(f"the copy imports the packages from {where}, not from {base}; aborting")
            return 2
        missing = {
            m.needs
            for m in chosen
            if m.needs
            and subprocess.run(
                [
                    sys.executable,
                    "-c",
                    f"import importlib.util, sys; sys.exit(importlib.util.find_spec({m.needs!r}) is None)",
                ],
                cwd=base,
                env=tree_env(base),
            ).returncode
        }
        tests = list(dict.fromkeys(t for m in chosen for t in m.tests))
        print(f"{len(chosen)} mutations, {len(tests)} tests; copies under {work}", flush=True)
        clean = run_tests(base, tests, args.timeout)
        print(f"clean run: pytest rc {clean['rc']}, {time.time() - t0:.0f} s", flush=True)

        def one(i_m):
            i, m = i_m
            if m.needs in missing:
                return m, None, 0.0
            tree = work / f"m{i:02d}"
            copy_tree(base, files, tree)  # the snapshot the clean run used, not the live checkout
            apply(m, tree)
            start = time.time()
            res = run_tests(tree, m.tests, args.timeout)
            if not args.keep:
                shutil.rmtree(tree, ignore_errors=True)
            return m, res, time.time() - start

        rows = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for m, res, secs in pool.map(one, enumerate(chosen)):
                if res is None:
                    res = {"rc": None, "cases": {}, "why": {}, "tail": ""}
                    v = f"skipped here (no {m.needs})"
                else:
                    v = verdict(m, clean, res)
                rows.append((m, v, secs, res))
                print(f"  {m.id}: {v} ({secs:.0f} s)", flush=True)
                if v != "killed" and not v.startswith("skipped here"):
                    print("    " + res["tail"].replace("\n", "\n    ")[-2000:])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    w, wv = max(len(m.id) for m, _, _, _ in rows), max(len(v) for _, v, _, _ in rows)
    pad = " " * (w + wv + 10)
    print(f"\n{'mutation':<{w}}  {'result':<{wv}} {'s':>5}  test / first failure")
    for m, v, secs, res in rows:
        print(f"{m.id:<{w}}  {v:<{wv}} {secs:5.0f}  " + f"\n{pad}".join(m.tests))
        first = next((msg for t, msg in res["why"].items() if any(_under(t, x) for x in m.tests)), "")
        if first:
            print(f"{pad}-> {first[:110]}")
    bad = [m.id for m, v, _, _ in rows if v != "killed" and not v.startswith("skipped here")]
    skipped = sum(v.startswith("skipped here") for _, v, _, _ in rows)
    print(
        f"\n{len(rows) - len(bad) - skipped} killed, {skipped} skipped here, {len(bad)} not killed"
        f"{': ' + ', '.join(bad) if bad else ''}; {time.time() - t0:.0f} s"
    )
    return 1 if bad else 0


def _scratch(base: pathlib.Path, m: Mutation, work: pathlib.Path) -> pathlib.Path:
    """A throwaway copy of the one file `m` changes, to check its old text before any test runs."""
    scratch = pathlib.Path(tempfile.mkdtemp(dir=work))
    (scratch / m.path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(base / m.path, scratch / m.path)
    return scratch


if __name__ == "__main__":
    sys.exit(main())
