"""Data synthesis on the simulated wiki: k-hop questions with exact answers, optional obfuscation
of the anchor entity, and demonstration trajectories that solve them with real tool calls.

The report's automated pipeline at toy scale: questions are random walks over the entity graph
(every relation is functional, so the answer is unique); "uncertainty injection" replaces the
anchor's name by attributes that single it out; a scripted solver then answers the question by
calling ``search``/``visit`` on the same environment the policy will use, reading each fact out of
the actual observation. A question whose facts the solver cannot find in the observations is
rejected (rejection sampling), so every exported trajectory is consistent with its environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from typing import Iterator

from jaxllm.agent import protocol, tools
from jaxllm.agent.wiki import (
    ATTRIBUTES,
    RELATIONS,
    SimulatedWiki,
    WikiConfig,
    World,
    attribute_sentence,
    fact_sentence,
)

__all__ = [
    "Question",
    "sample_question",
    "describe_anchor",
    "demonstrate",
    "synthesize",
    "write_jsonl",
    "read_jsonl",
    "wiki_executor",
    "SYNTH_DATE",
]

SYNTH_DATE = "2025-01-01"  # fixed so synthesized system prompts are reproducible

#: search query / visit goal per relation and attribute ({x}: the subject's name)
_GOALS = {
    "birthplace": "where {x} was born",
    "employer": "who {x} works for",
    "alma_mater": "where {x} studied",
    "founder": "who founded {x}",
    "headquarters": "where {x} is headquartered",
    "home_city": "where {x} is located",
    "country": "the country of {x}",
    "capital": "the capital of {x}",
    "born": "the birth year of {x}",
    "occupation": "the profession of {x}",
    "founded": "the year {x} was established",
    "industry": "the industry of {x}",
    "established": "the year {x} opened its doors",
    "population": "the population of {x}",
    "currency": "the currency of {x}",
}
#: attributes that can single out an anchor, per kind, with the words used to describe them
_DESCRIBE = {
    "person": (("occupation", "whose profession is {v}"), ("born", "whose birth year is {v}")),
    "org": (("industry", "in the {v} industry"), ("founded", "established in the year {v}")),
    "university": (("established", "that opened its doors in the year {v}"),),
    "city": (("population", "with a population of {v}"),),
    "country": (("currency", "whose currency is the {v}"),),
}
_KIND_NOUN = {
    "person": "person",
    "org": "organisation",
    "university": "university",
    "city": "city",
    "country": "country",
}


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    answer: str
    hops: int
    anchor: int  # entity id
    relations: tuple  # relation names followed from the anchor
    attribute: str | None  # final attribute asked for, if any
    anchor_text: str  # how the question names the anchor
    obfuscated: bool


def describe_anchor(world: World, eid: int) -> str | None:
    """A description by attributes that matches ``eid`` and no other entity, or None."""
    e = world.entities[eid]
    spec = _DESCRIBE.get(e.kind, ())
    if not spec:
        return None
    same = [o for o in world.entities if o.kind == e.kind]
    for n in range(1, len(spec) + 1):
        keys = spec[:n]
        match = [o for o in same if all(o.attr(k) == e.attr(k) for k, _ in keys)]
        if len(match) == 1:
            clauses = " and ".join(t.format(v=e.attr(k)) for k, t in keys)
            return f"the {_KIND_NOUN[e.kind]} {clauses}"
    return None


def sample_question(
    world: World, rng: random.Random, hops: int, obfuscate: bool = False, attribute_prob: float = 0.3
) -> Question | None:
    """A ``hops``-step question by a random walk (no entity visited twice); None if the walk or
    the obfuscation fails (callers resample)."""
    if hops < 1:
        raise ValueError(f"sample_question: hops must be >= 1, got {hops}")
    anchor = rng.randrange(len(world.entities))
    want_attr = rng.random() < attribute_prob
    n_rel = hops - 1 if want_attr else hops
    path, cur, seen = [], anchor, {anchor}
    for _ in range(n_rel):
        options = [r for r in world.relations_from(cur) if world.follow(cur, r) not in seen]
        if not options:
            return None
        rel = rng.choice(options)
        cur = world.follow(cur, rel)
        seen.add(cur)
        path.append(rel)
    attr = None
    if want_attr:
        keys = [k for k, _ in world.entities[cur].attrs]
        attr = rng.choice(keys)
    anchor_text = world.entities[anchor].name
    if obfuscate:
        desc = describe_anchor(world, anchor)
        if desc is None:
            return None
        anchor_text = desc
    phrase = anchor_text
    for rel in path:
        phrase = f"the {RELATIONS[rel].phrase} of {phrase}"
    if attr:
        phrase = f"the {ATTRIBUTES[attr][1]} of {phrase}"
        answer = str(world.entities[cur].attr(attr))
    else:
        answer = world.entities[cur].name
    return Question(
        question=f"What is {phrase}?",
        answer=answer,
        hops=hops,
        anchor=anchor,
        relations=tuple(path),
        attribute=attr,
        anchor_text=anchor_text,
        obfuscated=obfuscate,
    )


def wiki_executor(wiki: SimulatedWiki) -> tools.ToolExecutor:
    return tools.ToolExecutor(wiki.backends())


class _Unsolvable(Exception):
    pass


class _Recorder:
    """Builds the message list while executing each call for real."""

    def __init__(self, executor: tools.ToolExecutor, question: str, system_prompt: str):
        self.executor = executor
        self.messages = protocol.initial_messages(question, system_prompt)

    def call(self, think: str, name: str, arguments: dict) -> str:
        text = protocol.render_assistant(think, protocol.ToolCall(name, arguments))
        obs = self.executor.step(text)
        if obs.error:
            raise _Unsolvable(obs.text)
        self.messages.append({"role": "assistant", "content": text})
        self.messages.append({"role": "user", "content": protocol.wrap_tool_response(obs.text)})
        return obs.text

    def answer(self, think: str, answer: str) -> None:
        self.messages.append(
            {"role": "assistant", "content": protocol.render_assistant(think, protocol.Answer(answer))}
        )


def _lookup(rec: _Recorder, wiki: SimulatedWiki, subject: int, key: str, sentence: str, lead: str) -> str:
    """Find ``sentence`` about ``subject``: search first; visit the page if the snippet lacks it.
    Returns the think-text explaining where it was found."""
    name = wiki.world.entities[subject].name
    goal = _GOALS[key].format(x=name)
    obs = rec.call(f"{lead}I need {goal}. Let me search for it.", "search", {"query": [goal]})
    if sentence in obs:
        return f'The search results state: "{sentence}"'
    url = wiki.world.entities[subject].url
    if f"({url})" not in obs:
        raise _Unsolvable(f"{url} not among the results for {goal!r}")
    obs = rec.call(
        f"The results list the page of {name} ({url}) but the snippet does not say "
        f"{goal}. I will open that page.",
        "visit",
        {"url": [url], "goal": goal},
    )
    if sentence not in obs:
        raise _Unsolvable(f"fact {sentence!r} not in the visit observation")
    return f'The page of {name} says: "{sentence}"'


def demonstrate(
    wiki: SimulatedWiki,
    q: Question,
    system_prompt: str | None = None,
    executor: tools.ToolExecutor | None = None,
) -> list[dict] | None:
    """A trajectory (chat messages) that answers ``q`` using the wiki tools, or None if the
    scripted solver cannot find a fact in the observations."""
    executor = executor or wiki_executor(wiki)
    if system_prompt is None:
        system_prompt = protocol.build_system_prompt(executor.tool_specs(), date=SYNTH_DATE)
    rec = _Recorder(executor, q.question, system_prompt)
    world = wiki.world
    anchor = world.entities[q.anchor]
    try:
        lead = f"The question asks: {q.question} "
        if q.obfuscated:
            obs = rec.call(
                f"{lead}First I must identify {q.anchor_text}. I will search with those attributes.",
                "search",
                {"query": [q.anchor_text]},
            )
            if f"({anchor.url})" not in obs:
                raise _Unsolvable("anchor not among the search results")
            keys = [k for k, _ in _DESCRIBE[anchor.kind]]
            goal = " and ".join(_GOALS[k].format(x=anchor.name) for k in keys)
            obs = rec.call(
                f"{anchor.name} ({anchor.url}) is a candidate. I will check its page "
                "against the description.",
                "visit",
                {"url": [anchor.url], "goal": goal},
            )
            facts = [attribute_sentence(world, q.anchor, k) for k in keys]
            if describe_anchor(world, q.anchor) is None or not all(f in obs for f in facts):
                raise _Unsolvable("anchor attributes not confirmed by the visit")
            lead = f"The page confirms {'; '.join(facts)} So {q.anchor_text} is {anchor.name}. "
        cur = q.anchor
        for rel in q.relations:
            nxt = world.follow(cur, rel)
            found = _lookup(rec, wiki, cur, rel, fact_sentence(world, cur, rel), lead)
            lead = (
                f"{found} So the {RELATIONS[rel].phrase} of {world.entities[cur].name} is "
                f"{world.entities[nxt].name}. "
            )
            cur = nxt
        if q.attribute:
            found = _lookup(rec, wiki, cur, q.attribute, attribute_sentence(world, cur, q.attribute), lead)
            lead = f"{found} "
        rec.answer(f"{lead}Therefore the answer is {q.answer}.", q.answer)
    except _Unsolvable:
        return None
    return rec.messages


def synthesize(
    n: int,
    seed: int = 0,
    hops: tuple = (1, 2, 3),
    obfuscate_prob: float = 0.3,
    wiki: SimulatedWiki | None = None,
    system_prompt: str | None = None,
    max_tries_per_item: int = 50,
    exclude=(),
) -> list[dict]:
    """``n`` records ``{question, answer, hops, trajectory, anchor, obfuscated, seed,
    wiki_seed}``.

    Deterministic for (``n``, ``seed``, ``hops``, ``obfuscate_prob``, wiki config, ``exclude``);
    the default wiki is ``SimulatedWiki(WikiConfig(seed=seed))``. Questions are distinct and not
    in ``exclude`` (e.g. a training set's questions, to draw a disjoint held-out set on the same
    world with another ``seed``).
    """
    if n < 0:
        raise ValueError(f"synthesize: n must be >= 0, got {n}")
    if not hops or any(not isinstance(h, int) or h < 1 for h in hops):
        raise ValueError(f"synthesize: hops must be positive ints, got {hops!r}")
    if not 0.0 <= obfuscate_prob <= 1.0:
        raise ValueError(f"synthesize: obfuscate_prob must be in [0, 1], got {obfuscate_prob}")
    wiki = wiki or SimulatedWiki(WikiConfig(seed=seed))
    executor = wiki_executor(wiki)
    rng = random.Random(seed * 1_000_003 + 7)
    out, seen = [], set(exclude)
    for _ in range(n):
        for _ in range(max_tries_per_item):
            h = rng.choice(hops)
            q = sample_question(wiki.world, rng, h, obfuscate=rng.random() < obfuscate_prob)
            if q is None or q.question in seen:
                continue
            traj = demonstrate(wiki, q, system_prompt, executor)
            if traj is None:
                continue
            seen.add(q.question)
            out.append(
                {
                    "question": q.question,
                    "answer": q.answer,
                    "hops": q.hops,
                    "trajectory": traj,
                    "anchor": wiki.world.entities[q.anchor].name,
                    "obfuscated": q.obfuscated,
                    "seed": seed,
                    "wiki_seed": wiki.config.seed,
                }
            )
            break
        else:
            raise RuntimeError(
                f"synthesize: no solvable question after {max_tries_per_item} "
                f"tries (hops={hops}); the wiki may be too small"
            )
    return out


def synthesize_worlds(
    n: int,
    worlds: int,
    seed: int = 0,
    wiki_seed: int | None = None,
    wiki_fields: dict | None = None,
    **kwargs,
) -> list[dict]:
    """``n`` records spread over ``worlds`` worlds with consecutive seeds ``wiki_seed``,
    ``wiki_seed + 1``, ... (default ``wiki_seed = seed``): world w gets ``n // worlds`` questions
    (the first ``n % worlds`` worlds one more), drawn by ``synthesize`` with sampler seed
    ``seed + w``. Every record carries its own ``wiki_seed``.

    Training on many worlds stops a small model from memorising one world's names: the only way
    to fit the demonstrations is to copy names from the question and the observations.
    ``wiki_fields`` are the other ``WikiConfig`` fields, shared by all worlds; ``kwargs`` go to
    ``synthesize`` (``hops``, ``obfuscate_prob``, ``system_prompt``, ``exclude``).
    """
    if worlds < 1:
        raise ValueError(f"synthesize_worlds: worlds must be >= 1, got {worlds}")
    wiki_fields = dict(wiki_fields or {})
    if "seed" in wiki_fields:
        raise ValueError("synthesize_worlds: wiki_fields must not hold 'seed'; use wiki_seed")
    base = seed if wiki_seed is None else wiki_seed
    out = []
    for w in range(worlds):
        n_w = n // worlds + (w < n % worlds)
        wiki = SimulatedWiki(WikiConfig(seed=base + w, **wiki_fields))
        out += synthesize(n_w, seed=seed + w, wiki=wiki, **kwargs)
    return out


def write_jsonl(records, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None


def main(argv=None) -> int:
    """``python -m jaxllm.agent.synth --out F --n N --seed S``: write synthesized JSONL.

    ``--wiki-seed W`` (default: S) picks the world (``--worlds N``: worlds W .. W+N-1);
    ``--exclude F2`` skips the questions of an existing JSONL, so ``--seed 1 --wiki-seed 0
    --exclude train.jsonl`` draws a disjoint held-out set on the training world.
    """
    ap = argparse.ArgumentParser(prog="jaxllm.agent.synth", description=main.__doc__)
    ap.add_argument("--out", required=True, help="output JSONL path")
    ap.add_argument("--n", type=int, required=True, help="number of questions")
    ap.add_argument("--seed", type=int, default=0, help="seed of the wiki and the sampler")
    ap.add_argument("--hops", type=int, nargs="+", default=[1, 2, 3], help="hop counts to draw")
    ap.add_argument("--obfuscate-prob", type=float, default=0.3)
    ap.add_argument("--wiki-seed", type=int, default=None, help="seed of the world (default: --seed)")
    ap.add_argument("--exclude", default=None, help="JSONL whose questions must not be drawn")
    ap.add_argument(
        "--worlds", type=int, default=1, help="spread the questions over this many worlds (seeds W, W+1, ...)"
    )
    args = ap.parse_args(argv)
    wiki_seed = args.seed if args.wiki_seed is None else args.wiki_seed
    exclude = {r["question"] for r in read_jsonl(args.exclude)} if args.exclude else set()
    records = synthesize_worlds(
        args.n,
        args.worlds,
        seed=args.seed,
        wiki_seed=wiki_seed,
        hops=tuple(args.hops),
        obfuscate_prob=args.obfuscate_prob,
        exclude=exclude,
    )
    write_jsonl(records, args.out)
    print(json.dumps({"out": args.out, "n": len(records), "seed": args.seed, "wiki_seed": wiki_seed}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
