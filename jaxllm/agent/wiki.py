"""An offline "simulated wiki": seeded fictional entities and relations rendered as pages, with
BM25 ``search`` and goal-focused ``visit``.

Everything is deterministic for a seed. Retrieval is written as pure ``jnp`` functions on fixed-
shape integer arrays (``bm25_topk``, ``visit_topk``), so a compiled rollout can run the
environment step inside ``lax.scan``; the Python tools (``SimulatedWiki.search`` / ``visit``) call
the very same jitted functions, so both paths rank identically by construction.

World: countries, cities, people, organisations and universities. Every relation is functional
(one object per subject), so a chain of relations from an entity has exactly one answer:

    person  --birthplace--> city --country--> country --capital--> city
    person  --employer--> organisation --founder--> person
    person  --alma mater--> university --home city--> city
    organisation --headquarters--> city

Pages hold one sentence per fact (subject side, plus a few inverse facts on the object's page) and
distractor sentences that mention other entities.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["WikiConfig", "Entity", "Page", "Relation", "RELATIONS", "ATTRIBUTES", "World",
           "generate_world", "SimulatedWiki", "terms", "bm25_weights", "bm25_topk",
           "visit_topk"]

_STOP = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the to was were "
    "which who whom whose with what where when did does do this these those".split())
_WORD = re.compile(r"[a-z0-9]+")


def terms(text: str) -> list[str]:
    """Lower-cased alphanumeric words without stop words (the wiki's term analyser)."""
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


# ------------------------------------------------------------------------------------------
# World generation
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class WikiConfig:
    seed: int = 0
    n_countries: int = 6
    n_cities: int = 24
    n_people: int = 60
    n_orgs: int = 20
    n_universities: int = 8
    n_distractors: int = 2      # distractor sentences per page
    search_top_k: int = 5       # results per search query
    visit_top_k: int = 3        # sentences per visited page

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"WikiConfig.{f.name} must be an int, got {v!r}")
            lo = 0 if f.name in ("seed", "n_distractors") else 1
            if v < lo:
                raise ValueError(f"WikiConfig.{f.name} must be >= {lo}, got {v}")
        if self.n_cities < self.n_countries:
            raise ValueError("WikiConfig.n_cities must be >= n_countries (every country needs a "
                             f"capital), got {self.n_cities} < {self.n_countries}")


@dataclasses.dataclass(frozen=True)
class Entity:
    id: int
    kind: str          # country | city | person | org | university
    name: str
    attrs: tuple       # ((key, value), ...) e.g. (("born", 1871), ("occupation", "chemist"))

    def attr(self, key):
        return dict(self.attrs)[key]

    @property
    def url(self) -> str:
        return "wiki://" + self.name.replace(" ", "_")


@dataclasses.dataclass(frozen=True)
class Relation:
    name: str
    subject: str       # kind
    object: str        # kind
    phrase: str        # noun phrase used in questions: "the {phrase} of X"
    fact: str          # sentence on the subject's page
    inverse: str | None = None  # sentence on the object's page


RELATIONS = {r.name: r for r in (
    Relation("birthplace", "person", "city", "birthplace", "{s} was born in {o}.",
             "{o} is the birthplace of {s}."),
    Relation("employer", "person", "org", "employer", "{s} works for {o}."),
    Relation("alma_mater", "person", "university", "alma mater", "{s} studied at {o}."),
    Relation("founder", "org", "person", "founder", "{s} was founded by {o}.",
             "{o} founded {s}."),
    Relation("headquarters", "org", "city", "headquarters city", "{s} is headquartered in {o}.",
             "{o} hosts the headquarters of {s}."),
    Relation("home_city", "university", "city", "home city", "{s} is located in {o}."),
    Relation("country", "city", "country", "country", "{s} is a city in the country of {o}."),
    Relation("capital", "country", "city", "capital", "The capital of {s} is {o}.",
             "{o} is the capital of {s}."),
)}

