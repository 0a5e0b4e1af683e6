"""Feature families: the paper's recipe on a hand-made co-occurrence matrix whose tree is
known, and on a small SAE trained and labelled on real Wikipedia text."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from sbert_sae import SparseAutoencoder
from sbert_sae.activations import SparseActivations, encode_corpus
from sbert_sae.cli import main
from sbert_sae.families import (
    Family,
    FamilyArguments,
    _ratios,
    _values_at,
    block_ratio,
    compute_families,
    cooccurrence,
    deduplicate,
    edges,
    families_document,
    family_label,
    feature_families,
    find_families,
    load_families,
    normalized_cooccurrence,
    permuted_block_ratios,
)


# ------------------------------------------------------------ a tree known by hand
def _hand_made(extra_counts: dict | None = None, extra_pairs: dict | None = None) -> sp.csr_matrix:
    """Counts C of 14 features (diagonal: texts each fires on) over 1000 texts.

    0 (100 texts) is the broad feature; 1 (40) lies mostly inside it, with 5 and 6 inside 1;
    2, 3, 4 lie inside 0 only; 7 and 8 co-occur with 0 a little more than with 1. 9 heads
    10 and 11 (too few to make a family) and touches 12 and 13 below the 0.1 threshold.
    """
    counts = {0: 100, 1: 40, 2: 20, 3: 20, 4: 20, 5: 10, 6: 10, 7: 10, 8: 10, 9: 30, 10: 10, 11: 10, 12: 10, 13: 10, **(extra_counts or {})}
    pairs = {(0, 1): 30, (0, 2): 15, (0, 3): 15, (0, 4): 15, (1, 5): 8, (1, 6): 8, (0, 5): 4, (0, 6): 4,
             (0, 7): 8, (0, 8): 8, (1, 7): 6, (1, 8): 6, (9, 10): 8, (9, 11): 8, (9, 12): 1, (9, 13): 1, **(extra_pairs or {})}  # fmt: skip
    c = np.zeros((len(counts), len(counts)), dtype=np.int64)
    for f, n in counts.items():
        c[f, f] = n
    for (i, j), n in pairs.items():
        c[i, j] = c[j, i] = n
    return sp.csr_matrix(c)


def _shape(fam: Family) -> tuple:
    return fam.parent, fam.children, fam.under, fam.depth, fam.round


def test_hand_made_cooccurrence_gives_the_expected_families():
    fams = find_families(_hand_made(), n_texts=1000)
    # Round 0: the tree is 0 -> 1, 2, 3, 4, 7, 8 and 1 -> 5, 6 (5 and 6 co-occur more with 1
    # than with 0; 7 and 8 more with 0 than with 1); children strongest edge first.
    # Round 1, without 0: 1 -> 5, 6, 7, 8. 9 has only 2 children above the threshold.
    assert [_shape(f) for f in fams] == [
        (0, [1, 5, 6, 7, 8, 2, 3, 4], [0, 1, 1, 0, 0, 0, 0, 0], [1, 2, 2, 1, 1, 1, 1, 1], 0),
        (1, [5, 6, 7, 8], [1, 1, 1, 1], [1, 1, 1, 1], 1),
    ]
    assert fams[0].weights[:3] == pytest.approx([30 / 41, 8 / 11, 8 / 11])


def test_a_family_result_shows_its_summary_not_every_family():
    # A notebook cell ending in run_families(...) or compute_families(...) showed the dataclass'
    # repr: every family with its members' labels, and the co-occurrence matrix (runs/wiki's 879
    # families: about a MB of text).
    from sbert_sae.families import FamilyResult

    cooc = _hand_made()
    fams = find_families(cooc, n_texts=1000)
    result = FamilyResult(families=fams, summary={"n_families": 2, "block_ratio": 3.5}, settings={}, cooccurrence=cooc, n_texts=1000)
    shown = repr(result)
    assert "Family(" not in shown and "cooccurrence=" not in shown
    assert shown == "FamilyResult(2 families over 1000 texts, block_ratio=3.5; .families, .summary hold the rest)"
    assert result.families == fams


def test_each_constant_of_the_recipe_changes_the_families():
    c = _hand_made()
    parents = lambda **kw: [f.parent for f in find_families(c, 1000, FamilyArguments(**kw))]  # noqa: E731
    assert parents(removal_rounds=0) == [0]  # no second tree
    assert parents(max_jaccard=0.4) == [0]  # {5, 6, 7, 8} overlaps {1..8} with Jaccard 0.5
    assert parents(min_out_degree=2, min_children=2) == [0, 1, 9]
    assert parents(threshold=0.05) == [0, 9, 1]  # 9 -> 12, 13 (C_norm 1/11) become edges: 4 children
    assert parents(min_children=9) == []
    # 0 fires on 10% of texts: over 400 texts it is too dense, and 1 heads the family of the first tree
    fams = find_families(c, 400)
    assert [_shape(f) for f in fams] == [(1, [5, 6, 7, 8], [1, 1, 1, 1], [1, 1, 1, 1], 0)]


def test_children_with_children_head_families_of_their_own():
    """1 gets a third child (14): inside 0's family it heads one too, unless descend is off."""
    c = _hand_made({14: 10}, {(1, 14): 8})
    got = find_families(c, 1000, FamilyArguments(min_children=3, removal_rounds=0))
    assert [(f.parent, sorted(f.children)) for f in got] == [(0, [1, 2, 3, 4, 5, 6, 7, 8, 14]), (1, [5, 6, 14])]
    got = find_families(c, 1000, FamilyArguments(min_children=3, removal_rounds=0, descend=False))
    assert [f.parent for f in got] == [0]


