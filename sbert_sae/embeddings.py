"""Embed a dataset's text column once, cache the vectors on disk, read them memory-mapped.

The cache key covers the model (id, revision, encode settings, and the default prompt and
truncate_dim the model saves), the dataset's fingerprint and the text column, so a second
run with the same inputs embeds nothing and a setting that changes the vectors is another
entry. Vectors are written chunk by chunk into a `.npy` file that is read memory-mapped: a
corpus larger than memory streams through, and a killed embedding run resumes at its last
finished chunk. The first rows of a dataset (`--max-rows`) are an entry of their own, whose
rows already cached for the whole dataset or for another count of its first rows, with the
same model and settings, are copied from that entry rather than embedded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base_model import DEFAULT_MODEL, encode_defaults, load_sentence_transformer, saved_encode_defaults
from .data import TextRows, column_values, dataset_fingerprint, find_text_rows
from .errors import DatasetError, InputError
from .text_encoder import EncodeSettings, TextEncoder, check_encode_kwargs, resolve_precision
from .utils import pause_point, read_json, write_json

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


@dataclass
class _Location:
    folder: Path
    family: str
    fingerprint: str
    device: str | None
    precision: str
    model: object = None


def _locate(ds, text_column, model_id, revision, cache_dir, device, precision, encode_kwargs, accelerator, prefix_of) -> _Location:
    """Where `embed_dataset` keeps `ds`'s embeddings, with the device and precision it embeds with."""
    import torch

    from .base_model import pick_device

    if accelerator is not None and accelerator.num_processes > 1 and device is None:
        device = str(accelerator.device)  # each process on its own GPU
    precision = resolve_precision(precision, torch.device(pick_device(device)))
    fingerprint = dataset_fingerprint(ds)
    model = None
    model_defaults = saved_encode_defaults(model_id, revision)
    if model_defaults is None:  # its files are not here yet: loading the model fetches them
        model = load_sentence_transformer(model_id, revision=revision, device=device)
        model_defaults = encode_defaults(model)
    # The model's saved default prompt and truncate_dim change its vectors as the settings
    # do; they enter the key only when the model has them, so that the keys of models
    # without them (and the caches made for those) stay as they were.
    key_settings = dict(
        encode_kwargs,
        **{f"model_{name}": value for name, value in model_defaults.items()},
        **({"precision": precision} if precision != "fp32" else {}),
    )
    key = cache_key(model_id, revision, fingerprint, text_column, key_settings)
    # The caches of one dataset's first rows (any number of them, or all) share a family:
    # the key of the whole dataset, which is also the whole dataset's own key.
    family = key if prefix_of is None else cache_key(model_id, revision, dataset_fingerprint(prefix_of), text_column, key_settings)
    folder = Path(cache_dir or default_cache_dir()) / "embeddings" / key
    return _Location(folder=folder, family=family, fingerprint=fingerprint, device=device, precision=precision, model=model)


def cache_path(
    ds,
    text_column: str = "text",
    model_id: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | None = None,
    precision: str = "auto",
    encode_kwargs: dict | None = None,
    accelerator=None,
) -> Path:
    """The folder `embed_dataset` with these arguments keeps `ds`'s embeddings in, whether
    they are embedded yet or not (its name identifies them); nothing is embedded. The
    model is loaded only when its files are not on this machine yet."""
    encode_kwargs = check_encode_kwargs(encode_kwargs)
    return _locate(ds, text_column, model_id, revision, cache_dir, device, precision, encode_kwargs, accelerator, None).folder