#: attribute -> (kind, question phrase, sentence template)
ATTRIBUTES = {
    "born": ("person", "birth year", "The birth year of {s} is {v}."),
    "occupation": ("person", "occupation", "The profession of {s} is {v}."),
    "founded": ("org", "founding year", "{s} was established in the year {v}."),
    "industry": ("org", "industry", "{s} operates in the {v} industry."),
    "established": ("university", "founding year", "{s} opened its doors in the year {v}."),
    "population": ("city", "population", "{s} has a population of {v}."),
    "currency": ("country", "currency", "The currency of {s} is the {v}."),
}

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gr", "kr", "tr", "st", "th", "sh", "ch", "vel", "mor", "tal", "quin", "hal"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "io", "ou", "ei"]
_CODAS = ["", "n", "r", "s", "l", "th", "m", "x", "nd", "rk"]
_OCCUPATIONS = ["chemist", "painter", "architect", "botanist", "cartographer", "composer",
                "engineer", "historian", "linguist", "astronomer", "sculptor", "surgeon"]
_INDUSTRIES = ["shipbuilding", "textile", "pharmaceutical", "aerospace", "publishing",
               "railway", "glassware", "software", "brewing", "mining"]
_CURRENCIES = ["crown", "mark", "florin", "talar", "dinar", "sol", "riel", "lira"]
_FILLER = [
    "{s} is often mentioned together with {o}.",
    "Travel writers have compared {s} with {o}.",
    "Archives about {s} are kept near {o}.",
    "A documentary about {s} also features {o}.",
]
_ADJ = ["quiet", "famous", "historic", "modern", "colourful", "windy", "renowned", "ancient"]
_NOUN = ["gardens", "bridges", "archives", "festivals", "libraries", "markets", "harbours"]
_FILLER_SOLO = ["{s} is featured in a guide to {a} {n}.",
                "A chapter on {a} {n} mentions {s}."]


@dataclasses.dataclass(frozen=True)
class World:
    config: WikiConfig
    entities: tuple          # Entity, index == id
    edges: dict              # (subject_id, relation_name) -> object_id

    def by_kind(self, kind: str) -> list[Entity]:
        return [e for e in self.entities if e.kind == kind]

    def follow(self, eid: int, rel: str) -> int:
        return self.edges[(eid, rel)]

    def relations_from(self, eid: int) -> list[str]:
        return [r for r in RELATIONS if (eid, r) in self.edges]


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(parts)).capitalize()


def generate_world(config: WikiConfig = WikiConfig()) -> World:
    """A seeded world; the same config always gives the same world."""
    rng = random.Random(config.seed)
    used: set[str] = set()

    def unique(make):
        for _ in range(1000):
            name = make()
            key = " ".join(terms(name))
            if name not in used and key and all(key != " ".join(terms(u)) for u in used):
                used.add(name)
                return name
        raise RuntimeError("generate_world: could not draw a unique name; use fewer entities")

    ents: list[Entity] = []

    def add(kind, name, **attrs):
        ents.append(Entity(len(ents), kind, name, tuple(sorted(attrs.items()))))
        return ents[-1].id

    countries = [add("country", unique(lambda: _word(rng, 2) + rng.choice(["ia", "land", "ora"])),
                     currency=rng.choice(_CURRENCIES)) for _ in range(config.n_countries)]
    cities = [add("city", unique(lambda: _word(rng, 2) + rng.choice(["", "burg", "ford", "mouth"])),
                  population=rng.randrange(5, 900) * 1000) for _ in range(config.n_cities)]
    unis = [add("university", unique(lambda: _word(rng, 2) + rng.choice(
        [" Institute", " College", " Academy"])), established=rng.randrange(1600, 1950))
        for _ in range(config.n_universities)]
    orgs = [add("org", unique(lambda: _word(rng, 2) + rng.choice(
        [" Works", " Company", " Holdings", " Guild"])), founded=rng.randrange(1800, 2000),
        industry=rng.choice(_INDUSTRIES)) for _ in range(config.n_orgs)]
    people = [add("person", unique(lambda: _word(rng, 1) + " " + _word(rng, 2)),
                  born=rng.randrange(1820, 1990), occupation=rng.choice(_OCCUPATIONS))
              for _ in range(config.n_people)]

    edges: dict = {}
    # every country gets a distinct capital, every city a country (capitals in their own)
    capitals = rng.sample(cities, len(countries))
    for c, cap in zip(countries, capitals):
        edges[(c, "capital")] = cap
        edges[(cap, "country")] = c
    for city in cities:
        if (city, "country") not in edges:
            edges[(city, "country")] = rng.choice(countries)
    for u in unis:
        edges[(u, "home_city")] = rng.choice(cities)
    for o in orgs:
        edges[(o, "headquarters")] = rng.choice(cities)
        edges[(o, "founder")] = rng.choice(people)
    for p in people:
        edges[(p, "birthplace")] = rng.choice(cities)
        edges[(p, "employer")] = rng.choice(orgs)
        edges[(p, "alma_mater")] = rng.choice(unis)
    return World(config, tuple(ents), edges)


