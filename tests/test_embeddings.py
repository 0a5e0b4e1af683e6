"""Embedding a real dataset with the real MiniLM model, and the on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
    from sbert_sae.text_encoder import TextEncoder

    real_forward = TextEncoder._forward
    calls = {"n": 0}

    def failing_forward(self, features):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_forward(self, features)

    monkeypatch.setattr(TextEncoder, "_forward", failing_forward)
    with pytest.raises(KeyboardInterrupt):
        embed_dataset(wiki_40, "text", cache_dir=tmp_path, batch_size=8, chunk_size=8, show_progress=False)
    folder = next((tmp_path / "embeddings").iterdir())
    assert not (folder / "complete.json").exists()
    assert emb.read_json(folder / "progress.json")["ranges"] == [[0, 16]]

    seen = []

    def counting_forward(self, features):
        seen.extend(features["input_ids"].tolist())
        return real_forward(self, features)

    monkeypatch.setattr(TextEncoder, "_forward", counting_forward)
    cache = embed_dataset(wiki_40, "text", cache_dir=tmp_path, batch_size=8, chunk_size=8, show_progress=False)
    assert len(seen) == 38 - 16  # the finished chunks were not embedded again
    assert not list(cache.path.glob("progress*.json"))
    fresh = embed_dataset(wiki_40, "text", cache_dir=tmp_path / "fresh", batch_size=8, chunk_size=8, show_progress=False)
    np.testing.assert_allclose(cache.embeddings, fresh.embeddings, atol=1e-6)
    assert open_cache(cache.path).row_ids.tolist() == fresh.row_ids.tolist()


def test_max_rows_copies_the_rows_cached_for_the_whole_dataset_or_other_first_rows(wiki_40, tmp_path, monkeypatch):
    """--max-rows N is a cache entry of its own, which used to be embedded from scratch: 30 rows
    after 20 (or 20 after the whole dataset) embedded every row again. Rows cached for the same
    model, settings and column, for the whole dataset or another N, are now copied; only the
    rows none holds are embedded."""
    from sbert_sae.pipeline import DataArguments, load_and_embed
    from sbert_sae.text_encoder import TextEncoder

    real_forward = TextEncoder._forward
    embedded = []

    def counting_forward(self, features):
        embedded.append(len(features["input_ids"]))
        return real_forward(self, features)

    monkeypatch.setattr(TextEncoder, "_forward", counting_forward)

    def embed(max_rows):
        embedded.clear()
        data = DataArguments(dataset=str(tmp_path / "wiki40"), max_rows=max_rows, cache_dir=str(tmp_path / "cache"))
        _, cache = load_and_embed(data, show_progress=False)
        return cache, sum(embedded)

    first, n = embed(20)
    assert n == 18  # rows 0-19 but the bad rows 5 and 9
    more, n = embed(30)
    assert n == 10  # rows 20-29 only
    whole, n = embed(None)
    assert n == 10  # rows 30-39 but none of the 28 rows cached for the first 30
    assert more.meta["copied_from"] == {"cache": first.path.name, "rows": 18}

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although every row is cached")

    monkeypatch.setattr(emb, "load_sentence_transformer", no_model)
    fewer, n = embed(12)
    assert n == 0
    assert fewer.meta["n_rows"] == 10 and fewer.meta["prompt"] == whole.meta["prompt"]
    # Each is an entry of its own (its own folder, for the corpus codes kept there), finished,
    # holding the rows of its first N in row order.
    assert len({c.path for c in (first, more, whole, fewer)}) == 4
    for cache in (first, more, fewer):
        assert (cache.path / "complete.json").exists() and not list(cache.path.glob("progress*.json"))
        m = len(cache.row_ids)
        assert cache.row_ids.tolist() == whole.row_ids[:m].tolist()
        np.testing.assert_allclose(cache.embeddings, whole.embeddings[:m], atol=2e-5)


def test_text_encoder_matches_encode_across_chunks_and_precisions(minilm, wiki_rows):
    from sbert_sae.text_encoder import EncodeSettings, TextEncoder

    texts = [r["text"] for r in wiki_rows[:24]] + ["  padded  ", "short", "Crème brûlée " * 80]
    expected = minilm.encode(texts, batch_size=7)
    encoder = TextEncoder(minilm, EncodeSettings(max_batch_tokens=1024, super_batch=5))
    chunks = list(encoder.stream([texts[:10], [], texts[10:]]))
    assert [len(c) for c in chunks] == [10, 0, len(texts) - 10]
    assert encoder._backend is not None  # MiniLM's tokenisation is reproduced exactly
    np.testing.assert_allclose(np.concatenate(chunks), expected, atol=2e-5)
    # A half-precision encoder works on a copy: the caller's model keeps its fp32 weights.
    half = TextEncoder(minilm, EncodeSettings(precision="bf16"))
    assert next(minilm.parameters()).dtype == torch.float32
    vectors = half.encode(texts)
    cosine = (vectors * expected).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() > 0.99, cosine.min()


def test_fast_tokenisation_pads_any_rows_as_the_model_does(minilm, wiki_rows):
    """The padded batches, for rows in any order (the encoder takes them longest first), equal
    the model's own `preprocess` of those texts, type ids included whether read or known zero."""
    from sbert_sae.text_encoder import _BackendTokenizer

    texts = [r["text"] for r in wiki_rows[:60]] + ["  padded  ", "x", "Crème brûlée " * 80]
    backend = _BackendTokenizer(minilm, texts[:8])
    assert backend.read_types is False  # BERT's single-segment type ids are zeros
    rng = np.random.default_rng(0)
    for read_types in (False, True):
        backend.read_types = read_types
        tokenised = backend.tokenize(texts)
        assert (tokenised[2] is not None) == read_types
        for size in (1, 5, 17, len(texts)):
            rows = rng.permutation(len(texts))[:size]
            ours = backend.pad(*tokenised, rows)
            theirs = (getattr(minilm, "preprocess", None) or minilm.tokenize)([texts[i] for i in rows])  # preprocess: sentence-transformers >= 5.4
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                assert torch.equal(ours[key], theirs[key].to(ours[key].dtype)), (key, size)


