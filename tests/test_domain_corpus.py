"""A domain's SAE (train --per-domain / --domain) is labelled, grouped into families, searched,
explored and published with activations on its own domain's texts when no --dataset is given:
all of them read the whole dataset, every domain of it, before (a maths SAE's labels chosen from
arts texts). A --dataset given is still read whole."""

import json

import pytest
import torch
from datasets import load_from_disk

from sbert_sae.cli import main

SMALL = ["--n-latents", "64", "-k", "4", "--epochs", "4", "--batch-size", "32", "-q", "--report-to", "none"]


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def per_domain_run(wiki_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("by-topic") / "run"
    assert run_cli("train", "--dataset", wiki_small, "--out", out, "--domain-column", "topic", "--per-domain", *SMALL) == 0
    return out


def test_a_domains_labels_come_from_its_own_texts_and_say_so(per_domain_run, wiki_small):
    topic = load_from_disk(str(wiki_small))["topic"]
    maths = per_domain_run / "mathematics"
    assert run_cli("label", maths, "-q", "--top-texts", "10") == 0
    labels = json.loads((maths / "feature_labels.json").read_text())
    rows = {r for entry in labels["features"].values() for kind in ("top", "quantile", "hard_negative") for r in (entry.get("examples") or {}).get(kind, [])}
    assert rows, "no example texts recorded"
    assert {topic[r] for r in rows} == {"Mathematics"}
    assert labels["summary"]["n_texts"] == 80  # of the 240 texts, the domain's
    assert labels["domain"] == {"column": "topic", "value": "Mathematics"}

    # The card says which texts the labels were scored on.
    from sbert_sae.hub import render_model_card

    card = str(render_model_card(maths, "org/maths"))
    assert "corpus texts of domain 'Mathematics' (column topic) kept out of labelling" in card, card


def test_a_domains_families_are_counted_on_its_own_texts(per_domain_run):
    arts = per_domain_run / "arts"
    assert run_cli("families", arts, "-q", "--threshold", "0.01", "--min-children", "1", "--min-out-degree", "1") == 0
    families = json.loads((arts / "families.json").read_text())
    assert families["summary"]["n_texts"] == 80
    assert families["domain"] == {"column": "topic", "value": "Arts"}


def test_an_explicit_dataset_is_read_whole(per_domain_run, wiki_small):
    arts = per_domain_run / "arts"
    assert run_cli("label", arts, "--dataset", wiki_small, "-q", "--top-texts", "10") == 0
    labels = json.loads((arts / "feature_labels.json").read_text())
    assert labels["domain"] is None
    assert labels["summary"]["n_texts"] == 240


def test_a_domains_search_and_explorer_show_its_own_texts(per_domain_run, wiki_small, capsys):
    from sbert_sae.explorer_data import Explorer

    topic = load_from_disk(str(wiki_small))["topic"]
    arts = per_domain_run / "arts"
    capsys.readouterr()
    # A query of another domain's: hits of the whole dataset would be its texts.
    assert run_cli("search", arts, "the derivative of a function and its integral", "--top", "20", "--json", "--device", "cpu") == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 20 and {topic[h["row"]] for h in hits} == {"Arts"}
    assert run_cli("search", arts, "the derivative of a function and its integral", "--top", "20", "--json", "--device", "cpu", "--dataset", wiki_small) == 0
    assert "Mathematics" in {topic[h["row"]] for h in json.loads(capsys.readouterr().out)["hits"]}

    explorer = Explorer.open(arts)
    corpus = explorer.corpus()
    assert len(corpus) == 80 and {topic[r] for r in corpus.row_ids.tolist()} == {"Arts"}
    assert "80 texts of " in explorer.corpus_status().message and "whose topic is 'Arts'" in explorer.corpus_status().message


def test_a_domains_published_activations_are_of_its_own_texts(per_domain_run, wiki_small, hub):
    from sbert_sae import SparseAutoencoder

    topic = load_from_disk(str(wiki_small))["topic"]
    biology = per_domain_run / "biology-and-health-sciences"
    assert run_cli("push", biology, "org/biology", "--activations", "-q") == 0
    acts = SparseAutoencoder.from_pretrained("org/biology").load_activations()
    assert len(acts) == 80 and {topic[r] for r in acts["id"]} == {"Biology and health sciences"}
    card = hub.files("org/biology-activations", repo_type="dataset")["README.md"].decode()
    assert "whose `topic` is `Biology and health sciences`" in card, card
    # The SAE's own card says so too, not "every corpus text" (the whole dataset's).
    card = hub.files("org/biology")["README.md"].decode()
    assert "The sparse activations of every corpus text whose `topic` is `Biology and health sciences` are in the dataset" in card, card

    # A card rendered without the data pushed (push_sae, push_to_hub) reads the run's record.
    from sbert_sae.hub import render_model_card

    card = str(render_model_card(per_domain_run / "mathematics", "org/maths", activations_repo="org/maths-activations"))
    assert "every corpus text whose `topic` is `Mathematics` are in the dataset" in card, card


def test_cache_list_names_the_domain_a_domains_codes_are_of(per_domain_run, capsys):
    """A domain's codes are kept under a hashed name of their own (`codes-<encoder>-domain-<hash>`):
    `cache list` says which domain's rows they hold, and `cache remove --codes` takes all of their files."""
    from sbert_sae import SparseAutoencoder
    from sbert_sae.families import corpus_arguments
    from sbert_sae.pipeline import cache_codes, load_sae_corpus
    from sbert_sae.search import SteerableIndex

    def domain_codes() -> list[tuple[dict, dict]]:
        capsys.readouterr()
        assert run_cli("cache", "list", "--json") == 0
        entries = json.loads(capsys.readouterr().out)["entries"]
        return [(e, c) for e in entries if e["kind"] == "embeddings" for c in e["codes"] if "-domain-" in c["digest"]]

    # Made by label and families (pipeline.cache_codes) and by search and the explorer (SteerableIndex).
    maths = per_domain_run / "mathematics"
    sae = SparseAutoencoder.from_pretrained(maths)
    _, _, cache = load_sae_corpus(sae, maths, corpus_arguments(maths, None), show_progress=False)
    cache_codes(sae, cache)
    assert len(SteerableIndex.from_run(per_domain_run / "arts", device="cpu").codes) == 80
    found = {c["domain"]["value"]: (e, c) for e, c in domain_codes() if c["domain"]}
    assert {"Mathematics", "Arts"} <= set(found), domain_codes()
    entry, codes = found["Mathematics"]
    assert codes["domain"] == {"column": "topic", "value": "Mathematics"} and codes["rows"] == 80
    assert run_cli("cache", "list") == 0
    out = capsys.readouterr().out
    assert f"codes {codes['digest']}: 80 x k=4, domain 'Mathematics' (column topic)," in out, out

    # --codes removes every file of the codes, their meta included; the vectors stay.
    folder = cache.path
    assert run_cli("cache", "remove", entry["id"], "--codes", "--yes") == 0
    assert not list(folder.glob("codes-*")) and (folder / "embeddings.npy").exists()
    assert domain_codes() == []


def test_a_domains_neighbour_overlap_searches_its_own_texts(per_domain_run, wiki_small):
    # metrics.json's neighbour_overlap_at_10 of a domain's SAE looked for each held-out text's
    # neighbours among every domain's texts, while its search and explorer read its own domain's.
    # Checked against a plain search over the domain's rows written here.
    import numpy as np

    from sbert_sae.embeddings import open_cache
    from sbert_sae.modeling_sbert_sae import SparseAutoencoder

    arts = per_domain_run / "arts"
    args = json.loads((arts / "training_args.json").read_text())
    cache = open_cache(args["embedding_cache"])
    topic = load_from_disk(str(wiki_small))["topic"]
    domain = np.array([i for i, row in enumerate(cache.row_ids) if topic[row] == "Arts"])
    heldout = cache.positions(np.array(json.loads((arts / "split.json").read_text())["heldout_row_ids"]))
    sae = SparseAutoencoder.from_pretrained(arts).eval()
    x = np.asarray(cache.embeddings, dtype=np.float32)
    x_hat = sae(torch.from_numpy(x[heldout])).reconstruction.detach().numpy()

    def nearest(queries, rows):
        unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
        scores = unit(queries) @ unit(x[rows]).T
        scores[heldout[:, None] == rows[None, :]] = -np.inf  # itself excluded
        return [set(rows[np.argsort(-s, kind="stable")[:10]]) for s in scores]

    expected = np.mean([len(a & b) / 10 for a, b in zip(nearest(x[heldout], domain), nearest(x_hat, domain))])
    recorded = json.loads((arts / "metrics.json").read_text())["neighbour_overlap_at_10"]
    assert recorded == pytest.approx(expected, abs=1e-9)
