import json
import random

import pytest

from jaxllm.agent import protocol as P
from jaxllm.agent import synth, tools
from jaxllm.agent.wiki import ATTRIBUTES, RELATIONS, SimulatedWiki, WikiConfig


@pytest.fixture(scope="module")
def wk():
    return SimulatedWiki(WikiConfig(seed=5))


@pytest.fixture(scope="module")
def records(wk):
    return synth.synthesize(24, seed=5, hops=(1, 2, 3), obfuscate_prob=0.5, wiki=wk)


def _answer_by_walk(wk, q):
    """Follow the question's relations in the graph independently of the trajectory."""
    cur = q.anchor
    for rel in q.relations:
        cur = wk.world.edges[(cur, rel)]
    e = wk.world.entities[cur]
    return str(e.attr(q.attribute)) if q.attribute else e.name


def _answer_by_reading(wk, question):
    """Answer the question from its text alone: peel "the <phrase> of " off the front, look up the
    anchor by name, then follow the phrases innermost first (how an English reader nests them)."""
    assert question.startswith("What is ") and question.endswith("?")
    rest, phrases = question[len("What is ") : -1], []
    known = {r.phrase for r in RELATIONS.values()} | {a[1] for a in ATTRIBUTES.values()}
    while True:
        head = next((p for p in known if rest.startswith(f"the {p} of ")), None)
        if head is None:
            break
        phrases.append(head)
        rest = rest[len(f"the {head} of ") :]
    anchors = [e for e in wk.world.entities if e.name == rest]
    assert len(anchors) == 1, f"anchor {rest!r} not found in {question!r}"
    cur = anchors[0]
    for i, phrase in enumerate(reversed(phrases)):
        rels = [r for r in RELATIONS.values() if r.phrase == phrase and r.subject == cur.kind]
        if not rels and i == len(phrases) - 1:  # the outermost phrase may be an attribute
            attrs = [k for k, a in ATTRIBUTES.items() if a[1] == phrase and a[0] == cur.kind]
            assert len(attrs) == 1, f"{cur.name} ({cur.kind}) has no {phrase!r} in {question!r}"
            return str(cur.attr(attrs[0]))
        assert len(rels) == 1 and (cur.id, rels[0].name) in wk.world.edges, (
            f"{cur.name} ({cur.kind}) has no {phrase!r} in {question!r}"
        )
        cur = wk.world.entities[wk.world.follow(cur.id, rels[0].name)]
    return cur.name


def test_sampled_questions_have_the_graph_answer(wk):
    rng = random.Random(0)
    n = multi = 0
    for _ in range(300):
        q = synth.sample_question(wk.world, rng, rng.choice([1, 2, 3, 4]))
        if q is None:
            continue
        n += 1
        multi += q.hops > 1
        assert q.answer == _answer_by_walk(wk, q)
        # the text, read as English, must lead to the same answer through the graph
        assert q.answer == _answer_by_reading(wk, q.question), q.question
        assert q.hops == len(q.relations) + (q.attribute is not None)
    assert n > 200 and multi > 100


def test_obfuscated_anchor_is_described_uniquely_and_not_named(wk):
    rng = random.Random(1)
    seen = 0
    for _ in range(300):
        q = synth.sample_question(wk.world, rng, 2, obfuscate=True)
        if q is None:
            continue
        seen += 1
        anchor = wk.world.entities[q.anchor]
        assert anchor.name not in q.question and q.anchor_text in q.question
        same_kind = [e for e in wk.world.entities if e.kind == anchor.kind]
        matches = [e for e in same_kind if synth.describe_anchor(wk.world, e.id) == q.anchor_text]
        assert matches == [anchor]
    assert seen > 50


def test_synthesis_is_deterministic_and_distinct(wk, records):
    again = synth.synthesize(24, seed=5, hops=(1, 2, 3), obfuscate_prob=0.5, wiki=wk)
    assert again == records
    assert len({r["question"] for r in records}) == len(records)
    other = synth.synthesize(24, seed=6, hops=(1, 2, 3), obfuscate_prob=0.5, wiki=wk)
    assert [r["question"] for r in other] != [r["question"] for r in records]
    assert {r["hops"] for r in records} == {1, 2, 3}
    assert any(r["obfuscated"] for r in records) and not all(r["obfuscated"] for r in records)


def test_trajectories_follow_the_protocol_and_end_with_the_answer(records):
    for r in records:
        traj = r["trajectory"]
        assert traj[0]["role"] == "system" and traj[1] == {"role": "user", "content": r["question"]}
        steps = P.split_turns(traj)
        for action, _ in steps[:-1]:
            assert isinstance(action, P.ToolCall) and tools.validate_call(action) == []
        final = steps[-1][0]
        assert isinstance(final, P.Answer) and final.text == r["answer"]
        assert P.parse_chat(P.render_chat(traj)) == traj
        assert len(steps) - 1 >= r["hops"]  # at least one call per hop


