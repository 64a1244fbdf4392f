"""An offline "simulated wiki": seeded fictional entities and relations rendered as pages, with
BM25 ``search`` and goal-focused ``visit``.

Everything is deterministic for a seed. The environment step is written as pure ``jnp``
functions on fixed-shape integer arrays: ``bm25_topk`` / ``visit_topk`` rank pages and sentences,
and ``search_step`` / ``visit_step`` turn term ids of a call's queries (or URLs and goal) into the
observation as a row of *piece ids* from a finite inventory (headers, rank numbers, titles,
sentences). The Python tools (``SimulatedWiki.search`` / ``visit``) run the very same jitted step
and join the pieces, so a compiled rollout inside ``lax.scan`` that gathers pre-tokenised pieces
reproduces the Python observations exactly.

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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "WikiConfig",
    "Entity",
    "Page",
    "Relation",
    "RELATIONS",
    "ATTRIBUTES",
    "World",
    "generate_world",
    "SimulatedWiki",
    "terms",
    "bm25_weights",
    "bm25_topk",
    "visit_topk",
    "WikiArrays",
    "PieceLayout",
    "search_step",
    "visit_step",
    "match_titles",
    "term_hashes",
    "bytes_to_terms",
    "WikiTool",
]

_STOP = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the to was were "
    "which who whom whose with what where when did does do this these those".split()
)
_WORD = re.compile(r"[a-z0-9]+")


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def terms(text: str) -> list[str]:
    """Words of ASCII letters and digits, lower-cased, without stop words (the wiki's analyser).

    Only ASCII is lower-cased and every other character separates words, so the byte-level jnp
    analyser (``bytes_to_terms``) gives exactly the same terms for any UTF-8 text.
    """
    return [w for w in _WORD.findall(text.translate(_ASCII_LOWER)) if w not in _STOP]


_HASH_P = (16777619, 2654435761)  # two odd multipliers; words are hashed twice (64 bits)


def term_hashes(words) -> np.ndarray:
    """``[2, len(words)]`` uint32 polynomial hashes ``sum_i byte_i * P**i mod 2**32``."""
    out = np.zeros((2, len(words)), np.uint32)
    for j, w in enumerate(words):
        for k, p in enumerate(_HASH_P):
            h, pw = 0, 1
            for ch in w.encode("ascii"):
                h = (h + ch * pw) % 2**32
                pw = (pw * p) % 2**32
            out[k, j] = h
    return out


@functools.partial(jax.jit, static_argnames=("max_terms",))
def bytes_to_terms(term_hashes_2V, bytes_L, mask_L, max_terms: int):
    """The jnp twin of ``SimulatedWiki.encode`` for UTF-8 bytes (e.g. byte-tokenizer ids - 3).

    Splits ``bytes_L`` (``mask_L`` marks real bytes) into ASCII alphanumeric words, lower-cases
    them, hashes each word twice and looks it up among the vocabulary's hashes. Returns
    ``(terms, mask)`` of shape ``[max_terms]``: the known terms in order of appearance (stop words
    and unknown words dropped), padded with 0 / False. vmap it for batches.
    """
    n = bytes_L.shape[0]
    c = jnp.where(mask_L, bytes_L, 32).astype(jnp.int32)
    c = jnp.where((c >= 65) & (c <= 90), c + 32, c)
    alnum = ((c >= 48) & (c <= 57)) | ((c >= 97) & (c <= 122))
    prev = jnp.concatenate([jnp.zeros((1,), bool), alnum[:-1]])
    start = alnum & ~prev
    word = jnp.cumsum(start) - 1
    idx = jnp.arange(n)
    pos = idx - jax.lax.cummax(jnp.where(start, idx, 0))
    seg = jnp.where(alnum, word, n)
    hashes = []
    for p in _HASH_P:
        pw = jnp.cumprod(jnp.full((n,), p, jnp.uint32).at[0].set(1))  # P**i mod 2**32
        contrib = jnp.where(alnum, c.astype(jnp.uint32) * pw[pos], 0).astype(jnp.uint32)
        hashes.append(jax.ops.segment_sum(contrib, seg, num_segments=n + 1)[:n])
    eq = (hashes[0][:, None] == term_hashes_2V[0][None, :]) & (
        hashes[1][:, None] == term_hashes_2V[1][None, :]
    )
    is_word = jnp.arange(n) < start.sum()
    found = eq.any(-1) & is_word
    term = jnp.where(found, jnp.argmax(eq, -1), -1)
    order = jnp.argsort(~found, stable=True)[:max_terms]
    ok = found[order]
    return jnp.where(ok, term[order], 0).astype(jnp.int32), ok


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
    n_distractors: int = 2  # distractor sentences per page
    search_top_k: int = 5  # results per search query
    visit_top_k: int = 3  # sentences per visited page
    max_queries: int = 4  # queries run per search call
    max_urls: int = 4  # pages opened per visit call
    snippets: bool = True  # search results show each page's most relevant sentence

    def __post_init__(self):
        if not isinstance(self.snippets, bool):
            raise ValueError(f"WikiConfig.snippets must be a bool, got {self.snippets!r}")
        for f in dataclasses.fields(self):
            if f.name == "snippets":
                continue
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"WikiConfig.{f.name} must be an int, got {v!r}")
            lo = 0 if f.name in ("seed", "n_distractors") else 1
            if v < lo:
                raise ValueError(f"WikiConfig.{f.name} must be >= {lo}, got {v}")
        if self.n_cities < self.n_countries:
            raise ValueError(
                "WikiConfig.n_cities must be >= n_countries (every country needs a "
                f"capital), got {self.n_cities} < {self.n_countries}"
            )


@dataclasses.dataclass(frozen=True)
class Entity:
    id: int
    kind: str  # country | city | person | org | university
    name: str
    attrs: tuple  # ((key, value), ...) e.g. (("born", 1871), ("occupation", "chemist"))

    def attr(self, key):
        return dict(self.attrs)[key]

    @property
    def url(self) -> str:
        return "wiki://" + self.name.replace(" ", "_")


@dataclasses.dataclass(frozen=True)
class Relation:
    name: str
    subject: str  # kind
    object: str  # kind
    phrase: str  # noun phrase used in questions: "the {phrase} of X"
    fact: str  # sentence on the subject's page
    inverse: str | None = None  # sentence on the object's page


RELATIONS = {
    r.name: r
    for r in (
        Relation(
            "birthplace",
            "person",
            "city",
            "birthplace",
            "{s} was born in {o}.",
            "{o} is the birthplace of {s}.",
        ),
        Relation("employer", "person", "org", "employer", "{s} works for {o}."),
        Relation("alma_mater", "person", "university", "alma mater", "{s} studied at {o}."),
        Relation("founder", "org", "person", "founder", "{s} was founded by {o}.", "{o} founded {s}."),
        Relation(
            "headquarters",
            "org",
            "city",
            "headquarters city",
            "{s} is headquartered in {o}.",
            "{o} hosts the headquarters of {s}.",
        ),
        Relation("home_city", "university", "city", "home city", "{s} is located in {o}."),
        Relation("country", "city", "country", "country", "{s} is a city in the country of {o}."),
        Relation(
            "capital",
            "country",
            "city",
            "capital",
            "The capital of {s} is {o}.",
            "{o} is the capital of {s}.",
        ),
    )
}

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

_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "tr",
    "st",
    "th",
    "sh",
    "ch",
    "vel",
    "mor",
    "tal",
    "quin",
    "hal",
]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "io", "ou", "ei"]
_CODAS = ["", "n", "r", "s", "l", "th", "m", "x", "nd", "rk"]
_OCCUPATIONS = [
    "chemist",
    "painter",
    "architect",
    "botanist",
    "cartographer",
    "composer",
    "engineer",
    "historian",
    "linguist",
    "astronomer",
    "sculptor",
    "surgeon",
]
_INDUSTRIES = [
    "shipbuilding",
    "textile",
    "pharmaceutical",
    "aerospace",
    "publishing",
    "railway",
    "glassware",
    "software",
    "brewing",
    "mining",
]
_CURRENCIES = ["crown", "mark", "florin", "talar", "dinar", "sol", "riel", "lira"]
_FILLER = [
    "{s} is often mentioned together with {o}.",
    "Travel writers have compared {s} with {o}.",
    "Archives about {s} are kept near {o}.",
    "A documentary about {s} also features {o}.",
]
_ADJ = ["quiet", "famous", "historic", "modern", "colourful", "windy", "renowned", "ancient"]
_NOUN = ["gardens", "bridges", "archives", "festivals", "libraries", "markets", "harbours"]
_FILLER_SOLO = ["{s} is featured in a guide to {a} {n}.", "A chapter on {a} {n} mentions {s}."]


@dataclasses.dataclass(frozen=True)
class World:
    config: WikiConfig
    entities: tuple  # Entity, index == id
    edges: dict  # (subject_id, relation_name) -> object_id

    def by_kind(self, kind: str) -> list[Entity]:
        return [e for e in self.entities if e.kind == kind]

    def follow(self, eid: int, rel: str) -> int:
        return self.edges[(eid, rel)]

    def relations_from(self, eid: int) -> list[str]:
        return [r for r in RELATIONS if (eid, r) in self.edges]


def _word(rng: random.Random, parts: int) -> str:
    return "".join(
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(parts)
    ).capitalize()


def generate_world(config: WikiConfig = WikiConfig()) -> World:
    """A seeded world; the same config always gives the same world."""
    rng = random.Random(config.seed)
    used: set[str] = set()

    def unique(make):
        for _ in range(1000):
            name = make()
            key = frozenset(terms(name))  # visit resolves URLs by this set: keep it unique
            if name not in used and key and all(key != frozenset(terms(u)) for u in used):
                used.add(name)
                return name
        raise RuntimeError("generate_world: could not draw a unique name; use fewer entities")

    ents: list[Entity] = []

    def add(kind, name, **attrs):
        ents.append(Entity(len(ents), kind, name, tuple(sorted(attrs.items()))))
        return ents[-1].id

    countries = [
        add(
            "country",
            unique(lambda: _word(rng, 2) + rng.choice(["ia", "land", "ora"])),
            currency=rng.choice(_CURRENCIES),
        )
        for _ in range(config.n_countries)
    ]
    cities = [
        add(
            "city",
            unique(lambda: _word(rng, 2) + rng.choice(["", "burg", "ford", "mouth"])),
            population=rng.randrange(5, 900) * 1000,
        )
        for _ in range(config.n_cities)
    ]
    unis = [
        add(
            "university",
            unique(lambda: _word(rng, 2) + rng.choice([" Institute", " College", " Academy"])),
            established=rng.randrange(1600, 1950),
        )
        for _ in range(config.n_universities)
    ]
    orgs = [
        add(
            "org",
            unique(lambda: _word(rng, 2) + rng.choice([" Works", " Company", " Holdings", " Guild"])),
            founded=rng.randrange(1800, 2000),
            industry=rng.choice(_INDUSTRIES),
        )
        for _ in range(config.n_orgs)
    ]
    people = [
        add(
            "person",
            unique(lambda: _word(rng, 1) + " " + _word(rng, 2)),
            born=rng.randrange(1820, 1990),
            occupation=rng.choice(_OCCUPATIONS),
        )
        for _ in range(config.n_people)
    ]

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
    return r.fact.format(s=world.entities[eid].name, o=world.entities[world.edges[(eid, rel)]].name)


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
            body[o].append(r.inverse.format(s=world.entities[s].name, o=world.entities[o].name))
    pages = []
    for e in world.entities:
        sents = body[e.id]
        for _ in range(world.config.n_distractors):
            if rng.random() < 0.5:
                other = world.entities[rng.randrange(len(world.entities) - 1)]
                if other.id >= e.id:  # any entity but this one
                    other = world.entities[other.id + 1]
                sents.append(rng.choice(_FILLER).format(s=e.name, o=other.name))
            else:
                sents.append(
                    rng.choice(_FILLER_SOLO).format(s=e.name, a=rng.choice(_ADJ), n=rng.choice(_NOUN))
                )
        pages.append(Page(e.id, e.name, e.url, tuple(sents)))
    return pages


# ------------------------------------------------------------------------------------------
# Retrieval as pure jnp functions on fixed-shape arrays
# ------------------------------------------------------------------------------------------


def bm25_weights(tf_DV: np.ndarray, k1: float = 1.5, b: float = 0.75) -> tuple[np.ndarray, np.ndarray]:
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
    counts_BV = jax.vmap(lambda t, m: jnp.zeros((n_vocab,), jnp.float32).at[t].add(m.astype(jnp.float32)))(
        q, qmask_BQ
    )
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
    goal_BV = jax.vmap(lambda t, m: jnp.zeros((n_vocab,), jnp.float32).at[t].max(m.astype(jnp.float32)))(
        g, goal_mask_BG
    )
    sent_SL = sent_terms_DSL[doc_B]  # [B, S, L]
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


class WikiArrays(NamedTuple):
    """Device arrays of a wiki for the jnp environment step."""

    weights_DV: jax.Array  # BM25 weight per (page, term)
    idf_V: jax.Array
    sent_terms_DSL: jax.Array  # distinct term ids of each sentence, -1 padded
    sent_valid_DS: jax.Array
    title_terms_DT: jax.Array  # sorted distinct term ids of each title, padded with V


@dataclasses.dataclass(frozen=True)
class PieceLayout:
    """Ids of the observation pieces (static, hashable: a jit static argument).

    0 query separator, 1 newline, 2 snippet indent, 3 bullet, 4 page not found, 5 "only the
    first N queries", 6 "only the first N URLs", then per query slot a header and a no-results
    line, per rank a number, per page a search title line and a visit header, and per
    (page, sentence slot) the sentence.
    """

    n_docs: int
    max_sents: int
    top_k: int
    visit_k: int
    max_queries: int
    max_urls: int
    snippets: bool = True

    SEP, NL, INDENT, BULLET, NOT_FOUND, MORE_QUERIES, MORE_URLS = range(7)

    @property
    def header(self):
        return 7

    @property
    def no_results(self):
        return self.header + self.max_queries

    @property
    def rank(self):
        return self.no_results + self.max_queries

    @property
    def title(self):
        return self.rank + self.top_k

    @property
    def visit_head(self):
        return self.title + self.n_docs

    @property
    def sentence(self):
        return self.visit_head + self.n_docs

    @property
    def size(self):
        return self.sentence + self.n_docs * self.max_sents

    @property
    def search_len(self):
        return self.max_queries * (2 + 5 * self.top_k) + 1

    @property
    def visit_len(self):
        return self.max_urls * (2 + 2 * self.visit_k) + 1

    def pieces(self, pages) -> list[str]:
        out = [
            "\n=======\n",
            "\n",
            "\n   ",
            "\n- ",
            "The page could not be found.",
            f"\n=======\n(Only the first {self.max_queries} queries were run.)",
            f"\n=======\n(Only the first {self.max_urls} pages were opened.)",
        ]
        out += [f"Results for query {q + 1}:" for q in range(self.max_queries)]
        out += [f"No results for query {q + 1}." for q in range(self.max_queries)]
        out += [f"{r + 1}. " for r in range(self.top_k)]
        out += [f"[{p.title}]({p.url})" for p in pages]
        out += [f"From [{p.title}]({p.url}):" for p in pages]
        for p in pages:
            out += list(p.sentences) + [""] * (self.max_sents - len(p.sentences))
        assert len(out) == self.size
        return out


def _compact(ids):
    """Move the -1 entries of a 1-D id row to its end, keeping the order of the rest."""
    return ids[jnp.argsort(ids < 0, stable=True)]


@functools.partial(jax.jit, static_argnames=("n_vocab",))
def match_titles(title_terms_DT, url_terms_UL, url_mask_UL, n_vocab: int):
    """The page each URL names (its set of known terms equals a title's), or -1.

    ``title_terms_DT`` holds sorted distinct term ids padded with ``n_vocab``.
    """
    n_vocab_pad = n_vocab
    t = title_terms_DT.shape[1]
    ids = jnp.sort(jnp.where(url_mask_UL, url_terms_UL, n_vocab_pad), axis=-1)
    dup = jnp.concatenate([jnp.zeros_like(ids[:, :1], bool), ids[:, 1:] == ids[:, :-1]], -1)
    ids = jnp.sort(jnp.where(dup, n_vocab_pad, ids), axis=-1)
    n_distinct = (ids < n_vocab_pad).sum(-1)
    if ids.shape[1] < t:
        ids = jnp.pad(ids, ((0, 0), (0, t - ids.shape[1])), constant_values=n_vocab_pad)
    match_UD = (ids[:, None, :t] == title_terms_DT[None]).all(-1)
    match_UD &= ((n_distinct <= t) & (n_distinct > 0))[:, None]
    return jnp.where(match_UD.any(-1), jnp.argmax(match_UD, -1), -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("layout",))
def search_step(arrays: WikiArrays, qterms_QL, qmask_QL, qvalid_Q, more, *, layout: PieceLayout):
    """Piece ids ``[layout.search_len]`` (-1 padded at the end) of one ``search`` call.

    Rows of ``qterms_QL`` are the call's queries (``qvalid_Q`` marks the real ones, at most
    ``layout.max_queries``); ``more`` says more queries were asked than were run. vmap over a
    batch of calls for a batched rollout.
    """
    lay = layout
    k = lay.top_k
    docs_QK, scores_QK = bm25_topk(arrays.weights_DV, qterms_QL, qmask_QL, k=k)
    nq, nl = qterms_QL.shape
    snip, _ = visit_topk(
        arrays.sent_terms_DSL,
        arrays.sent_valid_DS,
        arrays.idf_V,
        docs_QK.reshape(-1),
        jnp.repeat(qterms_QL, k, axis=0),
        jnp.repeat(qmask_QL, k, axis=0),
        k=1,
    )
    snip_QK = snip.reshape(nq, k)
    hit_QK = (scores_QK > 0) & qvalid_Q[:, None]
    q_idx = jnp.arange(nq)
    r_idx = jnp.arange(k)
    hits = jnp.stack(
        [
            jnp.full((nq, k), lay.NL),
            jnp.broadcast_to(lay.rank + r_idx, (nq, k)),
            lay.title + docs_QK,
            jnp.full((nq, k), lay.INDENT),
            lay.sentence + docs_QK * lay.max_sents + snip_QK,
        ],
        -1,
    )  # [Q, K, 5]
    if not lay.snippets:
        hits = hits.at[..., 3:].set(-1)
    hits = jnp.where(hit_QK[..., None], hits, -1).reshape(nq, 5 * k)
    any_hit = hit_QK.any(-1)
    sep = jnp.where((q_idx > 0) & qvalid_Q, lay.SEP, -1)
    head = jnp.where(any_hit, lay.header + q_idx, lay.no_results + q_idx)
    head = jnp.where(qvalid_Q, head, -1)
    block = jnp.concatenate([sep[:, None], head[:, None], hits], -1).reshape(-1)
    ids = jnp.concatenate([block, jnp.where(more, lay.MORE_QUERIES, -1)[None]])
    return _compact(ids.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("layout",))
def visit_step(
    arrays: WikiArrays,
    url_terms_UL,
    url_mask_UL,
    uvalid_U,
    goal_terms_G,
    goal_mask_G,
    more,
    *,
    layout: PieceLayout,
):
    """Piece ids ``[layout.visit_len]`` (-1 padded at the end) of one ``visit`` call."""
    lay = layout
    nu = url_terms_UL.shape[0]
    doc_U = match_titles(arrays.title_terms_DT, url_terms_UL, url_mask_UL, n_vocab=arrays.idf_V.shape[0])
    found = (doc_U >= 0) & uvalid_U
    sents_UK, _ = visit_topk(
        arrays.sent_terms_DSL,
        arrays.sent_valid_DS,
        arrays.idf_V,
        jnp.maximum(doc_U, 0),
        jnp.broadcast_to(goal_terms_G, (nu,) + goal_terms_G.shape),
        jnp.broadcast_to(goal_mask_G, (nu,) + goal_mask_G.shape),
        k=lay.visit_k,
    )
    ok_UK = (sents_UK >= 0) & found[:, None]
    lines = jnp.stack(
        [
            jnp.full(sents_UK.shape, lay.BULLET),
            lay.sentence + jnp.maximum(doc_U, 0)[:, None] * lay.max_sents + sents_UK,
        ],
        -1,
    )
    lines = jnp.where(ok_UK[..., None], lines, -1).reshape(nu, -1)
    u_idx = jnp.arange(nu)
    sep = jnp.where((u_idx > 0) & uvalid_U, lay.SEP, -1)
    head = jnp.where(found, lay.visit_head + doc_U, lay.NOT_FOUND)
    head = jnp.where(uvalid_U, head, -1)
    block = jnp.concatenate([sep[:, None], head[:, None], lines], -1).reshape(-1)
    ids = jnp.concatenate([block, jnp.where(more, lay.MORE_URLS, -1)[None]])
    return _compact(ids.astype(jnp.int32))


# ------------------------------------------------------------------------------------------
# The environment
# ------------------------------------------------------------------------------------------


class SimulatedWiki:
    """World + pages + BM25 index; ``search``/``visit`` return observation text.

    Observations are sequences of *pieces* from a finite inventory (``pieces``, laid out by
    ``layout``): headers, rank numbers, page titles, sentences. The environment step computes
    piece ids with pure jnp (``search_step`` / ``visit_step`` on ``arrays()``), and ``search`` /
    ``visit`` are exactly ``join`` of those ids, so a compiled rollout that tokenises each piece
    once and gathers piece tokens produces the same observation as this Python path.
    ``vocab`` maps terms to ids; ``encode(text, length)`` turns text into padded term ids.
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
        sent_sets = [[sorted({vocab[w] for w in terms(s)}) for s in p.sentences] for p in self.pages]
        max_l = max(len(t) for page in sent_sets for t in page)
        self.sent_terms_DSL = np.full((len(self.pages), max_s, max_l), -1, np.int32)
        self.sent_valid_DS = np.zeros((len(self.pages), max_s), bool)
        for d, page in enumerate(sent_sets):
            for s, ids in enumerate(page):
                self.sent_terms_DSL[d, s, : len(ids)] = ids
                self.sent_valid_DS[d, s] = True
        titles = [sorted({vocab[w] for w in terms(p.title)}) for p in self.pages]
        max_t = max(len(t) for t in titles)
        self.title_terms_DT = np.full((len(self.pages), max_t), len(vocab), np.int32)
        for d, ids in enumerate(titles):
            self.title_terms_DT[d, : len(ids)] = ids
        self.term_hashes_2V = term_hashes(list(vocab))
        if len({(int(a), int(b)) for a, b in self.term_hashes_2V.T}) != len(vocab):
            raise RuntimeError("SimulatedWiki: two terms share a hash; change the seed")
        self.layout = PieceLayout(
            n_docs=len(self.pages),
            max_sents=max_s,
            top_k=config.search_top_k,
            visit_k=config.visit_top_k,
            max_queries=config.max_queries,
            max_urls=config.max_urls,
            snippets=config.snippets,
        )
        self.pieces = self.layout.pieces(self.pages)
        self._arrays = self.arrays()

    # -- term ids ---------------------------------------------------------------------------
    def encode(self, text: str, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Known terms of ``text`` as ids, padded/cut to ``length`` (unknown words dropped)."""
        ids = [self.vocab[w] for w in terms(text) if w in self.vocab]
        if length is None:  # bucket lengths so jitted retrieval compiles once per bucket
            length = 16 * max(1, -(-len(ids) // 16))
        ids = ids[:length]
        out = np.zeros((length,), np.int32)
        mask = np.zeros((length,), bool)
        out[: len(ids)] = ids
        mask[: len(ids)] = True
        return out, mask

    # -- ranking ----------------------------------------------------------------------------
    def rank(self, query: str, k: int | None = None) -> list[tuple[int, float]]:
        """``(doc, score)`` of the top-k pages for a query; pages scoring 0 are left out."""
        k = min(k or self.config.search_top_k, len(self.pages))
        ids, mask = self.encode(query)
        docs, scores = bm25_topk(self.weights_DV, ids[None], mask[None], k=k)
        return [(int(d), float(s)) for d, s in zip(np.asarray(docs[0]), np.asarray(scores[0])) if s > 0]

    def relevant_sentences(self, doc: int, goal: str, k: int | None = None) -> list[int]:
        k = min(k or self.config.visit_top_k, self.sent_valid_DS.shape[1])
        ids, mask = self.encode(goal)
        sents, _ = visit_topk(
            self.sent_terms_DSL,
            self.sent_valid_DS,
            self.idf_V,
            np.asarray([doc], np.int32),
            ids[None],
            mask[None],
            k=k,
        )
        return [int(s) for s in np.asarray(sents[0]) if s >= 0]

    # -- tools ------------------------------------------------------------------------------
    def arrays(self) -> "WikiArrays":
        return WikiArrays(
            jnp.asarray(self.weights_DV),
            jnp.asarray(self.idf_V),
            jnp.asarray(self.sent_terms_DSL),
            jnp.asarray(self.sent_valid_DS),
            jnp.asarray(self.title_terms_DT),
        )

    #: terms kept per query / URL / goal (the rest is ignored), which also bounds the number of
    #: shapes the jitted steps compile for (16, 32, 48, 64)
    max_terms = 64

    def _encode_many(self, texts: list[str], rows: int):
        ids = [i[m][: self.max_terms] for i, m in map(self.encode, texts)]
        length = 16 * max(1, -(-max([len(i) for i in ids] + [1]) // 16))
        out = np.zeros((rows, length), np.int32)
        mask = np.zeros((rows, length), bool)
        for r, i in enumerate(ids):
            out[r, : len(i)] = i
            mask[r, : len(i)] = True
        valid = np.zeros((rows,), bool)
        valid[: len(texts)] = True
        return out, mask, valid

    def join(self, piece_ids) -> str:
        """Observation text of a piece-id row (``-1`` entries are padding)."""
        return "".join(self.pieces[int(i)] for i in np.asarray(piece_ids) if i >= 0)

    def search_ids(self, queries: list[str]) -> np.ndarray:
        """Piece ids of the ``search`` observation (the jnp environment step, run once)."""
        lay = self.layout
        q, m, valid = self._encode_many(list(queries[: lay.max_queries]), lay.max_queries)
        return np.asarray(
            search_step(
                self._arrays,
                jnp.asarray(q),
                jnp.asarray(m),
                jnp.asarray(valid),
                len(queries) > lay.max_queries,
                layout=lay,
            )
        )

    def visit_ids(self, urls, goal: str) -> np.ndarray:
        """Piece ids of the ``visit`` observation (the jnp environment step, run once)."""
        lay = self.layout
        urls = [urls] if isinstance(urls, str) else list(urls)
        u, um, valid = self._encode_many(urls[: lay.max_urls], lay.max_urls)
        g, gm, _ = self._encode_many([goal], 1)
        return np.asarray(
            visit_step(
                self._arrays,
                jnp.asarray(u),
                jnp.asarray(um),
                jnp.asarray(valid),
                jnp.asarray(g[0]),
                jnp.asarray(gm[0]),
                len(urls) > lay.max_urls,
                layout=lay,
            )
        )

    def search(self, queries: list[str]) -> str:
        """Observation for ``search(query=[...])``: per query, the top pages' titles, URLs and
        the sentence of each page most relevant to the query. At most ``max_queries`` queries
        are run (a note says so when more were given)."""
        return self.join(self.search_ids(queries))

    def visit(self, urls, goal: str) -> str:
        """Observation for ``visit(url=..., goal=...)``: the goal-relevant sentences per page.
        A URL names a page by the set of known words in it (``wiki://Title_Words``)."""
        return self.join(self.visit_ids(urls, goal))

    def resolve_url(self, url: str) -> int:
        """The page a URL names, or -1 (same rule as the jnp ``visit_step``)."""
        u, um, _ = self._encode_many([url], 1)
        return int(
            np.asarray(
                match_titles(
                    self._arrays.title_terms_DT, jnp.asarray(u), jnp.asarray(um), n_vocab=len(self.vocab)
                )
            )[0]
        )

    def backends(self) -> dict:
        """``tools.ToolExecutor`` backends for ``search`` and ``visit`` (``WikiTool`` objects, so a
        compiled rollout can recognise the wiki behind an executor and run its jnp step)."""
        return {"search": WikiTool(self, "search"), "visit": WikiTool(self, "visit")}

    def encode_bytes(self, data: bytes, length: int) -> tuple[np.ndarray, np.ndarray]:
        """``encode`` done by the jnp byte analyser (``bytes_to_terms``); for checks and for
        byte-level tokenizers."""
        arr = np.frombuffer(data, np.uint8).astype(np.int32)
        n = 64 * max(1, -(-len(arr) // 64))
        b = np.zeros((n,), np.int32)
        m = np.zeros((n,), bool)
        b[: len(arr)] = arr
        m[: len(arr)] = True
        ids, ok = bytes_to_terms(
            jnp.asarray(self.term_hashes_2V), jnp.asarray(b), jnp.asarray(m), max_terms=length
        )
        return np.asarray(ids), np.asarray(ok)

    def term_table(self, token_strings) -> np.ndarray:
        """For a tokenizer vocabulary (``token_strings[i]`` = text of token i): the wiki term id
        each token stands for, or -1. A token maps when its text analyses to exactly one known
        term; a compiled rollout uses this table to turn generated query tokens into term ids
        (exact for word-level vocabularies; sub-word pieces map to -1)."""
        out = np.full((len(token_strings),), -1, np.int32)
        for i, t in enumerate(token_strings):
            ws = terms(t)
            if len(ws) == 1 and ws[0] in self.vocab:
                out[i] = self.vocab[ws[0]]
        return out


class WikiTool:
    """A ``tools.ToolExecutor`` backend ``(arguments, code) -> str`` bound to one wiki's
    ``search`` or ``visit``. ``wiki`` and ``name`` let ``rollout.scan_rollout`` see that an
    executor is the simulated wiki and run the jnp environment step instead of calling back."""

    def __init__(self, wiki: SimulatedWiki, name: str):
        if name not in ("search", "visit"):
            raise ValueError(f"WikiTool: name must be 'search' or 'visit', got {name!r}")
        self.wiki, self.name = wiki, name

    def __call__(self, arguments: dict, code=None) -> str:
        if self.name == "search":
            return self.wiki.search(arguments["query"])
        return self.wiki.visit(arguments["url"], arguments["goal"])

    def __repr__(self):
        return f"WikiTool({self.name})"