def embed_dataset(
    ds,
    text_column: str = "text",
    model_id: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    chunk_size: int = 16384,
    device: str | None = None,
    precision: str = "auto",
    max_batch_tokens: int | None = None,
    on_bad_text: str = "skip",
    encode_kwargs: dict | None = None,
    show_progress: bool = True,
    text_rows: TextRows | None = None,
    accelerator=None,
    prefix_of=None,
    source: dict | None = None,
) -> EmbeddingCache:
    """Embed `ds[text_column]` with a sentence-transformers model, or read the cached result.

    The vectors are `SentenceTransformer.encode(texts, **encode_kwargs)`'s, in row order
    (equal within float error in fp32; in fp16, the default on a GPU, within cosine
    0.9999); rows whose text is missing, not a string or empty are skipped and counted
    (or refused with `on_bad_text="error"`). Under `accelerate launch` (pass the
    `accelerator`) every process embeds its own contiguous share of the rows into the
    same file; a killed run, with any number of processes, resumes where it stopped.

    Args:
        batch_size: most texts in one forward pass (None: 1024; the token budget decides).
        chunk_size: rows written and recorded as done at a time (what a resume keeps).
        precision: auto (fp16 on a GPU, else fp32), fp32, fp16 or bf16.
        max_batch_tokens: padded tokens in one forward pass (None: 65536 on a GPU, 2048 on a CPU).
        encode_kwargs: settings of `encode` that change the vectors: `prompt_name` or
            `prompt` (without either, the model's default prompt applies, as in `encode`),
            `truncate_dim`, `normalize_embeddings`. Any other is refused (InputError).
        prefix_of: the dataset `ds` holds the first `len(ds)` rows of (as `--max-rows` cuts
            it). Rows cached for it, or for another number of its first rows, with the same
            model, settings and column, are copied from the largest such cache instead of
            being embedded again; only the rows none holds are embedded.
        source: what the dataset was loaded from (path or Hub id, split...), recorded in
            meta.json for `sbert-sae cache list`; it does not key the cache.
    """
    encode_kwargs = check_encode_kwargs(encode_kwargs)
    if (batch_size is not None and batch_size < 1) or chunk_size < 1:
        raise InputError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    spot = _locate(ds, text_column, model_id, revision, cache_dir, device, precision, encode_kwargs, accelerator, prefix_of)
    device, precision, fingerprint, family, model = spot.device, spot.precision, spot.fingerprint, spot.family, spot.model
    root, folder = spot.folder.parent, spot.folder
    if (folder / "complete.json").exists():
        try:
            return _used(open_cache(folder))
        except DatasetError:
            pass  # embedded again below, once the cache is locked

    def barrier() -> None:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized() and dist.get_backend() == "gloo":
                # A host-side barrier: Accelerate's names the GPU of each process's rank, which
                # processes sharing one GPU (--device) do not have.
                dist.barrier()
            else:
                accelerator.wait_for_everyone()

    # One job at a time fills a cache: a second one (another user, the same command run twice)
    # waits, then reads what the first made. Two at once re-created each other's vectors file,
    # overwrote each other's progress records, and rewrote row_ids.npy while it was being read.
    with _cache_lock(folder) if rank == 0 else contextlib.nullcontext():
        barrier()  # the job's other processes wait while its first waits for the lock
        finished = _finished_cache(folder, rank)
        barrier()
        if finished is not None:
            return _used(finished)
        rows = text_rows or find_text_rows(ds, text_column, on_bad=on_bad_text)
        n = len(rows.row_ids)
        # A finished cache of the family holding this cache's first rows: those are copied, not embedded.
        donor = _find_donor(root, family, folder, rows.row_ids) if rank == 0 else None
        settings = EncodeSettings(
            precision=precision,
            max_batch_tokens=max_batch_tokens,
            max_batch_size=batch_size or 1024,
            normalize=bool(encode_kwargs.get("normalize_embeddings")),
            prompt_name=encode_kwargs.get("prompt_name"),
            prompt=encode_kwargs.get("prompt"),
            truncate_dim=encode_kwargs.get("truncate_dim"),
        )
        encoder = None

        def make_encoder() -> TextEncoder:
            nonlocal model
            if model is None:
                model = load_sentence_transformer(model_id, revision=revision, device=device)
            # Refuses a model that cannot embed text, or settings it cannot follow, before any file is written.
            return TextEncoder(model, settings, owns_model=True, name=f"model {model_id!r}")

        vectors_file = folder / "embeddings.npy"
        if rank == 0:
            if donor is None or donor[1] < n:  # rows to embed: the model is needed
                encoder = make_encoder()
                if donor is not None and donor[0].dim != encoder.dim:
                    donor = None
            dim = encoder.dim if encoder is not None else donor[0].dim
            folder.mkdir(parents=True, exist_ok=True)
            done = _done_ranges(folder, n, dim)
            if not done or not vectors_file.exists():
                for stale in folder.glob("progress*.json"):
                    stale.unlink()
                np.lib.format.open_memmap(vectors_file, mode="w+", dtype=np.float32, shape=(n, dim)).flush()
                done = []
            if done:
                logger.info("resuming embedding: %d of %d rows already done", sum(b - a for a, b in done), n)
            np.save(folder / "row_ids.npy", rows.row_ids)
            if donor is not None:
                _copy_rows(donor[0], folder, _subtract(0, donor[1], done), n, dim, chunk_size, world)
        barrier()
        vectors = np.load(vectors_file, mmap_mode="r+")
        dim = int(vectors.shape[1])
        done = _done_ranges(folder, n, dim)
        lo, hi = rank * n // world, (rank + 1) * n // world
        todo = _subtract(lo, hi, done)
        if todo and encoder is None:
            encoder = make_encoder()
            if encoder.dim != dim:
                raise DatasetError(f"model {model_id!r} makes {encoder.dim}-d embeddings but the cache {folder} holds {dim}-d ones")
        progress_file = folder / ("progress.json" if world == 1 else f"progress-{rank}.json")
        mine = [list(r) for r in _read_ranges(progress_file)]

        from tqdm.auto import tqdm

        spans = [(a, min(a + chunk_size, b)) for a, b in todo for a in range(a, b, chunk_size)]

        def texts_of(span):
            return column_values(ds, text_column, rows.row_ids[span[0] : span[1]])

        total = sum(b - a for a, b in spans)
        with tqdm(total=total, desc="embedding", unit="text", disable=not (show_progress and rank == 0) or not total, smoothing=0.1) as bar:
            stream = encoder.stream((texts_of(s) for s in spans), progress=bar.update) if spans else ()
            for (start, stop), out in zip(spans, stream):
                if not np.isfinite(out).all():
                    bad = rows.row_ids[start:stop][~np.isfinite(out).all(axis=1)][:5].tolist()
                    raise DatasetError(f"the model produced NaN/inf embeddings for dataset rows {bad}")
                vectors[start:stop] = out
                vectors.flush()
                mine.append([start, stop])
                write_json(progress_file, {"n_rows": n, "dim": dim, "ranges": _merge(mine)})
                pause_point("chunk", len(mine))
        del vectors
        barrier()
        if rank == 0:
            missing = _subtract(0, n, _done_ranges(folder, n, dim))
            if missing:
                raise DatasetError(f"embedding of rows {missing[:3]} did not finish; run again to resume")
            meta = {
                "model": model_id,
                "revision": revision,
                "dataset_fingerprint": fingerprint,
                "text_column": text_column,
                "encode_kwargs": encode_kwargs,
                "prompt": encoder.prompt if encoder is not None else donor[0].meta.get("prompt"),
                "truncate_dim": encoder.truncate_dim if encoder is not None else donor[0].meta.get("truncate_dim"),
                "precision": precision,
                "processes": world,
                "n_rows": n,
                "n_dataset_rows": len(ds),
                "dim": dim,
                "skipped": rows.skipped,
                "skipped_examples": rows.examples,
                "family": family,
                **({"source": source} if source else {}),
            }
            if donor is not None:
                meta["copied_from"] = {"cache": donor[0].path.name, "rows": donor[1]}
            write_json(folder / "meta.json", meta)
            write_json(folder / "complete.json", {"n_rows": n})
            for progress in folder.glob("progress*.json"):
                progress.unlink()
        barrier()
        return _used(open_cache(folder))


