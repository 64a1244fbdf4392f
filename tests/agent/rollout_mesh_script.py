"""Run by tests/agent/test_rollout.py in a subprocess with 4 virtual CPU devices: both rollout
loops with their rows split over a mesh's data axis equal the same rollouts on one device, and the
RL update of those rollouts on a data=2 x fsdp=2 mesh (params sharded by the rules) equals it on
one device."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402
from rollout_testing import assert_same, tiny_model  # noqa: E402

from jaxllm import sharding as shd  # noqa: E402
from jaxllm.agent import rollout as R  # noqa: E402
from jaxllm.agent import synth  # noqa: E402
from jaxllm.agent import train as T  # noqa: E402
from jaxllm.agent.wiki import SimulatedWiki, WikiConfig  # noqa: E402
from jaxllm.data.tokenizers import ByteTokenizer  # noqa: E402
from jaxllm.ops.sampling import SamplingConfig  # noqa: E402
from jaxllm.train import loop as train_loop  # noqa: E402
from jaxllm.train.config import RunConfig  # noqa: E402


def main():
    tok = ByteTokenizer()
    model, params = tiny_model(tok.vocab_size)
    wiki = SimulatedWiki(WikiConfig(seed=0))
    qs = ["Where was Ada born?", "Who founded it?", "Capital?", "x"]
    forced = [["<think>\nab"], [], ["<think>\n"], []]
    kw = dict(
        config=R.RolloutConfig(max_turns=2, turn_tokens=24, token_budget=800, chunk=32),
        system_prompt="Answer with tools.",
        forced_turns=forced,
        sampling=SamplingConfig(temperature=1.0),
        rng=jax.random.key(5),
    )
    mesh = jax.make_mesh((4,), ("data",))
    report = {}
    one = R.segmented_rollout(model, params, tok, synth.wiki_executor(wiki), qs, **kw)
    assert one.row_sharding is None
    for name, loop in (("segmented", R.segmented_rollout), ("scan", R.scan_rollout)):
        # the loops equal each other on one device (test_rollout.py): compare both to one of them
        split = loop(model, params, tok, synth.wiki_executor(wiki), qs, mesh=mesh, **kw)
        assert_same(one, split, name)
        sh = split.row_sharding
        report[name] = {
            "spec": str(sh.spec),
            "devices": len(sh.device_set),
            "row_block": list(sh.shard_shape((len(qs), 8))),
            "model_tokens": int(one.model_mask.sum()),
        }
        assert sh.spec == PartitionSpec("data") and len(sh.device_set) == 4, (name, sh)
    report["rl"] = rl_update_on_mesh_equals_one_device(model, params, one)
    try:
        R.segmented_rollout(
            model,
            params,
            tok,
            synth.wiki_executor(wiki),
            qs[:3],
            mesh=mesh,
            **dict(kw, forced_turns=forced[:3]),
        )
        raise AssertionError("3 rows on a data axis of 4 were accepted")
    except ValueError as e:
        report["error"] = str(e)
    print(json.dumps(report))


def rl_update_on_mesh_equals_one_device(model, params, result):
    """One RL update of ``result`` (advantages set by hand: the random model answers nothing) on
    data=2 x fsdp=2 == on one device: loss, gradient norm and every updated parameter."""
    b = T.rl_batch(result, ["-"] * 4, 2, length_multiple=64)
    mask = result.model_mask[:, : b["tokens"].shape[1]].astype(np.int32)  # every row, limits hit or not
    batch = {
        "tokens": b["tokens"],
        "mask": mask,
        "old_logp": b["old_logp"],
        "adv": np.array([1.0, -1.0, 0.5, -0.5], np.float32),
    }
    config = RunConfig(
        tokenizer="byte", seq_len=64, lr=1e-2, warmup_steps=0, steps=1, mesh_data=2, mesh_fsdp=2
    )
    out = {}
    for name, mesh in (("mesh", None), ("one", shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1]))):
        s = T.rl_setup(config, model, 4, mesh=mesh)
        step = jax.jit(T.make_rl_step(model.apply, s.tx, s.schedule))
        with jax.set_mesh(s.mesh):
            state, m = step(train_loop.state_from_params(s, params, 0), T.rows_on_mesh(s.mesh, batch))
        placed = [x.sharding for x in jax.tree.leaves(state["params"])]
        out[name] = (jax.device_get(m), jax.device_get(state["params"]), placed)
    (m4, p4, sh4), (m1, p1, _) = out["mesh"], out["one"]
    assert abs(float(m4["loss"])) > 1e-4, m4
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    # Adam's first update is ~lr x sign(grad) per parameter: within 1% of one update (1e-3)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-5), p4, p1)
    sharded = sum(not x.is_fully_replicated for x in sh4)  # the updated params live on the mesh
    assert sharded > 0, "no parameter is sharded on the mesh"
    return {"loss": float(m4["loss"]), "sharded_params": sharded}


if __name__ == "__main__":
    sys.exit(main())
