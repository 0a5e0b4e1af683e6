"""Search and the neighbour-overlap metric rank by the similarity the base model declares
(`similarity_fn_name`): a dot-product model's neighbours by dot, a cosine model's by cosine."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sbert_sae import SparseAutoencoder, SteerableIndex
from sbert_sae.base_model import DEFAULT_MODEL, resolve_model_path, sae_similarity, saved_similarity
from sbert_sae.cli import main
from sbert_sae.configuration_sbert_sae import SparseAutoencoderConfig
from sbert_sae.evaluation import evaluate, neighbour_overlap


@pytest.fixture(scope="module")
def dot_model(tmp_path_factory):
    """MiniLM's weights with no Normalize module, declaring "dot": its embeddings' lengths
    vary (1.7 to 5.4 on Wikipedia paragraphs), so dot and cosine rank texts otherwise."""
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers >= 5.4
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # older ones
        from sentence_transformers.models import Pooling, Transformer
    folder = tmp_path_factory.mktemp("dot-model") / "minilm-dot"
    modules = [Transformer(resolve_model_path(DEFAULT_MODEL), max_seq_length=128), Pooling(384, pooling_mode="mean")]
    SentenceTransformer(modules=modules, device="cpu", similarity_fn_name="dot").save(str(folder))
    return folder


@pytest.fixture(scope="module")
def corpus(dot_model, wiki_small):
    """(texts, their embeddings by the dot model as it ranks them)."""
    from datasets import load_from_disk
    from sentence_transformers import SentenceTransformer

    texts = load_from_disk(str(wiki_small))["text"]
    model = SentenceTransformer(str(dot_model), device="cpu")
    return texts, model.encode(texts, batch_size=64, convert_to_numpy=True)


def _sae(base_model, normalize: str = "l2", k: int = 24) -> SparseAutoencoder:
    """An SAE whose features are the coordinate axes, both signs: a code keeps an input's `k`
    largest coordinates, so its reconstruction is near it but not it (no training needed)."""
    config = SparseAutoencoderConfig(d_in=384, n_latents=768, k=k, normalize=normalize, base_model=str(base_model) if base_model else None)
    sae = SparseAutoencoder(config)
    axes = torch.cat([torch.eye(384), -torch.eye(384)])
    with torch.no_grad():
        sae.W_enc.copy_(axes)
        sae.W_dec.copy_(axes)
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    return sae.eval()


def _top(scores: np.ndarray, k: int) -> list[int]:
    return np.argsort(-scores, kind="stable")[:k].tolist()


def test_the_dot_model_ranks_otherwise_than_cosine(dot_model, corpus):
    texts, emb = corpus
    assert saved_similarity(str(dot_model)) == "dot" and saved_similarity(DEFAULT_MODEL) == "cosine"
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    differ = [i for i in range(40) if set(_top(emb @ emb[i], 10)) != set(_top(unit @ unit[i], 10))]
    assert len(differ) > 20  # measured on 1000 data/wiki texts: 70% of the top-10 shared, 1% of queries alike


@pytest.mark.parametrize("normalize", ["l2", "none"])
def test_search_ranks_by_the_base_models_dot_product(dot_model, corpus, normalize):
    from sentence_transformers import SentenceTransformer

    texts, emb = corpus
    sae = _sae(dot_model, normalize)
    index = SteerableIndex.build(sae, embeddings=emb, texts=texts, device="cpu")
    assert index.similarity == "dot"
    model = SentenceTransformer(str(dot_model), device="cpu")
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    checked = 0
    for query in ("a painting in oil", "the cell membrane", "prime numbers and their proofs"):
        q = model.encode([query], convert_to_numpy=True)[0]
        by_dot, by_cosine = _top(emb @ q, 10), _top(unit @ (q / np.linalg.norm(q)), 10)
        result = index.search(query, k=10)
        assert [h.row for h in result.hits] == by_dot
        # The scores are the model's own: model.similarity of the query and each hit.
        expected = model.similarity(torch.from_numpy(q[None]), torch.from_numpy(emb[by_dot]))[0].tolist()
        assert [h.score for h in result.hits] == pytest.approx(expected, rel=1e-4)
        checked += by_dot != by_cosine
    assert checked  # a query whose dot ranking is not its cosine ranking

    # A steered query is ranked by its direction against the texts' embeddings as the model
    # made them; its score is the dot product at the query's own length.
    feature = int(np.argmax(np.abs(emb).sum(0)))
    steered = index.search("a painting in oil", up={feature: 0.5}, k=10)
    st = steered.steering
    q_len = float(np.linalg.norm(model.encode(["a painting in oil"], convert_to_numpy=True)[0]))
    assert float(st.model_vector.norm()) == pytest.approx(q_len * float(st.vector.norm()) / float(st.original.norm()), rel=1e-5)
    scores = emb @ st.model_vector.numpy()
    assert [h.row for h in steered.hits] == _top(scores, 10)
    assert [h.score for h in steered.hits] == pytest.approx(np.sort(scores)[::-1][:10].tolist(), rel=1e-4)


def test_a_cosine_model_and_an_sae_without_one_still_rank_by_cosine(corpus, labelled_run):
    texts, emb = corpus
    assert sae_similarity(_sae(None)) == "cosine"
    assert SteerableIndex.from_run(labelled_run, device="cpu").similarity == "cosine"
    index = SteerableIndex.build(_sae(None), embeddings=emb, texts=texts, device="cpu")
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    q = emb[5]
    assert [h.row for h in index.search(q, k=10).hits] == _top(unit @ (q / np.linalg.norm(q)), 10)


@torch.no_grad()
def _overlap_by_hand(sae, emb, similarity: str, k: int = 10) -> float:
    """neighbour_overlap written out: each text's k nearest others by `similarity`, found with
    the text and with its reconstruction (at the text's length)."""
    x = torch.from_numpy(emb)
    prepared = sae.prepare_input(x)
    values, indices = sae.encode_topk(x)
    x_hat = sae.decode_topk(values, indices) * (x.norm(dim=1, keepdim=True) / prepared.norm(dim=1, keepdim=True))
    shared = 0
    for i in range(len(emb)):
        found = []
        for query in (x[i], x_hat[i]):
            scores = (emb @ query.numpy()) if similarity == "dot" else (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (query.numpy() / np.linalg.norm(query.numpy()))
            scores[i] = -np.inf
            found.append(set(_top(scores, k)))
        shared += len(found[0] & found[1])
    return shared / k / len(emb)


def test_neighbour_overlap_ranks_by_the_base_models_similarity_and_says_which(dot_model, corpus):
    _, emb = corpus
    sae = _sae(dot_model)
    positions = np.arange(len(emb))
    by_dot, by_cosine = _overlap_by_hand(sae, emb, "dot"), _overlap_by_hand(sae, emb, "cosine")
    assert by_dot != pytest.approx(by_cosine, abs=1e-3)
    assert neighbour_overlap(sae, emb, positions) == pytest.approx(by_dot, abs=1e-9)
    assert neighbour_overlap(sae, emb, positions, similarity="cosine") == pytest.approx(by_cosine, abs=1e-9)
    metrics, _ = evaluate(sae, emb, positions[:40], positions)
    assert metrics["neighbour_similarity"] == "dot" and metrics["neighbour_overlap_at_10"] == pytest.approx(by_dot, abs=1e-9)
    from sbert_sae.hub import _metrics_table

    assert "(their neighbours: among all corpus texts, ranked by dot as the base model ranks)" in _metrics_table(metrics)  # the card
    # An SAE of a cosine model (no base model here) is measured as before, by cosine.
    plain = _sae(None)
    metrics, _ = evaluate(plain, emb, positions[:40], positions)
    assert metrics["neighbour_similarity"] == "cosine" and metrics["neighbour_overlap_at_10"] == pytest.approx(_overlap_by_hand(plain, emb, "cosine"), abs=1e-9)
    assert "(their neighbours: among all corpus texts)" in _metrics_table(metrics)


def test_search_command_says_which_similarity_ranked(dot_model, wiki_small, labelled_run, tmp_path, capsys):
    folder = tmp_path / "dot-sae"
    _sae(dot_model).save_pretrained(folder)
    assert main(["search", str(folder), "a painting", "--dataset", str(wiki_small), "--top", "3", "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["similarity"] == "dot" and len(out["hits"]) == 3
    assert main(["search", str(folder), "a painting", "--dataset", str(wiki_small), "--top", "3", "-q"]) == 0
    assert "ranked by dot, the base model's similarity" in capsys.readouterr().out
    assert main(["search", str(labelled_run), "a painting", "--top", "3", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["similarity"] == "cosine"


def test_the_explorers_search_names_the_similarity(dot_model, wiki_small, tmp_path):
    pytest.importorskip("gradio")  # the explorer's page
    from sbert_sae.explorer import Steering
    from sbert_sae.explorer_data import Explorer
    from sbert_sae.pipeline import DataArguments

    folder = tmp_path / "dot-sae"
    _sae(dot_model).save_pretrained(folder)
    sae = SparseAutoencoder.from_pretrained(folder)
    explorer = Explorer(sae, str(folder), data=DataArguments(dataset=str(wiki_small)), data_given=True)
    data = explorer.search_data("a painting", 3)
    assert data["similarity"] == "dot"
    result = explorer.search_index().search("a painting", k=3)
    assert [h["row"] for h in data["hits"]] == [h.row for h in result.hits]
    html = Steering(explorer).hits("Steered", result.hits, set(), [])
    assert f"1. dot {result.hits[0].score:.3f}" in html and " cos " not in html