LAST_USED_FILE = "last-used"
"""An empty file in a cache folder whose modification time is when a run last read the cache
(`sbert-sae cache remove --older-than`): access times are not kept on many file systems."""


def _used(cache: EmbeddingCache) -> EmbeddingCache:
    """`cache`, its last use noted; a cache that cannot be written (shared, read-only) still reads."""
    stamp = cache.path / LAST_USED_FILE
    try:
        stamp.touch()
    except OSError:
        pass
    return cache


def _finished_cache(folder: Path, rank: int) -> EmbeddingCache | None:
    """The finished cache in `folder`, or None when it is not finished. A finished one whose
    files were cut short or spoilt (a full disk, a copy that stopped) is named and, by the
    first process, marked unfinished: its vectors are embedded again rather than read wrong."""
    if not (folder / "complete.json").exists():
        return None
    try:
        return open_cache(folder)
    except DatasetError as err:
        logger.warning("%s: embedding again", err)
        if rank == 0:
            for marker in ("complete.json", "meta.json"):
                (folder / marker).unlink(missing_ok=True)
        return None


def lock_path(folder: Path) -> Path:
    """The lock file a process filling the cache `folder` holds (`<cache>/locks/<name>.lock`)."""
    return folder.parent.parent / "locks" / f"{folder.name}.lock"


