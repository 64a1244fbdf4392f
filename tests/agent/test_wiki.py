import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.agent import synth, tools
from jaxllm.agent import wiki as W


@pytest.fixture(scope="module")
def wk():
    return W.SimulatedWiki(W.WikiConfig(seed=3))


def test_same_seed_same_world_other_seed_other_world(wk):
    again = W.SimulatedWiki(W.WikiConfig(seed=3))
    assert [p.sentences for p in again.pages] == [p.sentences for p in wk.pages]
    assert again.search(["capital"]) == wk.search(["capital"])
    other = W.SimulatedWiki(W.WikiConfig(seed=4))
    assert [p.title for p in other.pages] != [p.title for p in wk.pages]


def test_world_is_consistent(wk):
    world = wk.world
    names = [e.name for e in world.entities]
    assert len(set(names)) == len(names)
    for (s, rel), o in world.edges.items():
        r = W.RELATIONS[rel]
        assert world.entities[s].kind == r.subject and world.entities[o].kind == r.object
        # the fact is on the subject's page
        assert W.fact_sentence(world, s, rel) in wk.pages[s].sentences
    for c in world.by_kind("country"):
        cap = world.follow(c.id, "capital")
        assert world.follow(cap, "country") == c.id
    for p in world.by_kind("person"):
        assert set(world.relations_from(p.id)) == {"birthplace", "employer", "alma_mater"}


def test_config_validation():
    with pytest.raises(ValueError, match="n_people"):
        W.WikiConfig(n_people=0)
    with pytest.raises(ValueError, match="n_cities must be >= n_countries"):
        W.WikiConfig(n_countries=5, n_cities=3)
    with pytest.raises(ValueError, match="seed must be an int"):
        W.WikiConfig(seed=1.5)


def _bm25_reference(wk, query, k1=1.5, b=0.75):
    """Plain-Python BM25 (float64) over the same analysed pages."""
    docs = [W.terms(p.title + " " + p.text) for p in wk.pages]
    n = len(docs)
    avgdl = sum(map(len, docs)) / n
    scores = []
    for d in docs:
        s = 0.0
        for t in W.terms(query):
            if t not in wk.vocab:
                continue
            df = sum(t in dd for dd in docs)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = d.count(t)
            s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(d) / avgdl))
        scores.append(s)
    return scores


def test_bm25_matches_a_plain_python_reference(wk):
    e = wk.world.entities[40]
    for query in (e.name, f"where {e.name} was born", "capital currency crown", "zzz unknown"):
        ref = _bm25_reference(wk, query)
        got = wk.rank(query, k=len(wk.pages))
        for d, s in got:
            assert s == pytest.approx(ref[d], rel=1e-5, abs=1e-5)
        expected = sorted((d for d in range(len(ref)) if ref[d] > 0), key=lambda d: -ref[d])
        assert {d for d, _ in got} == set(expected)
        assert [round(s, 4) for _, s in got] == [round(ref[d], 4) for d in expected]


def test_search_finds_an_entity_by_name_first(wk):
    for e in wk.world.entities[::7]:
        assert wk.rank(e.name)[0][0] == e.id
        assert wk.search([e.name]).split("\n")[1].startswith(f"1. [{e.name}]({e.url})")


def test_visit_returns_the_goal_relevant_sentences_in_page_order(wk):
    world = wk.world
    for p in world.by_kind("person")[:10]:
        obs = wk.visit(p.url, f"where {p.name} was born")
        assert W.fact_sentence(world, p.id, "birthplace") in obs
        idx = wk.relevant_sentences(p.id, f"where {p.name} was born")
        assert idx == sorted(idx) and len(idx) == wk.config.visit_top_k
    assert "could not be found" in wk.visit("wiki://Nowhere", "x")
    two = wk.visit([wk.pages[0].url, wk.pages[1].url], "capital")
    assert two.count("=======") == 1


def _visit_reference(wk, doc, goal, k):
    g = {wk.vocab[t] for t in W.terms(goal) if t in wk.vocab}
    scores = []
    for s, sent in enumerate(wk.pages[doc].sentences):
        ids = {wk.vocab[t] for t in W.terms(sent)}
        scores.append((-sum(float(wk.idf_V[t]) for t in ids & g), s))
    return sorted(s for _, s in sorted(scores)[:k])


def test_visit_topk_matches_a_reference(wk):
    rng = np.random.default_rng(0)
    for _ in range(30):
        doc = int(rng.integers(len(wk.pages)))
        words = list(wk.vocab)
        goal = " ".join(rng.choice(words, size=3))
        for k in (1, 3, 5):
            assert wk.relevant_sentences(doc, goal, k=k) == _visit_reference(wk, doc, goal, k)