def test_deduplicate_keeps_the_larger_of_overlapping_families():
    fam = lambda p, kids: Family(parent=p, children=kids, under=[p] * len(kids), depth=[1] * len(kids))  # noqa: E731
    a, b, c, d = fam(0, [1, 2, 3, 4, 5]), fam(9, [1, 2, 3, 4]), fam(8, [4, 5, 6, 7]), fam(7, [20, 21, 22, 23])
    assert [f.parent for f in deduplicate([b, a, c, d], 0.6)] == [0, 7, 8]  # b: 4/5 > 0.6; c: 2/7
    twins = [fam(3, [1, 2, 3, 4]), fam(2, [1, 2, 3, 4])]
    assert [f.parent for f in deduplicate(twins, 0.6)] == [2]  # one of equal twins stays


def test_cooccurrence_from_sparse_codes_matches_the_dense_firing_matrix():
    rng = np.random.default_rng(0)
    n_texts, k, n = 3000, 6, 1200  # more features than one block of _gram's rows
    indices = np.stack([rng.choice(n, k, replace=False) for _ in range(n_texts)]).astype(np.int32)
    values = rng.random((n_texts, k)).astype(np.float32)
    values[rng.random((n_texts, k)) < 0.2] = 0  # selected by top-k but not firing
    acts = SparseActivations(values, indices, n)
    firing = np.zeros((n_texts, n))
    np.put_along_axis(firing, indices.astype(np.int64), values > 0, axis=1)
    expected = firing.T @ firing
    for method in ("scipy", "dense", "merge"):
        got = cooccurrence(acts, chunk_rows=700, method=method)
        assert got.shape == (n, n) and np.array_equal(got.toarray(), expected), method
        assert got.dtype == np.int32 and got.has_sorted_indices, method  # int64 doubled the values' memory
        assert all((np.diff(got.indices[a:b]) > 0).all() for a, b in zip(got.indptr[:-1], got.indptr[1:])), method
    norm = normalized_cooccurrence(got).toarray()
    np.fill_diagonal(expected, 0)
    assert norm == pytest.approx(expected / (firing.sum(0) + 1)[:, None])


