"""Embedding a real dataset with the real MiniLM model, and the on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest

from sbert_sae import embeddings as emb
from sbert_sae.data import load_text_dataset
from sbert_sae.embeddings import embed_dataset, open_cache


@pytest.fixture
def wiki_40(tmp_path, wiki_rows):
    from datasets import Dataset

    rows = [dict(r) for r in wiki_rows[:40]]
    rows[5]["text"] = ""  # a bad row, to be skipped and counted
    rows[9]["text"] = None
    folder = tmp_path / "wiki40"
    Dataset.from_list(rows).save_to_disk(str(folder))
    return load_text_dataset(str(folder))


def test_vectors_equal_sentence_transformer_encode(wiki_40, minilm, tmp_path):
    cache = embed_dataset(wiki_40, "text", cache_dir=tmp_path, batch_size=16, chunk_size=16, show_progress=False)
    assert cache.embeddings.shape == (38, 384)
    assert cache.row_ids.tolist() == [i for i in range(40) if i not in (5, 9)]
    texts = [wiki_40[int(i)]["text"] for i in cache.row_ids]
    expected = minilm.encode(texts, batch_size=16)
    np.testing.assert_allclose(cache.embeddings, expected, atol=2e-5)
    cosine = (cache.embeddings * expected).sum(1) / np.linalg.norm(expected, axis=1) / np.linalg.norm(cache.embeddings, axis=1)
    assert cosine.min() > 0.99999
    assert cache.meta["skipped"] == {"empty": 1, "missing": 1}


def test_second_run_embeds_nothing(wiki_40, tmp_path, monkeypatch):
    first = embed_dataset(wiki_40, "text", cache_dir=tmp_path, show_progress=False)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although the embeddings are cached")

    monkeypatch.setattr(emb, "load_sentence_transformer", no_model)
    second = embed_dataset(wiki_40, "text", cache_dir=tmp_path, show_progress=False)
    assert second.path == first.path
    assert np.array_equal(np.asarray(second.embeddings), np.asarray(first.embeddings))
    assert isinstance(second.embeddings, np.memmap)
    # Another column or model setting is another cache entry.
    other = emb.cache_key("sentence-transformers/all-MiniLM-L6-v2", None, "fp", "title", {})
    assert other != emb.cache_key("sentence-transformers/all-MiniLM-L6-v2", None, "fp", "text", {})


def test_interrupted_embedding_resumes_at_its_last_chunk(wiki_40, tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer

    real_encode = SentenceTransformer.encode
    calls = {"n": 0}

    def failing_encode(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_encode(self, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "encode", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        embed_dataset(wiki_40, "text", cache_dir=tmp_path, batch_size=8, chunk_size=8, show_progress=False)
    folder = next((tmp_path / "embeddings").iterdir())
    assert not (folder / "complete.json").exists()
    assert emb.read_json(folder / "progress.json")["rows_done"] == 16

    seen = []

    def counting_encode(self, texts, *args, **kwargs):
        seen.extend(texts)
        return real_encode(self, texts, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "encode", counting_encode)
    cache = embed_dataset(wiki_40, "text", cache_dir=tmp_path, batch_size=8, chunk_size=8, show_progress=False)
    assert len(seen) == 38 - 16  # the finished chunks were not embedded again
    fresh = embed_dataset(wiki_40, "text", cache_dir=tmp_path / "fresh", batch_size=8, chunk_size=8, show_progress=False)
    np.testing.assert_allclose(cache.embeddings, fresh.embeddings, atol=1e-6)
    assert open_cache(cache.path).row_ids.tolist() == fresh.row_ids.tolist()
