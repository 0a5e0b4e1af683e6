"""Search queries of an asymmetric model (e5, bge, nomic, Qwen3-Embedding: a "query" prompt for
queries, a document prompt for the texts searched), on the real MiniLM weights given e5's
prompts, over real Wikipedia text. The SAE's weights are random: unsteered search ranks by the
base model's embeddings alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sbert_sae import InputError, SparseAutoencoder, SteerableIndex
from sbert_sae.base_model import DEFAULT_MODEL, resolve_model_path
from sbert_sae.cli import _query_arguments, build_parser, main
from sbert_sae.configuration_sbert_sae import SparseAutoencoderConfig
from sbert_sae.hub import _embedding_summary

PROMPTS = {"query": "query: ", "passage": "passage: "}
QUERY = "which organ pumps blood through the body"


@pytest.fixture(scope="module")
def asymmetric_model(tmp_path_factory):
    """(folder, model): all-MiniLM-L6-v2 saved with e5's prompts and no default prompt."""
    from sentence_transformers import SentenceTransformer

    folder = tmp_path_factory.mktemp("asymmetric") / "minilm-e5-prompts"
    SentenceTransformer(resolve_model_path(DEFAULT_MODEL), device="cpu", prompts=PROMPTS).save(str(folder))
    return str(folder), SentenceTransformer(str(folder), device="cpu")


@pytest.fixture(scope="module")
def rows(wiki_rows):
    """24 short lead paragraphs, for speed."""
    return sorted(wiki_rows, key=lambda r: len(r["text"]))[:24]


@pytest.fixture(scope="module")
def texts(rows):
    return [r["text"] for r in rows]


def _sae(base_model: str, corpus_kwargs: dict | None) -> SparseAutoencoder:
    torch.manual_seed(0)
    config = SparseAutoencoderConfig(d_in=384, n_latents=64, k=4, base_model=base_model, base_model_kwargs=corpus_kwargs)
    return SparseAutoencoder(config).eval()


def _unit(vector) -> np.ndarray:
    v = np.asarray(torch.as_tensor(vector).float().reshape(-1))
    return v / np.linalg.norm(v)


def test_a_query_is_embedded_with_the_models_query_prompt(asymmetric_model, texts):
    """A corpus embedded as documents ("passage: ") is searched with the query embedded as
    `encode(query, prompt_name="query")` (sentence-transformers' `encode_query`); the texts
    themselves (labelling, inspection, `encode_texts`) stay embedded as the corpus was."""
    folder, model = asymmetric_model
    sae = _sae(folder, {"prompt_name": "passage"})
    index = SteerableIndex.build(sae, texts=texts, device="cpu")
    expected = model.encode(QUERY, prompt_name="query")
    np.testing.assert_allclose(_unit(index.query_vector(QUERY)), _unit(expected), atol=1e-5)
    assert index.query_encoding.prompt == "query: " and not index.query_encoding.like_corpus
    np.testing.assert_allclose(sae.embed_queries([QUERY])[0].numpy(), expected, atol=1e-5)
    if hasattr(model, "encode_query"):  # sentence-transformers >= 5
        np.testing.assert_allclose(sae.embed_queries([QUERY])[0].numpy(), model.encode_query(QUERY), atol=1e-5)
    # Ranked as the model ranks its query against its passages.
    passages = model.encode(texts, prompt_name="passage")
    order = np.argsort(-(passages @ expected / np.linalg.norm(passages, axis=1)), kind="stable")[:5]
    assert [h.row for h in index.search(QUERY, k=5).hits] == order.tolist()
    # Corpus-like texts keep the corpus' prompt: the SAE was trained on those vectors.
    np.testing.assert_allclose(sae.embed_texts([QUERY])[0].numpy(), model.encode(QUERY, prompt_name="passage"), atol=1e-5)


def test_the_query_prompt_can_be_chosen(asymmetric_model, texts):
    folder, model = asymmetric_model
    sae = _sae(folder, {"prompt_name": "passage"})
    vectors = sae.embed_texts(texts)
    like = SteerableIndex(sae, vectors, texts=texts, query_like_corpus=True)
    assert like.query_encoding.prompt == "passage: "
    np.testing.assert_allclose(_unit(like.query_vector(QUERY)), _unit(model.encode(QUERY, prompt_name="passage")), atol=1e-5)
    bare = SteerableIndex(sae, vectors, texts=texts, query_prompt="")
    assert bare.query_encoding.prompt is None
    np.testing.assert_allclose(_unit(bare.query_vector(QUERY)), _unit(model.encode(QUERY, prompt="")), atol=1e-5)
    with pytest.raises(InputError, match=r"the query's prompt_name 'qurey' is not one of the model's prompts: the model's prompts are \[('document', )?'passage', 'query'\]"):
        SteerableIndex(sae, vectors, texts=texts, query_prompt_name="qurey").search(QUERY)
    with pytest.raises(InputError, match="give one of query_prompt_name, query_prompt or query_like_corpus, not query_prompt_name and query_like_corpus"):
        SteerableIndex(sae, vectors, texts=texts, query_prompt_name="query", query_like_corpus=True)