def test_block_ratios_read_off_the_counts_equal_those_of_the_normalised_matrix():
    """`compute_families` reads C_norm off the int32 counts, a row's values times
    `normalization` (never a float64 copy of the whole matrix): the same values to the bit,
    and the same ratios, whatever rows the lookup's buffer holds."""
    from sbert_sae.families import normalization

    rng = np.random.default_rng(4)
    n_texts, k, n = 2500, 6, 400
    indices = np.stack([rng.choice(n, k, replace=False) for _ in range(n_texts)]).astype(np.int32)
    values = rng.random((n_texts, k)).astype(np.float32)
    acts = SparseActivations(values, indices, n)
    cooc = cooccurrence(acts)
    norm = normalized_cooccurrence(cooc)
    scale = normalization(cooc)
    rows, cols = rng.integers(0, n, 6000), rng.integers(0, n, 6000)
    rows, cols = rows[rows != cols], cols[rows != cols]
    for block_rows in (None, 7):
        assert np.array_equal(_values_at(cooc, rows, cols, block_rows=block_rows) * scale[rows], _values_at(norm, rows, cols))
    blocks = np.full((n, 5), -1)
    for column in range(5):
        chosen = rng.choice(n, 150, replace=False)
        blocks[chosen, column] = rng.integers(0, 12, 150)
    expected = _ratios(norm, blocks)
    assert None not in expected
    assert _ratios(cooc, blocks, scale, chunk_entries=100) == pytest.approx(expected, rel=1e-12)
    assert _ratios(cooc, blocks, scale) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("chunk_entries", [1, 250, 1 << 22])
def test_edges_are_the_pairs_above_the_threshold_in_row_order_whatever_the_chunk(chunk_entries):
    """The graph's edges, read a block of rows at a time, are every pair i < j whose
    C[i, j] / (min(C[i, i], C[j, j]) + 1) reaches the threshold, in row, then column order."""
    rng = np.random.default_rng(1)
    n_texts, k, n = 2000, 5, 60
    indices = np.stack([rng.choice(n, k, replace=False) for _ in range(n_texts)]).astype(np.int32)
    values = rng.random((n_texts, k)).astype(np.float32)
    values[rng.random((n_texts, k)) < 0.2] = 0
    cooc = cooccurrence(SparseActivations(values, indices, n))
    dense = cooc.toarray()
    counts = np.diag(dense)
    weight = dense / (np.minimum(counts[:, None], counts[None, :]) + 1.0)
    for threshold in (0.07, 0.1):
        want_i, want_j = np.nonzero(np.triu(weight >= threshold, k=1) & (dense > 0))
        i, j, w = edges(cooc, threshold, chunk_entries=chunk_entries)
        assert 0 < len(i) < n * (n - 1) // 2
        assert np.array_equal(i, want_i) and np.array_equal(j, want_j)
        assert i.dtype == j.dtype == np.int32 and w.dtype == np.float64  # int64 ids were a third of the edges' memory
        assert np.array_equal(w, weight[want_i, want_j])


def test_counting_holds_the_counts_about_once(monkeypatch):
    """The scipy count made every block of rows of the product and then `vstack`ed them:
    the product twice at once (525 MB for 254 MB at n=49,152 on 10k texts). The blocks now
    go into the result's arrays as they come: the same matrix, made with at most a third
    more memory than it holds (allocations traced by tracemalloc: numpy reports to it)."""
    import tracemalloc

    import sbert_sae.families as families

    monkeypatch.setattr(families, "usable_cores", lambda: 2)  # blocks ahead of the copy: 4 of 40, whatever the machine
    rng = np.random.default_rng(6)
    n_texts, k, n = 6000, 16, 20000
    indices = np.stack([rng.choice(n, k, replace=False) for _ in range(n_texts)]).astype(np.int32)
    acts = SparseActivations(rng.random((n_texts, k)).astype(np.float32), indices, n)
    a = families._binary_rows(acts.values, acts.indices, n)
    expected = (a.T @ a).tocsr()
    expected.sort_indices()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        got = cooccurrence(acts)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    held = got.data.nbytes + got.indices.nbytes + got.indptr.nbytes
    assert got.indices.dtype == got.indptr.dtype == np.int32 and len(got.indices) == got.nnz == expected.nnz
    assert np.array_equal(got.indptr, expected.indptr) and np.array_equal(got.indices, expected.indices) and np.array_equal(got.data, expected.data)
    assert peak < 1.6 * held, (peak, held)  # was 2.15x