@contextlib.contextmanager
def _cache_lock(folder: Path):
    """Hold the lock of the cache `folder` (an OS lock, freed when its process dies, however it
    dies), waiting while another process holds it. The lock file is kept apart, in the cache's
    `locks` folder: a run refused before it embeds anything leaves no cache folder. It is
    deleted as the lock is let go (`PathLock`): a lock file outlives its run only when the run
    was killed, and `sbert-sae cache list/remove` delete those."""
    from .utils import PathLock

    locks = lock_path(folder).parent
    failure = f"cannot write the embedding cache {folder}: {{}}; pass a writable --cache-dir (or set SBERT_SAE_CACHE)"
    try:
        locks.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatasetError(failure.format(err.strerror)) from err
    lock = PathLock(lock_path(folder))
    try:
        if not lock.acquire(timeout=0):
            logger.warning("another process is embedding into %s: waiting for it to finish", folder)
            lock.acquire()
    except OSError as err:
        raise DatasetError(failure.format(err.strerror or err)) from err
    from .utils import remove_dead_temp_files

    remove_dead_temp_files(folder)  # the temp files of a run killed as it wrote the cache's records
    try:
        yield
    finally:
        lock.release()


def _find_donor(root: Path, family: str, own: Path, row_ids: np.ndarray) -> tuple[EmbeddingCache, int] | None:
    """The finished cache of `family` (the same model, settings, column and whole dataset)
    that holds the most of the leading rows `row_ids`, with how many it holds; None if none."""
    if not root.is_dir():
        return None
    best = None
    for folder in sorted(root.iterdir()):
        if folder == own or not (folder / "complete.json").exists():
            continue
        try:
            meta = read_json(folder / "meta.json")
        except (OSError, ValueError):
            continue
        # A cache made before families were recorded is one of `family` when it is the whole
        # dataset's: its key is then the family's.
        if not isinstance(meta, dict) or meta.get("family", folder.name) != family:
            continue
        # Every cache of the family embeds the first n_dataset_rows rows of the whole dataset.
        covered = int(np.searchsorted(row_ids, int(meta.get("n_dataset_rows") or 0)))
        if covered == 0 or (best is not None and covered <= best[1]):
            continue
        try:
            cache = open_cache(folder)
        except (OSError, ValueError, DatasetError):
            continue
        if len(cache.row_ids) >= covered and np.array_equal(cache.row_ids[:covered], row_ids[:covered]):
            best = (cache, covered)
    return best