def test_a_symmetric_model_or_a_corpus_not_embedded_as_documents_embeds_queries_as_before(asymmetric_model, texts, minilm):
    """MiniLM (no prompts) and a corpus embedded without the model's document prompt (an e5
    model run without --prompt-name passage): the query is embedded as the corpus was."""
    folder, model = asymmetric_model
    symmetric = _sae(DEFAULT_MODEL, None)
    index = SteerableIndex(symmetric, symmetric.embed_texts(texts), texts=texts)
    assert index.query_encoding.prompt is None and index.query_encoding.like_corpus
    np.testing.assert_allclose(_unit(index.query_vector(QUERY)), _unit(minilm.encode(QUERY)), atol=1e-6)
    assert _embedding_summary(symmetric.config.to_dict(), DEFAULT_MODEL) == ""
    unprompted = _sae(folder, None)
    index = SteerableIndex(unprompted, unprompted.embed_texts(texts), texts=texts)
    assert index.query_encoding.prompt is None and "not as the model embeds documents" in index.query_encoding.reason
    np.testing.assert_allclose(_unit(index.query_vector(QUERY)), _unit(model.encode(QUERY, prompt="")), atol=1e-5)


@pytest.fixture(scope="module")
def saved(asymmetric_model, rows, tmp_path_factory):
    """(SAE folder, corpus folder): an SAE of the asymmetric model whose texts were embedded as passages."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("query-prompts")
    Dataset.from_list([dict(r) for r in rows]).save_to_disk(str(root / "corpus"))
    _sae(asymmetric_model[0], {"prompt_name": "passage"}).save_pretrained(root / "sae")
    return root / "sae", root / "corpus"


@pytest.fixture(scope="module")
def best(asymmetric_model, texts):
    """best(prompt_name) -> the rows of the 3 passages nearest to QUERY embedded with that prompt."""
    model = asymmetric_model[1]
    passages = model.encode(texts, prompt_name="passage")

    def rows(prompt_name: str) -> list[int]:
        q = _unit(model.encode(QUERY, prompt_name=prompt_name))
        return np.argsort(-(passages @ q / np.linalg.norm(passages, axis=1)), kind="stable")[:3].tolist()

    return rows


def test_the_search_command_embeds_the_query_with_the_query_prompt(saved, best, capsys):
    sae_folder, data = saved
    search = ["search", str(sae_folder), QUERY, "--dataset", str(data), "--top", "3", "-q"]
    assert main([*search, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [h["row"] for h in out["hits"]] == best("query") and out["query_prompt"] == "query: "
    assert main([*search, "--json", "--query-like-corpus"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["query_prompt"] == "passage: " and [h["row"] for h in out["hits"]] == best("passage")
    assert main(search) == 0
    assert "query embedded with prompt 'query: ': the model's 'query' prompt" in capsys.readouterr().out
    assert main([*search, "--query-prompt-name", "qurey"]) == 2
    err = capsys.readouterr().err
    assert "'qurey' is not one of the model's prompts" in err and "'passage', 'query'" in err
    with pytest.raises(SystemExit) as exited:
        main([*search, "--query-prompt-name", "query", "--query-like-corpus"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_explorers_search_embeds_the_query_with_the_query_prompt(saved, best, tmp_path):
    from sbert_sae.explorer_data import Explorer

    sae_folder, data = saved
    explorer = Explorer.open(sae_folder, dataset=str(data), cache_dir=str(tmp_path / "cache"))
    out = explorer.search_data(QUERY, 3)
    assert [h["row"] for h in out["hits"]] == best("query") and out["query_prompt"] == "query: "
    steered = explorer.search_data(QUERY, 3, {str(out["query_features"][0]["feature"]): 0.0})
    assert [h["row"] for h in steered["hits"]] == best("query")
    # `sbert-sae explore --query-like-corpus` (or --query-prompt-name, --query-prompt) chooses.
    args = build_parser().parse_args(["explore", str(sae_folder), "--dataset", str(data), "--query-like-corpus"])
    like = Explorer.open(sae_folder, dataset=str(data), cache_dir=str(tmp_path / "cache"), **_query_arguments(args))
    out = like.search_data(QUERY, 3)
    assert [h["row"] for h in out["hits"]] == best("passage") and out["query_prompt"] == "passage: "
    with pytest.raises(InputError, match="'qurey' is not one of the model's prompts"):
        # refused as the explorer opens (from the model's saved prompts), not by its first search
        Explorer.open(sae_folder, dataset=str(data), cache_dir=str(tmp_path / "cache"), query_prompt_name="qurey")
    pytest.importorskip("gradio")
    from sbert_sae.explorer import _query_prompt_note

    note = _query_prompt_note(explorer.search_index().query_encoding)
    assert "Query embedded with the prompt <code>query: </code>: the model&#x27;s &#x27;query&#x27; prompt" in note


def test_the_model_card_gives_the_query_call(asymmetric_model):
    folder, _ = asymmetric_model
    summary = _embedding_summary(_sae(folder, {"prompt_name": "passage"}).config.to_dict(), "intfloat/e5-small-v2")
    assert summary.splitlines() == [
        "- embeddings: `SentenceTransformer(\"intfloat/e5-small-v2\").encode(texts, prompt_name='passage')`, as `sae.encode_texts` makes them",
        "- search queries: `SentenceTransformer(\"intfloat/e5-small-v2\").encode(queries, prompt_name='query')`, as `sae.embed_queries` and `sbert-sae search` make them",
    ]