def _old_spanning_tree(graph, counts, eligible):
    """`spanning_tree` as it was: the eligible edges copied, a COO -> CSR conversion, csgraph's copy."""
    from scipy.sparse.csgraph import minimum_spanning_tree

    i, j, w = graph
    keep = eligible[i] & eligible[j]
    i, j, w = i[keep], j[keep], w[keep]
    if len(w) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    n = len(counts)
    tree = minimum_spanning_tree(sp.csr_matrix((2.0 - w, (i, j)), shape=(n, n))).tocoo()
    a, b, weight = tree.row.astype(np.int64), tree.col.astype(np.int64), 2.0 - tree.data
    a_first = (counts[a] > counts[b]) | ((counts[a] == counts[b]) & (a < b))
    return np.where(a_first, a, b), np.where(a_first, b, a), weight


def test_spanning_tree_is_the_same_tree_made_without_copies():
    """The tree is built from the eligible edges put straight into csgraph's CSR arrays
    (the edges held three more times before: the families' peak at n=49,152): the same
    tree, edge for edge, ties among equal weights broken as before, for edges in row order
    (as `edges` gives them) or not; and the tree's memory is about that of one int32/float64
    copy of the edges, not four."""
    import tracemalloc

    from sbert_sae.families import spanning_tree

    rng = np.random.default_rng(7)
    n_texts, k, n = 3000, 12, 3000
    indices = np.stack([rng.choice(n, k, replace=False) for _ in range(n_texts)]).astype(np.int32)
    cooc = cooccurrence(SparseActivations(rng.random((n_texts, k)).astype(np.float32), indices, n))
    counts = np.asarray(cooc.diagonal(), dtype=np.int64)
    graph = edges(cooc, 0.05)
    assert graph[0].dtype == np.int32 and len(graph[0]) > 50_000  # many ties: the weights are few distinct ratios
    for eligible in (counts > 0, (counts > 0) & (rng.random(n) < 0.7)):
        want = _old_spanning_tree(graph, counts, eligible)
        got = spanning_tree(graph, counts, eligible)
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
        shuffled = rng.permutation(len(graph[0]))
        moved = tuple(x[shuffled] for x in graph)
        assert all(np.array_equal(g, w) for g, w in zip(spanning_tree(moved, counts, eligible), _old_spanning_tree(moved, counts, eligible)))
    assert all(len(x) == 0 for x in spanning_tree(graph, counts, np.zeros(n, dtype=bool)))
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        spanning_tree(graph, counts, counts > 0)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert peak < 32 * len(graph[0]), peak / len(graph[0])  # bytes an edge; was 62 with int64 edges


def test_family_label_is_the_parents_label_and_the_keywords_children_share():
    entry = lambda label, *kws: {"label": label, "keywords": [{"keyword": k} for k in kws]}  # noqa: E731
    parent = entry("football, club", "football", "club", "sport")
    children = [entry("goalkeeper", "league", "known"), entry("striker", "league", "known"), entry("stadium", "league", "known", "ball"), entry("coach", "ball")]
    label, keywords = family_label(parent, children, document_frequency={"league": 3, "known": 500, "ball": 2}, n_documents=1000)
    assert keywords[:3] == ["league", "ball", "known"]  # "known", in half of all features, ranks last
    assert label == "football, club: league, ball, known"
    assert family_label(None, children)[0] == "known, league, ball"  # without frequencies: by votes
    assert family_label(None, [entry("x"), entry("y")]) == (None, [])


# ------------------------------------------------------------ real text
@pytest.fixture(scope="module")
def real(labelled_run, wiki_small):
    """The labelled SAE's sparse codes of the Wikipedia texts, their dense firing matrix
    (made independently, for checking), and the families."""
    from sbert_sae.pipeline import DataArguments, load_and_embed

    sae = SparseAutoencoder.from_pretrained(labelled_run)
    _, cache = load_and_embed(DataArguments(dataset=str(wiki_small)), show_progress=False)
    acts = encode_corpus(sae, cache.embeddings)
    firing = np.zeros((len(acts), acts.n_latents))
    np.put_along_axis(firing, acts.indices.astype(np.int64), acts.values > 0, axis=1)
    return sae, acts, firing, compute_families(acts, label_data=sae.label_data)


