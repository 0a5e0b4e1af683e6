"""Steered semantic search on a small SAE trained and labelled on real Wikipedia text."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sbert_sae import Family, InputError, SparseAutoencoder, SparseAutoencoderConfig, SteerableIndex
from sbert_sae.cli import main


@pytest.fixture(scope="module")
def index(labelled_run):
    return SteerableIndex.from_run(labelled_run, device="cpu")


@pytest.fixture(scope="module")
def corpus_texts(index):
    return index.text_of(range(len(index)))


def test_unsteered_search_is_exact_cosine_search(index, corpus_texts):
    query = corpus_texts[17]
    result = index.search(query, k=5)
    assert result.hits[0].row == index.row_ids[17] and result.hits[0].text == query
    assert result.cosine == pytest.approx(1.0)
    # The same ranking as a brute-force cosine over the cached embeddings.
    emb = torch.from_numpy(np.array(index._embeddings, dtype=np.float32))
    q = index.query_vector(query)
    brute = F.cosine_similarity(emb, q[None], dim=1)
    assert [h.row for h in result.hits] == index.row_ids[torch.topk(brute, 5).indices.numpy()].tolist()
    assert [h.score for h in result.hits] == pytest.approx(torch.topk(brute, 5).values.tolist(), abs=1e-5)
    assert result.hits[0].score >= result.hits[-1].score
    # Excluding the query's own row gives the next five.
    rest = index.search(query, k=5, exclude_rows=[result.hits[0].row])
    assert [h.row for h in rest.hits][:4] == [h.row for h in result.hits][1:]


def test_a_search_result_shows_its_hits_not_its_query_vectors():
    # A notebook cell ending in `index.search(...)` shows the result's repr: it held the
    # original and steered query vectors in full, 2 x d_in numbers (768 for MiniLM) among the hits.
    torch.manual_seed(0)
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=16, n_latents=32, k=4))
    embeddings = torch.randn(40, 16)
    index = SteerableIndex(sae, embeddings, texts=[f"text {i}" for i in range(40)], device="cpu")
    result = index.search(embeddings[3], k=3)
    shown = repr(result)
    assert "tensor(" not in shown
    assert "text='text 3'" in shown and "cosine=1.0" in shown
    assert result.steering.vector.shape == (16,)  # still there, only not shown


def _share(result, feature: int) -> float:
    return float(np.mean([h.steered[feature] > 0 for h in result.hits]))


@pytest.mark.parametrize("method", ["add", "clamp"])
def test_raising_a_feature_raises_its_firing_share_in_the_hits(index, corpus_texts, method):
    """Over many (query, feature) pairs where the feature fires in none of the query's own
    hits, steering toward it (strength 1) makes it fire in more than half of them."""
    counts = index.fire_counts
    rng = np.random.default_rng(0)
    before, after, cosines = [], [], []
    for position in rng.choice(len(index), 12, replace=False):
        query = corpus_texts[position]
        plain = index.search(query, k=10)
        fired = set()
        for hit in plain.hits:
            fired |= {int(f) for f in np.asarray(index.codes.indices[index.position_of(hit.row)])}
        candidates = [f for f in range(index.sae.config.n_latents) if f not in fired and 10 <= counts[f] <= 60]
        feature = int(rng.choice(candidates))
        steered = index.search(query, up={feature: 1.0}, k=10, method=method)
        before.append(float(np.mean([index.feature_activations([index.position_of(h.row)], [feature])[0, 0] > 0 for h in plain.hits])))
        after.append(_share(steered, feature))
        cosines.append(steered.cosine)
    assert np.mean(before) == 0.0
    assert np.mean(after) > 0.5, after
    assert all(c < 1.0 for c in cosines)


def test_lowering_an_active_feature_lowers_its_share(index, corpus_texts):
    counts = index.fire_counts
    plain_share, lowered_share = [], []
    for position in range(0, 200, 10):
        query = corpus_texts[position]
        active = [f for f, _, _ in index.query_features(query) if counts[f] < len(index) * 0.5]
        plain = index.search(query, down={active[0]: 0.0}, k=10)  # strength 0: the plain query
        lowered = index.search(query, down={active[0]: 1.0}, k=10)
        plain_share.append(_share(plain, active[0]))
        lowered_share.append(_share(lowered, active[0]))
    assert plain.cosine == pytest.approx(1.0)
    assert np.mean(lowered_share) < 0.5 * np.mean(plain_share), (plain_share, lowered_share)


def test_steering_moves_the_query_along_decoder_directions(index, corpus_texts):
    query = corpus_texts[3]
    q = index.query_vector(query)
    w = index.sae.W_dec.detach()
    a, b, c = (int(f) for f in np.flatnonzero(index.fire_counts > 0)[:3])  # steering refuses dead features
    added = index.steer(query, up={a: 0.4}, down={b: 0.2}, method="add")
    assert torch.allclose(added.vector, q + q.norm() * (0.4 * w[a] - 0.2 * w[b]), atol=1e-5)
    assert added.cosine == pytest.approx(float(F.cosine_similarity(q, added.vector, dim=0)))
    # clamp: the change of the query's code, decoded; a lowered active feature is removed.
    values, indices = index.sae.encode_topk(q[None])
    z = dict(zip(indices[0].tolist(), values[0].tolist()))
    active = max(z, key=z.get)
    other = next(f for f in (a, b, c) if f != active)
    clamped = index.steer(query, down={active: 1.0}, clamp={other: 0.3}, method="clamp")
    expected = q - z[active] * w[active] + (0.3 - z.get(other, 0.0)) * w[other]
    assert torch.allclose(clamped.vector, expected, atol=1e-5)


def test_targets_by_label_query_and_by_family(index):
    labels = index.sae.feature_labels
    feature = next(f for f, label in enumerate(labels) if label and index.fire_counts[f] > 0)
    match = index.features_about(labels[feature], top=3)
    assert match[0].feature == feature or labels[match[0].feature] == labels[feature]
    steered = index.steer("a query", up={labels[feature]: 0.5})
    assert steered.resolved[labels[feature]] == [match[0].feature]
    # A family is one direction: its members' mean, at the family's strength.
    family = Family(parent=feature, children=[(feature + 1) % 64, (feature + 2) % 64], under=[feature, feature], depth=[1, 1])
    ids, resolved = index.resolve([(family, 0.6)], "up")
    assert resolved == {f"family:{feature}": [feature, (feature + 1) % 64, (feature + 2) % 64]}
    assert ids == pytest.approx({f: 0.2 for f in resolved[f"family:{feature}"]})
    with pytest.raises(InputError, match="no families.json"):
        index.resolve({"family:3": 1.0}, "up")


def test_a_label_query_that_no_label_is_near_gets_only_weak_matches(index):
    """Nonsense, a typo or an emoji has a nearest label, but matches none: its matches say so."""
    labels = index.sae.feature_labels
    near, close = index.label_match_thresholds()
    # Measured on the labels' own pairs: between what unrelated labels reach and a label itself.
    assert 0.0 < near <= close < 1.0
    for nonsense in ("qwzxv", "asdf jkl", "\U0001f642"):
        matches = index.features_about(nonsense, top=5)
        assert len(matches) == 5 and not any(m.matches for m in matches), [(m.label, m.strength, m.score) for m in matches]
        assert {m.strength for m in matches} <= {"near", "weak"}
        assert all(m.score < close for m in matches)
    # A label's own words match it, by its words.
    entries = index.sae.label_data["features"]
    f = next(f for f, label in enumerate(labels) if label and max(map(len, label.split())) >= 6)
    word = max(labels[f].split(), key=len).strip(",")
    first = index.features_about(word, top=3)[0]
    assert first.matches and first.strength == "words" and word in first.label
    # A few letters inside a word are not the label's words ("art" is not in "party").
    inside = word[1:-1]
    haystacks = [" ".join([label or "", *(k["keyword"] for k in entries.get(g, {}).get("keywords", []))]) for g, label in enumerate(labels)]
    assert not any(re.search(rf"\b{re.escape(inside)}\b", h) for h in haystacks)
    assert all(m.strength != "words" for m in index.features_about(inside, top=5))


# Words of the test corpus' topics (arts, mathematics, biology) in other words than its labels'.
IN_TOPIC_WORDS = """melody songs orchestra sculpture painter opera cinema movie poem algebra calculus
triangle probability statistics botany trees flowers banana fishes zoology mammals ballet dancing
theater piano violin guitar polygon japan french literature poems artwork blossom harvest equation""".split()


def test_a_few_labels_get_cut_offs_that_real_words_reach(index):
    """The 59 labels of the test SAE give 1711 label pairs, whose 99.99th percentile is their
    closest pair, two labels of one topic: the cut-offs were near 0.78, close 0.80, and a
    word of the corpus' topics ('songs' for 'music, instrument', 'piano', 'movie' for
    'film') was a weak match 2 times in 3. The model's own word pairs now count as 100,000
    label pairs: most such words are near or close, and random letters still are not."""
    from sbert_sae.search import LABEL_MATCH_QUANTILES, REFERENCE_PAIRS_WEIGHT

    finder = index.label_finder
    pairs, reference = finder.label_pair_cosines(), finder.reference_pair_cosines()
    assert 0 < len(pairs) < REFERENCE_PAIRS_WEIGHT / 10 and len(reference) > REFERENCE_PAIRS_WEIGHT
    near, close = finder.thresholds()
    # Nearer the model's reference than the labels' own, as so few label pairs weigh little.
    model_near, model_close = np.quantile(reference, LABEL_MATCH_QUANTILES)
    own_near, own_close = np.quantile(pairs, LABEL_MATCH_QUANTILES)
    assert abs(near - model_near) < abs(near - own_near) and abs(close - model_close) < abs(close - own_close)
    best = [finder.find(w, top=1)[0] for w in IN_TOPIC_WORDS]
    by_meaning = [m for m in best if m.strength != "words"]
    assert len(by_meaning) >= 25
    reached = [m for m in by_meaning if m.strength in ("close", "near")]
    assert len(reached) >= 0.6 * len(by_meaning), [(w, m.label, m.strength, round(m.score, 2)) for w, m in zip(IN_TOPIC_WORDS, best)]
    assert any(m.strength == "close" for m in by_meaning)
    rng = np.random.default_rng(0)
    letters = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), int(rng.integers(4, 9)))) for _ in range(60)]
    nonsense = [finder.find(w, top=1)[0] for w in letters]
    assert not any(m.matches for m in nonsense)
    assert sum(m.strength == "near" for m in nonsense) <= 3


def test_the_cut_offs_are_those_of_all_the_pairs_sorted(index):
    """The cut-offs sorted ~2.6M pairs (0.5-5 s); only the largest are sorted now. They are
    the weighted quantiles a full sort gives, on the test SAE's label and word pairs, and on
    the same rounded to two decimals (many ties, some across the values the sort keeps)."""
    from sbert_sae.search import LABEL_MATCH_QUANTILES, REFERENCE_PAIRS_WEIGHT, weighted_high_quantiles

    finder = index.label_finder
    pairs, reference = finder.label_pair_cosines(), finder.reference_pair_cosines()
    values = np.concatenate([pairs, reference]).astype(np.float64)
    weights = np.concatenate([np.ones(len(pairs)), np.full(len(reference), REFERENCE_PAIRS_WEIGHT / len(reference))])

    def sorted_all(values, q):
        order = np.argsort(values, kind="stable")
        cumulative = np.cumsum(weights[order]) / np.sum(weights)
        return float(values[order][np.argmax(cumulative >= q)])

    assert list(finder.thresholds()) == [sorted_all(values, q) for q in LABEL_MATCH_QUANTILES]
    quantiles = (0.9, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999)
    for v in (values, np.round(values, 2)):
        assert weighted_high_quantiles(v, weights, quantiles) == [sorted_all(v, q) for q in quantiles]


def test_a_labels_words_are_found_as_by_reading_every_label(index):
    """A Find read each label and its keywords for the query's words (0.05-1 s for 6134
    labels); an index of their words made with them answers now. Every word of every label
    and keyword, pairs of them, pieces of them, and words with signs, match the labels that
    reading each one matches."""
    finder = index.label_finder
    labels = index.sae.feature_labels
    entries = index.sae.label_data["features"]
    labelled = [f for f, label in enumerate(labels) if label]
    haystacks = [" | ".join([labels[f], *(k["keyword"] for k in entries.get(f, {}).get("keywords", []))]).lower() for f in labelled]

    def read_every_label(query):
        words = query.lower().split()
        return np.array([all(re.search(rf"(?<!\w){re.escape(w)}(?!\w)", h) for w in words) for h in haystacks])

    words = sorted({w for h in haystacks for w in h.split()})
    queries = [*words, *(f"{a} {b}" for a, b in zip(words, words[1:])), *(w[1:-1] for w in words if len(w) > 4)]
    queries += [w.upper() for w in words[:20]] + [f"{w}," for w in words[:20]] + [f"-{w}" for w in words[:20]]
    queries += ["|", "c++", "u.s.", "qwzxv", "the of and", words[0] + " | " + words[-1]]
    found = {q: finder._literal(q) for q in queries}
    assert sum(found[q].any() for q in queries) > len(words)  # the queries do find labels
    for q in queries:
        assert found[q].tolist() == read_every_label(q).tolist(), q
    for q in (words[0], words[-1], "c++"):  # a Find puts those labels first, and says so
        assert {m.feature for m in finder.find(q, top=len(labelled)) if m.strength == "words"} == {f for f, hit in zip(labelled, found[q]) if hit}


def test_reference_words_are_whole_words_of_any_vocabulary():
    """WordPiece ('##' marks a piece), SentencePiece ('▁' marks a word's start) and byte-level
    BPE ('Ġ'): the reference words are whole words of letters, in any script."""
    from types import SimpleNamespace

    from sbert_sae.search import reference_words

    def model(tokens):
        return SimpleNamespace(tokenizer=SimpleNamespace(get_vocab=lambda: {t: i for i, t in enumerate(tokens)}))

    assert reference_words(model(["[CLS]", "[unused3]", "music", "##ing", "piano", "12", "of", "été", "音楽"])) == ["music", "piano", "été", "音楽"]
    assert reference_words(model(["<s>", "\u2581music", "ing", "\u2581piano", "\u2581of", "\u2581音楽", "abc"])) == ["music", "piano", "音楽"]
    assert reference_words(model(["\u0120music", "ing", "\u0120piano", "abc"])) == ["music", "piano"]
    assert reference_words(model([f"word{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(600)]), n=100) == sorted(reference_words(model([f"word{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(600)]), n=100))
    assert len(reference_words(model([f"w{chr(97 + i % 26)}{chr(97 + i // 26)}x" for i in range(600)]), n=100)) == 100
    assert reference_words(SimpleNamespace()) == []


def test_steering_by_a_label_query_no_label_matches_warns(index, caplog):
    """`--up qwzxv` steered the nearest label's feature without a word; it now says that no
    label matches, which feature it took, and how weak a match that is."""
    import logging

    nearest = index.features_about("qwzxv", top=1)[0]
    with caplog.at_level(logging.WARNING, logger="sbert_sae.search"):
        ids, _ = index.resolve({"qwzxv": 0.5}, "up")
    assert ids == {nearest.feature: 0.5}
    assert f"no feature label matches 'qwzxv': steering (up) the nearest, #{nearest.feature} {nearest.label!r}, a {nearest.strength} match" in caplog.text
    caplog.clear()
    label = next(label for label in index.sae.feature_labels if label)
    with caplog.at_level(logging.WARNING, logger="sbert_sae.search"):
        index.resolve({label: 0.5}, "up")
    assert "no feature label matches" not in caplog.text


def test_label_vectors_are_kept_for_the_next_index(index, labelled_run):
    import os
    import shutil
    from pathlib import Path

    folder = Path(os.environ["SBERT_SAE_CACHE"]) / "label-vectors"
    shutil.rmtree(folder, ignore_errors=True)  # other tests' runs keep theirs in the same cache
    first = SteerableIndex.from_run(labelled_run, device="cpu")
    first.features_about("cells")
    kept = list(folder.glob("*.npy"))
    assert len(kept) == 2  # the labels', and the model's reference words' (the match cut-offs)
    again = SteerableIndex.from_run(labelled_run, device="cpu")
    calls = []
    again.sae.embed_texts = lambda texts, **kw: calls.append(list(texts)) or index.sae.embed_texts(texts, **kw)
    assert [m.feature for m in again.features_about("cells", top=5)] == [m.feature for m in first.features_about("cells", top=5)]
    assert calls == [["cells"]]  # only the query was embedded: the labels' and the words' vectors were read back


def test_bad_targets_are_refused_with_the_value_named(index, labelled_run):
    with pytest.raises(InputError, match="feature 64 does not exist: this SAE has features 0..63"):
        index.search("q", up={64: 1.0})
    with pytest.raises(InputError, match="strength for 3 must be a finite number"):
        index.search("q", up={3: float("nan")})
    with pytest.raises(InputError, match="both raised and lowered"):
        index.search("q", up={3: 1.0}, down={3: 1.0})
    with pytest.raises(InputError, match="method must be one of"):
        index.search("q", method="multiply")
    with pytest.raises(InputError, match="k must be a positive integer"):
        index.search("q", k=0)
    with pytest.raises(InputError, match="the query is empty"):
        index.search("   ")
    # A feature that fires on none of the searched texts cannot be steered toward.
    sae = SparseAutoencoder.from_pretrained(labelled_run)
    few = SteerableIndex.build(sae, texts=index.text_of(range(4)))
    dead = int(np.flatnonzero(few.fire_counts == 0)[0])
    with pytest.raises(InputError, match=rf"feature\(s\) \[{dead}\] never fire on this corpus of 4 texts"):
        few.search("q", up={dead: 1.0})


def test_faiss_backend_finds_the_exact_neighbours(index, corpus_texts):
    pytest.importorskip("faiss")
    approx = SteerableIndex(index.sae, index._embeddings, texts=corpus_texts, row_ids=index.row_ids, backend="faiss")
    recall = []
    feature = int(np.argmax(index.fire_counts))
    for position in range(0, 240, 24):
        exact = index.search(corpus_texts[position], up={feature: 0.5}, k=10).rows()
        found = approx.search(corpus_texts[position], up={feature: 0.5}, k=10).rows()
        recall.append(len(set(exact) & set(found)) / 10)
    assert np.mean(recall) >= 0.95


def test_a_large_corpus_ranked_by_distance_is_searched_exactly_not_refused(index, corpus_texts, monkeypatch):
    """Above EXACT_SEARCH_MAX_ROWS the index picks FAISS by itself, which ranks by inner product
    only: a base model declaring euclidean (or manhattan) distance was refused there with
    "use backend='exact'", an option its caller never gave. Such an index searches exactly."""
    pytest.importorskip("faiss")
    from sbert_sae import search

    monkeypatch.setattr(search, "EXACT_SEARCH_MAX_ROWS", 100)  # this corpus (240 texts) counts as large
    far = SteerableIndex(index.sae, index._embeddings, texts=corpus_texts, row_ids=index.row_ids, similarity="euclidean")
    assert far.backend == "faiss"
    emb = np.array(index._embeddings, dtype=np.float32)
    result = far.search(corpus_texts[17], k=5)
    distance = np.linalg.norm(emb - emb[17], axis=1)
    assert result.rows() == index.row_ids[np.argsort(distance, kind="stable")[:5]].tolist()
    assert result.hits[0].score == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(InputError, match="use backend='exact'"):  # given by name, FAISS still says why it cannot
        SteerableIndex(index.sae, index._embeddings, texts=corpus_texts, row_ids=index.row_ids, similarity="euclidean", backend="faiss").search("q")


def test_codes_are_kept_beside_the_cache_and_reused(labelled_run, index):
    codes = index.codes
    files = {p.name for p in index.codes_dir.glob("codes-*.npy")}  # other SAEs labelled on this corpus keep theirs too
    assert {f"codes-{index.encoder_fingerprint()}.indices.npy", f"codes-{index.encoder_fingerprint()}.values.npy"} <= files
    again = SteerableIndex.from_run(labelled_run, device="cpu")
    assert isinstance(again.codes.values, np.memmap)  # read back, not recomputed
    assert np.array_equal(again.codes.indices, codes.indices) and np.array_equal(again.codes.values, codes.values)


def test_search_command(labelled_run, capsys, index):
    feature = int(np.argmax(index.fire_counts))
    assert main(["search", str(labelled_run), "cells and proteins", "--up", f"{feature}=0.8", "--top", "4", "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["hits"]) == 4 and out["up"] == {str(feature): 0.8} and out["cosine_to_query"] < 1
    assert all(set(h["steered"]) == {str(feature)} for h in out["hits"])
    assert main(["search", str(labelled_run), "cells and proteins", "--down", str(feature), "--top", "3", "-q"]) == 0
    text = capsys.readouterr().out
    assert f"down #{feature}" in text and "strength 0.5" in text and text.count(" row ") == 3
    assert main(["search", str(labelled_run), "q", "--up", "5=x", "-q"]) == 2
    assert "--up '5=x': 'x' is not a number" in capsys.readouterr().err
    assert main(["search", str(labelled_run), "q", "--clamp", "5", "-q"]) == 2
    assert "give the activation to set" in capsys.readouterr().err


def test_search_command_shows_a_family_as_one_target_at_its_strength(labelled_run, capsys, index, tmp_path):
    # `--down family:P --strength 0.6` printed each member as its own target at its share of
    # the strength ("down #12 ... strength 0.2", a line a member, 42 lines for a family of 42),
    # as if the strength asked for had not been used; the family is now one line at 0.6.
    import shutil

    from sbert_sae.families import FAMILIES_FILE

    run = tmp_path / "run"
    shutil.copytree(labelled_run, run)
    parent, *children = (int(f) for f in np.argsort(-index.fire_counts)[:3])
    family = Family(parent=parent, children=children, under=[parent, parent], depth=[1, 1])
    (run / FAMILIES_FILE).write_text(json.dumps({"families": [family.to_dict()]}))
    capsys.readouterr()
    assert main(["search", str(run), "cells and proteins", "--down", f"family:{parent}", "--strength", "0.6", "--top", "3", "-q"]) == 0
    text = capsys.readouterr().out
    assert f" down family:{parent} (3 features, their mean direction: #{parent} " in text
    assert text.count("strength") == 1 and "strength 0.6\n" in text
    assert re.search(rf"^family:{parent} \(any of its 3 features\) fires in \d of 3 hits$", text, re.M)
    assert not re.search(r"^#\d+ fires in", text, re.M)


def test_steering_evaluation_against_rewriting(index, tmp_path):
    from sbert_sae.steering_eval import comparison_table, draw_triples, evaluate_steering, plot_steering, success_at_cosine

    triples = draw_triples(index, 12, seed=1, density=(0.02, 0.3))
    assert len(triples) == 12
    for t in triples:
        own = np.asarray(index.codes.indices[t.position])[np.asarray(index.codes.values[t.position]) > 0]
        assert t.down in own and t.up not in own and index.sae.feature_labels[t.up]
    points = evaluate_steering(index, triples, strengths=(0.3, 1.0), repeats=(1, 5))
    by = {(p.method, p.strength): p for p in points}
    assert set(by) == {("none", 0.0), ("add", 0.3), ("add", 1.0), ("clamp", 0.3), ("clamp", 1.0), ("rewrite", 1.0), ("rewrite", 5.0)}
    assert by[("none", 0.0)].cosine == 1.0 and by[("none", 0.0)].up_share == 0.0  # up features fire in no unsteered hit
    assert by[("add", 1.0)].cosine < by[("add", 0.3)].cosine < 1.0
    assert by[("add", 1.0)].success > 0.3 and by[("add", 1.0)].down_share < by[("none", 0.0)].down_share
    assert by[("rewrite", 5.0)].cosine < by[("rewrite", 1.0)].cosine < 1.0
    # Interpolation at a cosine between two settings lies between their successes.
    mid = (by[("add", 0.3)].cosine + by[("add", 1.0)].cosine) / 2
    assert by[("add", 0.3)].success <= success_at_cosine(points, "add", mid) <= by[("add", 1.0)].success
    assert success_at_cosine(points, "add", 0.0) is None
    table = comparison_table(points)
    assert [row["label_repeats"] for row in table] == [1, 5] and all("clamp_success" in row for row in table)
    plot_steering(points, tmp_path / "steering.png")
    assert (tmp_path / "steering.png").stat().st_size > 10_000


def test_search_command_on_a_bare_sae_folder_needs_a_dataset(labelled_run, wiki_small, tmp_path, capsys):
    """An SAE folder without a training run (as saved by save_pretrained, or a Hub repo)
    searches the corpus given with --dataset, embedded with its base model."""
    bare = tmp_path / "bare"
    SparseAutoencoder.from_pretrained(labelled_run).save_pretrained(bare)
    assert main(["search", str(bare), "a painting", "-q"]) == 2
    assert f"{bare} is not a training run folder: pass --dataset" in capsys.readouterr().err
    assert main(["search", str(bare), "a painting", "--dataset", str(wiki_small), "--top", "3", "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["hits"]) == 3 and all(h["text"] for h in out["hits"])


def test_search_prints_a_texts_control_characters_as_escapes(labelled_run, tmp_path, capsys):
    # A corpus text holding an ANSI escape sequence, a bell or a NUL was printed as it was: the
    # terminal turned red (or beeped) at the hit. They are now shown as escapes; --json keeps the text.
    texts = ["Paintings of the \x1b[31mRenaissance\x1b[0m in Florence\x07 and Venice\x00.", "Cells divide by mitosis.", "A prime number has two divisors."]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert main(["search", str(labelled_run), "renaissance paintings", "--dataset", str(tmp_path / "corpus.jsonl"), "--top", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "\\x1b[31mRenaissance\\x1b[0m in Florence\\x07 and Venice\\x00." in out
    assert not any(c in out for c in "\x1b\x07\x00")
    assert main(["search", str(labelled_run), "renaissance paintings", "--dataset", str(tmp_path / "corpus.jsonl"), "--top", "1", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"][0]["text"] == texts[0]


def test_search_prints_a_labels_control_characters_as_escapes(labelled_run, tmp_path, capsys):
    # Labels were printed as they were: one of a published feature_labels.json may hold any characters.
    import shutil

    run = tmp_path / "run"
    shutil.copytree(labelled_run, run)
    labels = json.loads((run / "feature_labels.json").read_text())
    for entry in labels["features"].values():
        entry["label"] = "\x1b[31mred\x1b[0m"
    (run / "feature_labels.json").write_text(json.dumps(labels))
    assert main(["search", str(run), "renaissance paintings", "--top", "1", "--up", "0", "-q"]) == 0
    out = capsys.readouterr().out
    assert "\\x1b[31mred\\x1b[0m" in out and "\x1b" not in out


def test_a_query_that_is_no_valid_text_is_named_as_the_one_text_it_is():
    # A query is one string, but was embedded as a list of one: a lone surrogate in it was
    # refused as "texts[0] is not valid Unicode", naming a list the caller never passed.
    torch.manual_seed(0)
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=384, n_latents=64, k=4, base_model="sentence-transformers/all-MiniLM-L6-v2"))
    index = SteerableIndex.build(sae, embeddings=np.random.default_rng(0).normal(size=(20, 384)).astype(np.float32), device="cpu")
    with pytest.raises(InputError, match=r"^text is not valid Unicode \(surrogates not allowed at position 4: '\\ud800'\)"):
        index.query_vector("lung\ud800")
    assert sae._base_model is None  # refused before the base model loads