def test_text_encoder_falls_back_to_the_models_own_tokenisation(minilm, wiki_rows, monkeypatch):
    from sbert_sae import text_encoder

    def mismatched(self, texts):
        lengths, ids, types = real(self, texts)
        return lengths, np.where(ids == 102, 103, ids), types  # a tokenizer that disagrees

    real = text_encoder._BackendTokenizer.tokenize
    monkeypatch.setattr(text_encoder._BackendTokenizer, "tokenize", mismatched)
    texts = [r["text"] for r in wiki_rows[:6]]
    encoder = text_encoder.TextEncoder(minilm)
    np.testing.assert_allclose(encoder.encode(texts), minilm.encode(texts), atol=2e-5)
    assert encoder._backend is None


def test_text_encoder_refuses_non_strings(minilm):
    from sbert_sae.errors import InputError
    from sbert_sae.text_encoder import EncodeSettings, TextEncoder

    with pytest.raises(InputError, match=r"texts\[1\] is int"):
        TextEncoder(minilm).encode(["fine", 3])
    with pytest.raises(InputError, match="precision"):
        TextEncoder(minilm, EncodeSettings(precision="fp8"))


def test_embedding_shards_resume_with_another_number_of_processes(tmp_path):
    # Ranges finished by two processes are what a later single-process run skips.
    assert emb._merge([[8, 16], [0, 8], [20, 24]]) == [[0, 16], [20, 24]]
    assert emb._subtract(0, 30, [(0, 16), (20, 24)]) == [(16, 20), (24, 30)]
    assert emb._subtract(10, 18, [(0, 16), (20, 24)]) == [(16, 18)]
    assert emb._subtract(0, 5, []) == [(0, 5)]


def test_accelerate_launch_embeds_in_two_processes_like_one(wiki_40, tmp_path, accelerate_launch_two):
    """`accelerate launch` (2 CPU processes, gloo): each embeds its half into one cache, in row order."""
    import subprocess

    folder = tmp_path / "data"
    wiki_40.save_to_disk(str(folder))
    launch = [*accelerate_launch_two("--multi_gpu"), "-m", "sbert_sae"]
    result = subprocess.run([*launch, "embed", "--dataset", str(folder), "--cache-dir", str(tmp_path / "two"), "--quiet"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("embeddings of dim 384") == 1  # the main process reports
    two = open_cache(next((tmp_path / "two" / "embeddings").iterdir()))
    assert two.meta["processes"] == 2
    one = embed_dataset(wiki_40, "text", cache_dir=tmp_path / "one", show_progress=False)
    assert two.row_ids.tolist() == one.row_ids.tolist()
    np.testing.assert_allclose(two.embeddings, one.embeddings, atol=2e-5)


@pytest.mark.parametrize("name", ["embeddings.npy", "meta.json"])
def test_a_damaged_finished_cache_is_embedded_again_not_read(wiki_40, tmp_path, name):
    """A finished cache whose files were cut short (a disk that filled, a copy that stopped)
    used to be opened as it was: the run died with numpy's 'mmap length is greater than file
    size' or a JSONDecodeError, naming no file. It is now named and embedded again."""
    first = embed_dataset(wiki_40, "text", cache_dir=tmp_path, batch_size=16, show_progress=False)
    expected = np.array(first.embeddings)
    path = first.path / name
    del first
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(emb.DatasetError, match=f"embedding cache .* is damaged: {name}"):
        open_cache(path.parent)
    again = embed_dataset(wiki_40, "text", cache_dir=tmp_path, batch_size=16, show_progress=False)
    assert again.path == path.parent
    np.testing.assert_allclose(again.embeddings, expected, atol=1e-6)
    assert again.row_ids.tolist() == [i for i in range(40) if i not in (5, 9)]
