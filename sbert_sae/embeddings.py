"""Embed a dataset's text column once, cache the vectors on disk, read them memory-mapped.

The cache key covers the model (id, revision, encode settings), the dataset's fingerprint
and the text column, so a second run with the same inputs embeds nothing. Vectors are
written chunk by chunk into a `.npy` file that is read memory-mapped: a corpus larger than
memory streams through, and a killed embedding run resumes at its last finished chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base_model import DEFAULT_MODEL, embedding_dimension, load_sentence_transformer
from .data import TextRows, dataset_fingerprint, find_text_rows
from .errors import DatasetError, InputError
from .utils import read_json, write_json

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """`$SBERT_SAE_CACHE`, else `$XDG_CACHE_HOME/sbert-sae`, else `~/.cache/sbert-sae`."""
    if os.environ.get("SBERT_SAE_CACHE"):
        return Path(os.environ["SBERT_SAE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sbert-sae"


@dataclass
class EmbeddingCache:
    """Embeddings of a dataset's valid text rows.

    Attributes:
        path: the cache folder.
        embeddings: (n_rows, dim) float32, memory-mapped.
        row_ids: (n_rows,) int64: `embeddings[i]` is the text of dataset row `row_ids[i]`.
        meta: model, dataset fingerprint, column, settings and skipped-row counts.
    """

    path: Path
    embeddings: np.ndarray
    row_ids: np.ndarray
    meta: dict

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def positions(self, row_ids: np.ndarray) -> np.ndarray:
        """Positions in `embeddings` of the given dataset row ids (all must be cached)."""
        pos = np.searchsorted(self.row_ids, row_ids)
        pos = np.clip(pos, 0, len(self.row_ids) - 1)
        if len(row_ids) and not np.array_equal(self.row_ids[pos], row_ids):
            missing = row_ids[self.row_ids[pos] != row_ids][:5].tolist()
            raise DatasetError(f"rows {missing} have no cached embedding (their text was skipped)")
        return pos


def cache_key(model_id: str, revision: str | None, fingerprint: str, text_column: str, encode_kwargs: dict) -> str:
    spec = {
        "version": CACHE_VERSION,
        "model": model_id,
        "revision": revision,
        "dataset": fingerprint,
        "column": text_column,
        "encode": encode_kwargs,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]


def embed_dataset(
    ds,
    text_column: str = "text",
    model_id: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    chunk_size: int = 8192,
    device: str | None = None,
    on_bad_text: str = "skip",
    encode_kwargs: dict | None = None,
    show_progress: bool = True,
    text_rows: TextRows | None = None,
) -> EmbeddingCache:
    """Embed `ds[text_column]` with a sentence-transformers model, or read the cached result.

    The vectors are exactly `SentenceTransformer.encode(texts, **encode_kwargs)`'s, in row
    order; rows whose text is missing, not a string or empty are skipped and counted
    (or refused with `on_bad_text="error"`).
    """
    encode_kwargs = dict(encode_kwargs or {})
    if batch_size < 1 or chunk_size < 1:
        raise InputError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    fingerprint = dataset_fingerprint(ds)
    key = cache_key(model_id, revision, fingerprint, text_column, encode_kwargs)
    folder = Path(cache_dir or default_cache_dir()) / "embeddings" / key
    if (folder / "complete.json").exists():
        return open_cache(folder)

    rows = text_rows or find_text_rows(ds, text_column, on_bad=on_bad_text)
    folder.mkdir(parents=True, exist_ok=True)
    progress_file = folder / "progress.json"
    model = load_sentence_transformer(model_id, revision=revision, device=device)
    dim = embedding_dimension(model)
    if dim is None:
        dim = int(model.encode(["probe"], **encode_kwargs).shape[1])
    n = len(rows.row_ids)
    vectors_file = folder / "embeddings.npy"
    done = 0
    if progress_file.exists() and vectors_file.exists():
        progress = read_json(progress_file)
        if progress.get("n_rows") == n and progress.get("dim") == dim:
            done = int(progress["rows_done"])
    if done == 0:
        vectors = np.lib.format.open_memmap(vectors_file, mode="w+", dtype=np.float32, shape=(n, dim))
    else:
        vectors = np.load(vectors_file, mmap_mode="r+")
        logger.info("resuming embedding at row %d of %d", done, n)
    np.save(folder / "row_ids.npy", rows.row_ids)

    from tqdm.auto import tqdm

    column = ds.select_columns([text_column])
    with tqdm(total=n, initial=done, desc="embedding", unit="text", disable=not show_progress) as bar:
        for start in range(done, n, chunk_size):
            stop = min(start + chunk_size, n)
            texts = column.select(rows.row_ids[start:stop])[text_column]
            out = np.empty((stop - start, dim), dtype=np.float32)
            # Longest first, in slices of a few batches: padding stays small, as in
            # `encode`, and the progress bar moves between slices.
            order = np.argsort([-len(t) for t in texts], kind="stable")
            step = batch_size * 8
            for s0 in range(0, len(order), step):
                idx = order[s0 : s0 + step]
                out[idx] = model.encode(
                    [texts[i] for i in idx],
                    batch_size=batch_size,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                    **encode_kwargs,
                )
                bar.update(len(idx))
            if not np.isfinite(out).all():
                bad = rows.row_ids[start:stop][~np.isfinite(out).all(axis=1)][:5].tolist()
                raise DatasetError(f"the model produced NaN/inf embeddings for dataset rows {bad}")
            vectors[start:stop] = out
            vectors.flush()
            write_json(progress_file, {"n_rows": n, "dim": dim, "rows_done": stop})
    del vectors

    meta = {
        "model": model_id,
        "revision": revision,
        "dataset_fingerprint": fingerprint,
        "text_column": text_column,
        "encode_kwargs": encode_kwargs,
        "n_rows": n,
        "n_dataset_rows": len(ds),
        "dim": dim,
        "skipped": rows.skipped,
        "skipped_examples": rows.examples,
    }
    write_json(folder / "meta.json", meta)
    write_json(folder / "complete.json", {"n_rows": n})
    progress_file.unlink(missing_ok=True)
    return open_cache(folder)


def open_cache(folder: str | os.PathLike) -> EmbeddingCache:
    """Open a finished embedding cache folder (memory-mapped, read-only)."""
    folder = Path(folder)
    meta = read_json(folder / "meta.json")
    embeddings = np.load(folder / "embeddings.npy", mmap_mode="r", allow_pickle=False)
    row_ids = np.load(folder / "row_ids.npy", allow_pickle=False)
    if embeddings.shape[0] != len(row_ids):
        raise DatasetError(f"embedding cache {folder} is inconsistent: {embeddings.shape[0]} vectors, {len(row_ids)} row ids")
    return EmbeddingCache(path=folder, embeddings=embeddings, row_ids=row_ids, meta=meta)
