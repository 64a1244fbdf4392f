"""Run by tests/agent/test_rollout.py in a subprocess with 4 virtual CPU devices: both rollout
loops with their rows split over a mesh's data axis equal the same rollouts on one device."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402
from rollout_testing import assert_same, tiny_model  # noqa: E402

from jaxllm.agent import rollout as R  # noqa: E402
from jaxllm.agent import synth  # noqa: E402
from jaxllm.agent.wiki import SimulatedWiki, WikiConfig  # noqa: E402
from jaxllm.data.tokenizers import ByteTokenizer  # noqa: E402
from jaxllm.ops.sampling import SamplingConfig  # noqa: E402


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


if __name__ == "__main__":
    sys.exit(main())