def test_trajectories_replay_identically_against_the_environment(wk, records):
    ex = tools.ToolExecutor(wk.backends())
    for r in records:
        traj = r["trajectory"]
        for i in range(2, len(traj) - 1, 2):
            obs = ex.step(traj[i]["content"])
            assert not obs.error
            assert P.wrap_tool_response(obs.text) == traj[i + 1]["content"]


def test_answer_appears_in_an_observation_before_it_is_given(records):
    for r in records:
        obs = " ".join(m["content"] for m in r["trajectory"][2:] if m["role"] == "user")
        assert r["answer"] in obs


def test_jsonl_export_round_trips(records, tmp_path):
    path = tmp_path / "synth.jsonl"
    synth.write_jsonl(records, str(path))
    back = list(synth.read_jsonl(str(path)))
    assert back == records
    for line in path.read_text().splitlines():
        assert {"question", "answer", "hops", "trajectory"} <= set(json.loads(line))


def test_argument_validation():
    with pytest.raises(ValueError, match="hops must be positive"):
        synth.synthesize(1, hops=(0,))
    with pytest.raises(ValueError, match="obfuscate_prob"):
        synth.synthesize(1, obfuscate_prob=2.0)
    with pytest.raises(ValueError, match="hops must be >= 1"):
        synth.sample_question(SimulatedWiki(WikiConfig(seed=0)).world, random.Random(0), 0)


def test_module_entry_point_writes_jsonl(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert synth.main(["--out", str(out), "--n", "3", "--seed", "2"]) == 0
    rows = list(synth.read_jsonl(str(out)))
    assert len(rows) == 3 and rows == synth.synthesize(3, seed=2)
    assert json.loads(capsys.readouterr().out)["n"] == 3


def test_held_out_set_on_the_same_world_is_disjoint(wk, records, tmp_path):
    train = tmp_path / "train.jsonl"
    synth.write_jsonl(records, str(train))
    out = tmp_path / "test.jsonl"
    assert (
        synth.main(
            ["--out", str(out), "--n", "20", "--seed", "9", "--wiki-seed", "5", "--exclude", str(train)]
        )
        == 0
    )
    test = list(synth.read_jsonl(str(out)))
    assert len(test) == 20 and all(r["wiki_seed"] == 5 for r in test)
    assert not {r["question"] for r in test} & {r["question"] for r in records}
    # same world: the held-out trajectories replay against the training wiki
    ex = tools.ToolExecutor(wk.backends())
    for r in test[:5]:
        traj = r["trajectory"]
        for i in range(2, len(traj) - 1, 2):
            assert P.wrap_tool_response(ex.step(traj[i]["content"]).text) == traj[i + 1]["content"]


def test_records_spread_over_several_worlds():
    fields = {"search_top_k": 1, "n_distractors": 1, "n_people": 20}
    recs = synth.synthesize_worlds(
        7, 3, seed=4, wiki_seed=10, wiki_fields=fields, hops=(1, 2), obfuscate_prob=0.0
    )
    assert [r["wiki_seed"] for r in recs] == [10, 10, 10, 11, 11, 12, 12]
    assert (
        synth.synthesize_worlds(
            7, 3, seed=4, wiki_seed=10, wiki_fields=fields, hops=(1, 2), obfuscate_prob=0.0
        )
        == recs
    )
    # each world's records are synthesize's on that world (sampler seed + w), replayable there
    for w, n in ((0, 3), (1, 2), (2, 2)):
        wiki = SimulatedWiki(WikiConfig(seed=10 + w, **fields))
        mine = [r for r in recs if r["wiki_seed"] == 10 + w]
        assert mine == synth.synthesize(n, seed=4 + w, wiki=wiki, hops=(1, 2), obfuscate_prob=0.0)
    # different worlds have different people: the names a model must copy differ
    assert len({r["anchor"] for r in recs}) > 3
    assert synth.synthesize_worlds(5, 1, seed=2) == synth.synthesize(5, seed=2)
    with pytest.raises(ValueError, match="worlds must be >= 1"):
        synth.synthesize_worlds(2, 0)
    with pytest.raises(ValueError, match="must not hold 'seed'"):
        synth.synthesize_worlds(2, 2, wiki_fields={"seed": 3})


def test_module_entry_point_spreads_over_worlds(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert synth.main(["--out", str(out), "--n", "4", "--seed", "2", "--worlds", "2"]) == 0
    rows = list(synth.read_jsonl(str(out)))
    assert rows == json.loads(json.dumps(synth.synthesize_worlds(4, 2, seed=2)))
    assert [r["wiki_seed"] for r in rows] == [2, 2, 3, 3]