# ------------------------------------------------------------------------------------------
# Pages
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Page:
    doc: int
    title: str
    url: str
    sentences: tuple

    @property
    def text(self) -> str:
        return " ".join(self.sentences)


def fact_sentence(world: World, eid: int, rel: str) -> str:
    r = RELATIONS[rel]
    return r.fact.format(s=world.entities[eid].name,
                         o=world.entities[world.edges[(eid, rel)]].name)


def attribute_sentence(world: World, eid: int, key: str) -> str:
    e = world.entities[eid]
    return ATTRIBUTES[key][2].format(s=e.name, v=e.attr(key))


def render_pages(world: World) -> list[Page]:
    """One page per entity: attribute facts, relation facts, inverse facts, distractors."""
    rng = random.Random(world.config.seed * 7919 + 17)
    body: list[list[str]] = [[] for _ in world.entities]
    for e in world.entities:
        kind_word = {"org": "organisation"}.get(e.kind, e.kind)
        article = "an" if kind_word == "organisation" else "a"
        body[e.id].append(f"{e.name} is {article} {kind_word}.")
        for key, _ in e.attrs:
            body[e.id].append(attribute_sentence(world, e.id, key))
    for (s, rel), o in sorted(world.edges.items()):
        r = RELATIONS[rel]
        body[s].append(fact_sentence(world, s, rel))
        if r.inverse:
            body[o].append(r.inverse.format(s=world.entities[s].name,
                                            o=world.entities[o].name))
    pages = []
    for e in world.entities:
        sents = body[e.id]
        for _ in range(world.config.n_distractors):
            if rng.random() < 0.5:
                other = world.entities[rng.randrange(len(world.entities))]
                sents.append(rng.choice(_FILLER).format(s=e.name, o=other.name))
            else:
                sents.append(rng.choice(_FILLER_SOLO).format(s=e.name, a=rng.choice(_ADJ),
                                                             n=rng.choice(_NOUN)))
        pages.append(Page(e.id, e.name, e.url, tuple(sents)))
    return pages


# ------------------------------------------------------------------------------------------
# Retrieval as pure jnp functions on fixed-shape arrays
# ------------------------------------------------------------------------------------------