def test_jnp_env_step_is_batched_jittable_and_equals_the_python_tools(wk):
    queries = [wk.world.entities[i].name for i in range(0, 60, 6)]
    enc = [wk.encode(q, 16) for q in queries]
    q_BQ = jnp.asarray(np.stack([e[0] for e in enc]))
    m_BQ = jnp.asarray(np.stack([e[1] for e in enc]))

    def env_step(q, m):  # what a scan rollout would call on its carry
        docs, scores = W.bm25_topk(wk.weights_DV, q, m, k=3)
        sents, _ = W.visit_topk(wk.sent_terms_DSL, wk.sent_valid_DS, wk.idf_V, docs[:, 0], q, m, k=2)
        return docs, sents

    docs, sents = jax.jit(env_step)(q_BQ, m_BQ)
    for b, q in enumerate(queries):
        assert [d for d, _ in wk.rank(q, k=3)] == np.asarray(docs[b]).tolist()
        assert wk.relevant_sentences(int(docs[b, 0]), q, k=2) == np.asarray(sents[b]).tolist()

    # inside lax.scan too
    def body(c, x):
        return c, env_step(x[0][None], x[1][None])[0][0]

    _, scanned = jax.lax.scan(body, 0, (q_BQ, m_BQ))
    np.testing.assert_array_equal(scanned, docs)


def test_visit_topk_pads_short_pages_with_minus_one(wk):
    lens = wk.sent_valid_DS.sum(1)
    doc = int(np.argmin(lens))
    k = int(wk.sent_valid_DS.shape[1])
    sents, _ = W.visit_topk(
        wk.sent_terms_DSL,
        wk.sent_valid_DS,
        wk.idf_V,
        jnp.asarray([doc], jnp.int32),
        jnp.zeros((1, 4), jnp.int32),
        jnp.zeros((1, 4), bool),
        k=k,
    )
    row = np.asarray(sents[0]).tolist()
    assert row[: lens[doc]] == list(range(lens[doc])) and set(row[lens[doc] :]) <= {-1}


def test_encode_drops_unknown_words_and_pads(wk):
    ids, mask = wk.encode("zzqx " + wk.pages[0].title, 8)
    assert ids.shape == (8,) and mask.sum() == len(W.terms(wk.pages[0].title))
    assert (ids[~mask] == 0).all()


def test_backends_plug_into_the_executor(wk):
    ex = tools.ToolExecutor(wk.backends())
    obs = ex.step(
        '<think>x</think><tool_call>{"name": "search", "arguments": {"query": '
        f'["{wk.pages[5].title}"]}}}}</tool_call>'
    )
    assert not obs.error and wk.pages[5].url in obs.text
    obs = ex.step(
        '<think>x</think><tool_call>{"name": "visit", "arguments": {"url": '
        f'"{wk.pages[5].url}", "goal": "capital"}}}}</tool_call>'
    )
    assert not obs.error and wk.pages[5].title in obs.text


def test_observations_are_joins_of_piece_ids_from_the_jnp_step(wk):
    lay = wk.layout
    assert len(wk.pieces) == lay.size
    queries = [wk.pages[3].title, "capital of nowhere zzz", "zzz", f"where {wk.pages[70].title} was born"]
    ids = wk.search_ids(queries)
    assert ids.shape == (lay.search_len,) and (ids[(ids >= 0).sum() :] == -1).all()
    text = wk.search(queries)
    assert text == wk.join(ids)
    assert "No results for query 3." in text and text.count("=======") == 3
    assert wk.search(["capital"] * (lay.max_queries + 2)).endswith(
        f"(Only the first {lay.max_queries} queries were run.)"
    )
    urls = [wk.pages[9].url, "wiki://No_Such_Page", wk.pages[9].url.lower().replace("_", " ")]
    vtext = wk.visit(urls, "where founded")
    assert vtext == wk.join(wk.visit_ids(urls, "where founded"))
    assert vtext.count(f"From [{wk.pages[9].title}]({wk.pages[9].url}):") == 2
    assert "The page could not be found." in vtext