def test_real_families_have_the_papers_structure(real):
    sae, acts, firing, result = real
    c = firing.T @ firing
    counts = np.diag(c)
    c_norm = c / (counts + 1)[:, None]
    args = FamilyArguments()
    assert len(result.families) >= 3, result.summary
    for fam in result.families:
        assert len(fam.children) >= args.min_children and len(set(fam.features)) == len(fam.features)
        for child, up, weight in zip(fam.children, fam.under, fam.weights):
            assert up in fam.features[: fam.features.index(child)]  # its tree parent comes before it
            assert c_norm[child, up] >= args.threshold  # P(tree parent fires | child fires)
            assert c_norm[child, up] == pytest.approx(weight)
            assert counts[up] >= counts[child]  # denser parent
        assert counts[fam.parent] >= counts[fam.children].max()
        assert counts[fam.parent] <= args.max_density * len(acts)
    for i, a in enumerate(result.families):
        for b in result.families[i + 1 :]:
            x, y = set(a.children), set(b.children)
            assert len(x & y) / len(x | y) <= args.max_jaccard


def test_families_are_blocks_of_the_cooccurrence_matrix(real):
    sae, acts, firing, result = real
    s = result.summary
    assert s["block_ratio"] > 1.5 and s["block_ratio"] > s["permuted_block_ratio_max"], s
    assert abs(s["permuted_block_ratio_mean"] - 1) < 0.3, s
    # the ratio, recomputed from the dense matrix
    c = firing.T @ firing
    c_norm = c / (np.diag(c) + 1)[:, None]
    block = {}  # each feature in the first (largest) family holding it
    for b, fam in enumerate(result.families):
        for f in fam.features:
            block.setdefault(f, b)
    members = sorted(block)
    inside = np.array([[block[i] == block[j] and i != j for j in members] for i in members])
    among = ~np.eye(len(members), dtype=bool)
    sub = c_norm[np.ix_(members, members)]
    expected = sub[inside].mean() / sub[among & ~inside].mean()
    assert s["block_ratio"] == pytest.approx(expected, rel=1e-3)
    assert block_ratio(normalized_cooccurrence(result.cooccurrence), result.families) == pytest.approx(expected)


def test_block_ratios_match_a_dense_computation_for_any_assignment():
    """`_ratios` reads the sparse matrix at within-block pairs only (a binary search per pair)
    and sums the rest with one product: it must equal the ratio from the dense matrix, for
    several assignments at once, with empty rows and rows longer than the search's steps."""
    rng = np.random.default_rng(3)
    n = 300
    dense = rng.random((n, n)) * (rng.random((n, n)) < 0.3)
    dense[:40] = 0  # empty rows
    dense[41, :] = rng.random(n)  # a full row
    np.fill_diagonal(dense, rng.random(n))  # a diagonal is never counted
    norm = sp.csr_matrix(dense)
    rows, cols = rng.integers(0, n, 5000), rng.integers(0, n, 5000)
    assert np.array_equal(_values_at(norm, rows, cols), dense[rows, cols])
    blocks = np.full((n, 6), -1)
    for column in range(6):
        chosen = rng.choice(n, 120, replace=False)
        blocks[chosen, column] = rng.integers(0, 9, 120)
    expected = []
    for column in blocks.T:
        same = (column[:, None] == column[None, :]) & (column[:, None] >= 0) & ~np.eye(n, dtype=bool)
        among = (column[:, None] >= 0) & (column[None, :] >= 0) & ~np.eye(n, dtype=bool)
        expected.append(dense[same].mean() / dense[among & ~same].mean())
    assert _ratios(norm, blocks) == pytest.approx(expected, rel=1e-10)
    assert _ratios(norm, np.full((n, 1), -1)) == [None]  # no blocks at all