def bm25_weights(tf_DV: np.ndarray, k1: float = 1.5, b: float = 0.75
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per (doc, term) BM25 weights and idf (Lucene's idf: log(1 + (N - df + .5)/(df + .5))).

    score(doc, query) = sum over query terms t (with multiplicity) of weights[doc, t].
    """
    tf = tf_DV.astype(np.float64)
    n_docs = tf.shape[0]
    df = (tf > 0).sum(0)
    idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))
    dl = tf.sum(1, keepdims=True)
    norm = k1 * (1.0 - b + b * dl / max(dl.mean(), 1e-9))
    w = idf[None, :] * tf * (k1 + 1.0) / (tf + norm)
    return w.astype(np.float32), idf.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("k",))
def bm25_topk(weights_DV, qterms_BQ, qmask_BQ, k: int):
    """Top-``k`` documents per query row: ``(doc_BK int32, score_BK float32)``.

    ``qterms_BQ`` are term ids (any value where ``qmask_BQ`` is False). Ties are broken by the
    lower document index (stable sort), so rankings are reproducible.
    """
    n_vocab = weights_DV.shape[1]
    q = jnp.where(qmask_BQ, qterms_BQ, 0)
    counts_BV = jax.vmap(lambda t, m: jnp.zeros((n_vocab,), jnp.float32).at[t].add(
        m.astype(jnp.float32)))(q, qmask_BQ)
    scores_BD = counts_BV @ weights_DV.T
    order_BD = jnp.argsort(-scores_BD, axis=-1, stable=True)[:, :k]
    return order_BD.astype(jnp.int32), jnp.take_along_axis(scores_BD, order_BD, axis=-1)


@functools.partial(jax.jit, static_argnames=("k",))
def visit_topk(sent_terms_DSL, sent_valid_DS, idf_V, doc_B, goal_terms_BG, goal_mask_BG, k: int):
    """The ``k`` sentences of page ``doc_B`` most relevant to a goal, in page order.

    A sentence scores the idf-weighted sum of the distinct goal terms it contains
    (``sent_terms_DSL`` holds each sentence's distinct term ids, -1 padded). Ties go to the
    earlier sentence; padded sentence slots never win over real ones. Returns
    ``(sent_BK int32 in increasing order, score_BK)``; slots past a page's length are -1.
    """
    n_vocab = idf_V.shape[0]
    g = jnp.where(goal_mask_BG, goal_terms_BG, 0)
    goal_BV = jax.vmap(lambda t, m: jnp.zeros((n_vocab,), jnp.float32).at[t].max(
        m.astype(jnp.float32)))(g, goal_mask_BG)
    sent_SL = sent_terms_DSL[doc_B]                            # [B, S, L]
    valid_BS = sent_valid_DS[doc_B]
    ok = sent_SL >= 0
    t = jnp.where(ok, sent_SL, 0)
    hit = jnp.take_along_axis(goal_BV[:, None, :], t.reshape(t.shape[0], 1, -1), axis=-1)
    hit = hit.reshape(t.shape) * ok * idf_V[t]
    score_BS = jnp.where(valid_BS, hit.sum(-1), -1.0)
    order = jnp.argsort(-score_BS, axis=-1, stable=True)[:, :k]
    top_valid = jnp.take_along_axis(valid_BS, order, axis=-1)
    order = jnp.where(top_valid, order, jnp.iinfo(jnp.int32).max)
    order = jnp.sort(order, axis=-1)
    score = jnp.take_along_axis(score_BS, jnp.clip(order, 0, score_BS.shape[1] - 1), axis=-1)
    valid = order != jnp.iinfo(jnp.int32).max
    return jnp.where(valid, order, -1).astype(jnp.int32), jnp.where(valid, score, 0.0)


# ------------------------------------------------------------------------------------------
# The environment
# ------------------------------------------------------------------------------------------

class SimulatedWiki:
    """World + pages + BM25 index; ``search``/``visit`` return observation text.

    Arrays for a compiled environment step: ``weights_DV`` (BM25), ``idf_V``,
    ``sent_terms_DSL`` / ``sent_valid_DS`` (each page's sentences as distinct term ids), and
    ``vocab`` (term -> id); ``encode(text, length)`` turns text into padded term ids.
    """

    def __init__(self, config: WikiConfig = WikiConfig()):
        self.config = config
        self.world = generate_world(config)
        self.pages = render_pages(self.world)
        self.url_to_doc = {p.url: p.doc for p in self.pages}
        vocab: dict[str, int] = {}
        for p in self.pages:
            for w in terms(p.title + " " + p.text):
                vocab.setdefault(w, len(vocab))
        self.vocab = vocab
        tf = np.zeros((len(self.pages), len(vocab)), np.int32)
        for p in self.pages:
            for w in terms(p.title + " " + p.text):
                tf[p.doc, vocab[w]] += 1
        self.weights_DV, self.idf_V = bm25_weights(tf)
        max_s = max(len(p.sentences) for p in self.pages)
        sent_sets = [[sorted({vocab[w] for w in terms(s)}) for s in p.sentences]
                     for p in self.pages]
        max_l = max(len(t) for page in sent_sets for t in page)
        self.sent_terms_DSL = np.full((len(self.pages), max_s, max_l), -1, np.int32)
        self.sent_valid_DS = np.zeros((len(self.pages), max_s), bool)
        for d, page in enumerate(sent_sets):
            for s, ids in enumerate(page):
                self.sent_terms_DSL[d, s, :len(ids)] = ids
                self.sent_valid_DS[d, s] = True

    # -- term ids ---------------------------------------------------------------------------
    def encode(self, text: str, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Known terms of ``text`` as ids, padded/cut to ``length`` (unknown words dropped)."""
        ids = [self.vocab[w] for w in terms(text) if w in self.vocab]
        if length is None:  # bucket lengths so jitted retrieval compiles once per bucket
            length = 16 * max(1, -(-len(ids) // 16))
        ids = ids[:length]
        out = np.zeros((length,), np.int32)
        mask = np.zeros((length,), bool)
        out[:len(ids)] = ids
        mask[:len(ids)] = True
        return out, mask

    # -- ranking ----------------------------------------------------------------------------
    def rank(self, query: str, k: int | None = None) -> list[tuple[int, float]]:
        """``(doc, score)`` of the top-k pages for a query; pages scoring 0 are left out."""
        k = min(k or self.config.search_top_k, len(self.pages))
        ids, mask = self.encode(query)
        docs, scores = bm25_topk(self.weights_DV, ids[None], mask[None], k=k)
        return [(int(d), float(s)) for d, s in zip(np.asarray(docs[0]), np.asarray(scores[0]))
                if s > 0]

    def relevant_sentences(self, doc: int, goal: str, k: int | None = None) -> list[int]:
        k = min(k or self.config.visit_top_k, self.sent_valid_DS.shape[1])
        ids, mask = self.encode(goal)
        sents, _ = visit_topk(self.sent_terms_DSL, self.sent_valid_DS, self.idf_V,
                              np.asarray([doc], np.int32), ids[None], mask[None], k=k)
        return [int(s) for s in np.asarray(sents[0]) if s >= 0]

    # -- tools ------------------------------------------------------------------------------
    def _snippet(self, doc: int, query: str) -> str:
        return self.pages[doc].sentences[self.relevant_sentences(doc, query, k=1)[0]]

    def search(self, queries: list[str]) -> str:
        """Observation for ``search(query=[...])``: per query, titles, URLs and best snippet."""
        blocks = []
        for q in queries:
            hits = self.rank(q)
            if not hits:
                blocks.append(f"No results for '{q}'.")
                continue
            lines = [f"Results for '{q}' ({len(hits)}):"]
            for i, (d, _) in enumerate(hits, 1):
                p = self.pages[d]
                lines.append(f"{i}. [{p.title}]({p.url})\n   {self._snippet(d, q)}")
            blocks.append("\n".join(lines))
        return "\n=======\n".join(blocks)

    def visit(self, urls, goal: str) -> str:
        """Observation for ``visit(url=..., goal=...)``: the goal-relevant sentences per page."""
        if isinstance(urls, str):
            urls = [urls]
        blocks = []
        for url in urls:
            doc = self.url_to_doc.get(url)
            if doc is None:
                blocks.append(f"The page {url} could not be found.")
                continue
            p = self.pages[doc]
            sents = [p.sentences[i] for i in self.relevant_sentences(doc, goal)]
            blocks.append(f"From {p.url} ({p.title}), for the goal '{goal}':\n"
                          + "\n".join(f"- {s}" for s in sents))
        return "\n=======\n".join(blocks)

    def backends(self) -> dict:
        """``tools.ToolExecutor`` backends for ``search`` and ``visit``."""
        return {"search": lambda args, code: self.search(args["query"]),
                "visit": lambda args, code: self.visit(args["url"], args["goal"])}