def test_batched_search_step_under_vmap_and_scan_equals_the_python_tool(wk):
    lay = wk.layout
    calls = [[wk.pages[i].title, f"the capital of {wk.pages[i].title}"] for i in range(0, 40, 5)]
    enc = [wk._encode_many(c, lay.max_queries) for c in calls]
    length = max(e[0].shape[1] for e in enc)
    pad = lambda a: np.pad(a, ((0, 0), (0, length - a.shape[1])))
    q = jnp.asarray(np.stack([pad(e[0]) for e in enc]))
    m = jnp.asarray(np.stack([pad(e[1]) for e in enc]))
    v = jnp.asarray(np.stack([e[2] for e in enc]))
    arrays = wk.arrays()
    step = jax.vmap(lambda a, b, c: W.search_step(arrays, a, b, c, False, layout=lay))
    ids_B = jax.jit(step)(q, m, v)
    _, scanned = jax.lax.scan(lambda c, x: (c, W.search_step(arrays, *x, False, layout=lay)), 0, (q, m, v))
    np.testing.assert_array_equal(ids_B, scanned)
    for b, c in enumerate(calls):
        assert wk.join(ids_B[b]) == wk.search(c)


def test_url_resolution(wk):
    p = wk.pages[17]
    assert wk.resolve_url(p.url) == p.doc
    assert wk.resolve_url("https://" + p.title.upper().replace(" ", "-")) == p.doc
    assert wk.resolve_url(p.url + "_Extra_" + wk.pages[18].title) == -1
    assert wk.resolve_url("wiki://") == -1


def test_term_table_maps_word_tokens(wk):
    name_word = W.terms(wk.pages[0].title)[0]
    table = wk.term_table([name_word, " " + name_word.capitalize(), "the", "zz", "a b"])
    assert table.tolist() == [wk.vocab[name_word], wk.vocab[name_word], -1, -1, -1]


def test_search_without_snippets_forces_visits():
    wk = W.SimulatedWiki(W.WikiConfig(seed=3, snippets=False))
    text = wk.search([wk.pages[2].title])
    assert wk.pages[2].url in text and wk.pages[2].sentences[0] not in text
    recs = synth.synthesize(6, seed=1, hops=(2,), obfuscate_prob=0.0, wiki=wk)
    for r in recs:  # every hop needs a search and a visit
        calls = [m for m in r["trajectory"] if m["role"] == "assistant"][:-1]
        assert sum('"name": "visit"' in m["content"] for m in calls) == 2
    with pytest.raises(ValueError, match="snippets must be a bool"):
        W.WikiConfig(snippets=1)


def test_byte_level_jnp_analyser_equals_the_python_one(wk):
    rng = random.Random(0)
    words = list(wk.vocab) + ["the", "of", "Zzz", "ÉCOLE", "kelvin\u212a", "naïve", "İstanbul"]
    junk = ["!!", "-", "é", "\n", "12", "A1b", "_", "\t", "ß"]
    texts = []
    for _ in range(200):
        text = " ".join(
            rng.choice(words) if rng.random() < 0.8 else rng.choice(junk) for _ in range(rng.randrange(0, 20))
        )
        texts.append(text.upper() if rng.random() < 0.3 else text)
    raw = [np.frombuffer(t.encode(), np.uint8).astype(np.int32) for t in texts]
    n = max(map(len, raw))
    b_BL = np.zeros((len(raw), n), np.int32)
    m_BL = np.zeros((len(raw), n), bool)
    for i, r in enumerate(raw):  # batched, as a rollout would call it on byte-tokenizer ids
        b_BL[i, : len(r)] = r
        m_BL[i, : len(r)] = True
    hashes = jnp.asarray(wk.term_hashes_2V)
    ids, ok = jax.jit(jax.vmap(lambda b, m: W.bytes_to_terms(hashes, b, m, max_terms=24)))(b_BL, m_BL)
    ids, ok = np.asarray(ids), np.asarray(ok)
    for i, t in enumerate(texts):
        e, em = wk.encode(t, 24)
        assert ids[i][ok[i]].tolist() == e[em].tolist(), t
    e, em = wk.encode(texts[1], 24)
    b, bm = wk.encode_bytes(texts[1].encode(), 24)
    assert b[bm].tolist() == e[em].tolist() and em.sum() > 0


def test_terms_lower_cases_ascii_only():
    assert W.terms("The Kelvin\u212a ÉCOLE x2") == ["kelvin", "cole", "x2"]


def test_very_long_queries_are_cut_not_fatal(wk):
    long_q = " ".join([wk.pages[1].title] + list(wk.vocab)[:300])
    text = wk.search([long_q])
    assert text.startswith("Results for query 1:")
    assert wk.visit(wk.pages[1].url, long_q).startswith(f"From [{wk.pages[1].title}]")