def test_permuted_ratios_keep_the_block_sizes(real):
    sae, acts, firing, result = real
    norm = normalized_cooccurrence(result.cooccurrence)
    eligible = np.ones(norm.shape[0], dtype=bool)
    ratios = permuted_block_ratios(norm, result.families, eligible, permutations=5, seed=1)
    assert len(ratios) == 5 and len(set(ratios)) == 5  # five different draws
    assert ratios == pytest.approx(permuted_block_ratios(norm, result.families, eligible, permutations=5, seed=1), rel=1e-12)  # seeded


def test_real_families_carry_their_members_labels(real):
    sae, _, _, result = real
    labels = sae.feature_labels
    for fam in result.families:
        assert fam.labels == [labels[f] for f in fam.features]
        if fam.parent_label:
            assert fam.label.startswith(fam.parent_label)
    assert any(fam.keywords for fam in result.families)


def test_families_json_round_trip(real, tmp_path):
    from sbert_sae.utils import write_json

    sae, _, _, result = real
    write_json(tmp_path / "families.json", families_document(result, sae, dataset="wiki"))
    back = load_families(tmp_path)
    assert [_shape(f) for f in back] == [_shape(f) for f in result.families]
    for a, b in zip(back, result.families):
        assert (a.label, a.parent_label, a.child_labels, a.keywords) == (b.label, b.parent_label, b.child_labels, b.keywords)
        assert a.weights == pytest.approx(b.weights, abs=1e-4)
    doc = json.loads((tmp_path / "families.json").read_text())
    assert doc["summary"]["n_families"] == len(result.families) and doc["settings"]["threshold"] == 0.1
    child = doc["families"][0]["children"][0]
    assert set(child) >= {"feature", "label", "under", "depth", "cooccurrence", "n_firing", "density"}


# ------------------------------------------------------------ the command and the API
@pytest.fixture
def run_copy(labelled_run, tmp_path):
    folder = tmp_path / "sae"
    shutil.copytree(labelled_run, folder)
    return folder


def test_families_command_writes_files_and_a_summary(run_copy, real, capsys, monkeypatch):
    import sbert_sae.activations as activations

    def no_encoding(*args, **kwargs):
        raise AssertionError("the corpus codes kept by `sbert-sae label` should be read, not computed again")

    monkeypatch.setattr(activations, "encode_corpus", no_encoding)
    assert main(["families", str(run_copy), "-q"]) == 0  # the corpus of training_args.json
    out = capsys.readouterr().out
    doc = json.loads((run_copy / "families.json").read_text())
    assert f"{len(doc['families'])} families among" in out and "block ratio" in out and "largest families:" in out
    assert [f["parent"]["feature"] for f in doc["families"]] == [f.parent for f in real[3].families]
    for name in ("families_cooccurrence.png", "family_graph.png"):
        assert (run_copy / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the SAE reads the saved families back
    sae = SparseAutoencoder.from_pretrained(run_copy)
    assert [_shape(f) for f in sae.feature_families()] == [_shape(f) for f in real[3].families]


def test_families_from_embeddings_and_without_labels(run_copy, real, wiki_small, capsys):
    sae, acts, _, result = real
    (run_copy / "feature_labels.json").unlink()
    bare = SparseAutoencoder.from_pretrained(run_copy)
    fams = feature_families(bare, activations=acts)
    assert [_shape(f) for f in fams] == [_shape(f) for f in result.families]
    assert all(f.label is None and set(f.labels) == {None} for f in fams)
    assert main(["families", str(run_copy), "--dataset", str(wiki_small), "-q", "--plot-family", str(fams[0].parent)]) == 0
    assert "(no labels)" in capsys.readouterr().out
    assert json.loads((run_copy / "families.json").read_text())["families"][0]["label"] is None


def test_a_plot_cut_short_by_a_full_disk_is_never_left_as_the_plot(run_copy, monkeypatch):
    """The plots were drawn straight into their files: a run stopped or out of disk while
    drawing left a cut-off PNG under the plot's name (which `push` then published). Half of
    each PNG is written here before the disk is 'full': no file under a plot's name is cut."""
    import errno
    import io

    from matplotlib.figure import Figure

    real = Figure.savefig

    def fills_the_disk(self, fname, *args, **kwargs):
        data = io.BytesIO()
        real(self, data, *args, **kwargs)
        Path(fname).write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fname))

    monkeypatch.setattr(Figure, "savefig", fills_the_disk)
    assert main(["families", str(run_copy), "-q"]) != 0
    assert json.loads((run_copy / "families.json").read_text())["families"]
    for name in ("families_cooccurrence.png", "family_graph.png"):
        assert not (run_copy / name).exists()
    assert not [p.name for p in run_copy.iterdir() if p.name.endswith(".tmp")]