def _copy_rows(donor: EmbeddingCache, folder: Path, spans, n: int, dim: int, chunk_size: int, world: int) -> None:
    """Copy `donor`'s vectors at the positions `spans` into the cache being made in `folder`
    (the same positions: both list the same leading rows), recording each chunk as done,
    as embedded chunks are, so that a killed copy resumes where it stopped."""
    total = sum(b - a for a, b in spans)
    if not total:
        return
    logger.info("copying %d of %d rows from the embedding cache %s", total, n, donor.path)
    vectors = np.load(folder / "embeddings.npy", mmap_mode="r+")
    progress_file = folder / ("progress.json" if world == 1 else "progress-0.json")
    mine = [list(r) for r in _read_ranges(progress_file)]
    for a, b in spans:
        for start in range(a, b, chunk_size):
            stop = min(start + chunk_size, b)
            vectors[start:stop] = donor.embeddings[start:stop]
            vectors.flush()
            mine.append([start, stop])
            write_json(progress_file, {"n_rows": n, "dim": dim, "ranges": _merge(mine)})
    del vectors


def _read_ranges(path: Path) -> list[tuple[int, int]]:
    if not path.exists():
        return []
    return [tuple(r) for r in read_json(path).get("ranges", [])]


def _done_ranges(folder: Path, n: int, dim: int) -> list[tuple[int, int]]:
    """Row ranges finished by earlier runs (any number of processes), merged."""
    ranges = []
    for path in folder.glob("progress*.json"):
        progress = read_json(path)
        if progress.get("n_rows") == n and progress.get("dim") == dim:
            ranges += [tuple(r) for r in progress.get("ranges", [])]
    return [tuple(r) for r in _merge(ranges)]


def _merge(ranges) -> list[list[int]]:
    merged: list[list[int]] = []
    for a, b in sorted(tuple(r) for r in ranges):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def _subtract(lo: int, hi: int, done) -> list[tuple[int, int]]:
    """Parts of [lo, hi) not covered by the sorted, merged ranges `done`."""
    todo, cursor = [], lo
    for a, b in done:
        if b <= cursor or a >= hi:
            continue
        if a > cursor:
            todo.append((cursor, a))
        cursor = max(cursor, b)
    if cursor < hi:
        todo.append((cursor, hi))
    return todo


def open_cache(folder: str | os.PathLike) -> EmbeddingCache:
    """Open a finished embedding cache folder (memory-mapped, read-only)."""
    folder = Path(folder)
    name = "meta.json"
    try:
        meta = read_json(folder / name)
        name = "embeddings.npy"
        embeddings = np.load(folder / name, mmap_mode="r", allow_pickle=False)
        name = "row_ids.npy"
        row_ids = np.load(folder / name, allow_pickle=False)
    except FileNotFoundError as err:
        raise DatasetError(f"embedding cache {folder} has no {name}") from err
    except (OSError, ValueError, EOFError) as err:  # cut short or spoilt: never read as vectors
        raise DatasetError(f"embedding cache {folder} is damaged: {name} cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(meta, dict):
        raise DatasetError(f"embedding cache {folder} is damaged: meta.json is not a JSON object")
    if embeddings.ndim != 2 or embeddings.dtype != np.float32 or row_ids.ndim != 1:
        raise DatasetError(f"embedding cache {folder} is damaged: embeddings.npy holds {embeddings.dtype} {embeddings.shape}, row_ids.npy {row_ids.shape}")
    if embeddings.shape[0] != len(row_ids) or meta.get("n_rows", len(row_ids)) != len(row_ids):
        raise DatasetError(f"embedding cache {folder} is inconsistent: {embeddings.shape[0]} vectors, {len(row_ids)} row ids, meta.json says {meta.get('n_rows')}")
    return EmbeddingCache(path=folder, embeddings=embeddings, row_ids=row_ids, meta=meta)