def test_no_families_found_writes_an_empty_file_and_says_why(run_copy, capsys):
    (run_copy / "family_graph.png").write_bytes(b"old")
    assert main(["families", str(run_copy), "-q", "--threshold", "0.99"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no families found") and "--threshold" in out
    assert json.loads((run_copy / "families.json").read_text())["families"] == []
    assert not (run_copy / "family_graph.png").exists() and not (run_copy / "families_cooccurrence.png").exists()


def test_an_empty_result_keeps_the_families_found_before(run_copy, capsys):
    assert main(["families", str(run_copy), "-q"]) == 0
    before = {name: (run_copy / name).read_bytes() for name in ("families.json", "families_cooccurrence.png", "family_graph.png")}
    n = len(json.loads(before["families.json"])["families"])
    assert n > 0
    capsys.readouterr()
    assert main(["families", str(run_copy), "-q", "--threshold", "0.99"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no families found") and f"kept the {n} families already in" in out
    assert {name: (run_copy / name).read_bytes() for name in before} == before


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["families", "/nonexistent/run"], "is not a folder"),
        (["families", "{run}", "--plot-family", "999"], "heads no family"),
        (["families", "{run}", "--max-jaccard", "1.5"], "--max-jaccard must be in [0, 1], got 1.5"),
        (["families", "{bare}"], "has no training_args.json"),
    ],
)
def test_families_command_refuses_bad_input_in_one_line(argv, fragment, run_copy, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(run_copy / name, bare / name)
    argv = [a.format(run=run_copy, bare=bare) for a in argv]
    assert main([*argv, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_published_activations_are_read_as_top_k_arrays_and_bad_rows_are_named(real):
    from datasets import Dataset

    from sbert_sae.activations import published_activations
    from sbert_sae.errors import DatasetError

    sae = real[0]
    n, k = sae.config.n_latents, sae.config.k
    rows = {"id": [0, 1], "text": ["a", "b"], "indices": [[3, 1], [n - 1]], "values": [[0.5, 0.25], [1.0]]}
    acts = published_activations(sae, Dataset.from_dict(rows))
    assert acts.values.shape == acts.indices.shape == (2, k) and acts.n_latents == n
    assert acts.indices[0, :2].tolist() == [3, 1] and acts.values[1, :2].tolist() == [1.0, 0.0]
    assert acts.fire_counts()[[1, 3, n - 1]].tolist() == [1, 1, 1]
    rows["indices"][1] = [n]
    with pytest.raises(DatasetError, match=rf"row 1 of its 'indices' column names a feature outside 0..{n - 1}"):
        published_activations(sae, Dataset.from_dict(rows))
    with pytest.raises(DatasetError, match="no 'values' column"):
        published_activations(sae, Dataset.from_dict({"indices": [[1]]}))


@pytest.mark.parametrize("command", [["families", "RUN"], ["compare", "RUN_A", "RUN_B"]])
def test_a_top_count_below_one_is_refused_naming_the_option(command, capsys):
    """families --top 0 or --top -3 printed no family and compare no shared pair, with no word
    of why: a count of things to print must be positive (as search --top's is)."""
    from sbert_sae.cli import main

    for value in ("0", "-3"):
        with pytest.raises(SystemExit) as exit:
            main([*command, "--top", value])
        assert exit.value.code == 2
        err = capsys.readouterr().err
        assert f"--top: expected a positive integer, got '{value}'" in err, err
