"""What sbert-sae keeps on disk between runs, listed and pruned (`sbert-sae cache list/remove`).

Three things grow without bound, one entry per input:

- embedding caches, `<cache>/embeddings/<id>/` (`embed_dataset`): a dataset's vectors, with
  the corpus' top-k codes by each SAE run on it (`codes-<digest>.values.npy/.indices.npy`,
  and for a domain's rows `codes-<digest>.meta.json`, which names the domain);
- label vectors, `<cache>/label-vectors/<id>.npy` (`sbert-sae search` by label);
- the records a dotted `--json-field` found, `$HF_DATASETS_CACHE/sbert_sae_json_records/<id>/`.

An entry is removed whole or not at all: it is renamed into its root's `.trash` folder (one
atomic step: a run never finds half an entry where the entry was), then deleted; what a
crash leaves in `.trash` is deleted by the next `remove`. An entry another process is
filling holds its lock (`<cache>/locks/<id>.lock`, the one `embed_dataset` takes); it is
skipped, never waited for. Lock files are deleted as they are let go; those killed runs (or
older versions) left, which no process holds, are deleted as the cache is scanned.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .utils import PathLock, pause_point, prune_locks, read_json

KINDS = ("embeddings", "json-records", "label-vectors")
TRASH = ".trash"


@dataclass
class CodesFiles:
    """An SAE's top-k codes of an embedding cache's corpus (its values and indices files)."""

    digest: str
    paths: list[Path]
    size: int
    rows: int | None
    k: int | None
    last_used: float
    domain: dict | None = None
    """A domain's SAE's codes of its own domain's rows: the domain's {column, value}; None for
    the whole dataset's (and codes kept before their meta file was written)."""


@dataclass
class CacheEntry:
    kind: str
    id: str
    path: Path
    status: str
    """complete; partial (interrupted: the next run resumes or redoes it); damaged (the next
    run embeds it again); filling, or locked once complete (another process holds its lock:
    `remove` leaves it)."""
    size: int
    last_used: float
    rows: int | None = None
    dim: int | None = None
    dtype: str | None = None
    details: dict = field(default_factory=dict)
    codes: list[CodesFiles] = field(default_factory=list)

    def to_json(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        for codes in data["codes"]:
            codes["paths"] = [str(p) for p in codes["paths"]]
        return data


@dataclass
class CacheScan:
    cache_dir: Path
    records_dir: Path
    entries: list[CacheEntry]
    trash_size: int

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.entries)


def cache_dir_source(cache_dir: str | os.PathLike | None) -> str:
    """How the embedding cache folder was chosen, for messages."""
    if cache_dir is not None:
        return "--cache-dir"
    if os.environ.get("SBERT_SAE_CACHE"):
        return "$SBERT_SAE_CACHE"
    return "the default: set $SBERT_SAE_CACHE or pass --cache-dir for another"


def records_dir() -> Path:
    import datasets.config

    from .data import JSON_RECORDS_DIR

    return Path(datasets.config.HF_DATASETS_CACHE) / JSON_RECORDS_DIR


def scan_cache(cache_dir: str | os.PathLike | None = None) -> CacheScan:
    """Every entry of the embedding cache `cache_dir` (default: `default_cache_dir()`) and of
    the JSON records folder of the datasets cache. Refuses (InputError) when neither exists,
    or `cache_dir` was given and does not exist, saying where it looked."""
    from .embeddings import default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    records = records_dir()
    if not root.is_dir() and (cache_dir is not None or not records.is_dir()):
        where = f"no sbert-sae cache at {root} ({cache_dir_source(cache_dir)})"
        if cache_dir is None:
            where += f", nor JSON records at {records} (set by $HF_DATASETS_CACHE)"
        raise InputError(f"{where}: nothing has been cached there yet")
    entries: list[CacheEntry] = []
    for folder in _children(root / "embeddings", dirs=True):
        entries.append(_embedding_entry(folder))
    for path in _children(root / "label-vectors", dirs=False):
        if path.suffix == ".npy":
            entries.append(_label_vectors_entry(path))
    for folder in _children(records, dirs=True):
        entries.append(_records_entry(folder))
    # The lock files of entries gone (removed, or by hand) that no process holds: an entry's
    # own, if free, went as its status was read (`_lock_held`).
    prune_locks(root / "locks")
    prune_locks(records / ".locks")
    trash = _tree_size(root / TRASH) + _tree_size(records / TRASH)
    return CacheScan(cache_dir=root, records_dir=records, entries=entries, trash_size=trash)


def _children(folder: Path, dirs: bool) -> list[Path]:
    """The entries of a root: its folders (or files), leaving out what starts with a dot
    (locks, the trash, files being written)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir() == dirs)


def _disk_size(path: Path) -> int:
    """Bytes a file takes on disk: a vectors file being filled is sparse, only its written rows count."""
    st = path.stat()
    blocks = getattr(st, "st_blocks", None)
    return min(st.st_size, blocks * 512) if blocks is not None else st.st_size


def _tree_size(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += _disk_size(Path(dirpath) / name)
            except OSError:  # removed while being counted
                pass
    return total


def _newest_mtime(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                times.append((Path(dirpath) / name).stat().st_mtime)
            except OSError:
                pass
    return max(times)


def _npy_shape(path: Path) -> tuple[tuple[int, ...], str] | None:
    """The shape and dtype in a .npy file's header, or None when it cannot be read."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        return tuple(int(n) for n in array.shape), str(array.dtype)
    except (OSError, ValueError, EOFError):
        return None


def _lock_held(lock_file: Path) -> bool:
    """Whether another process holds `lock_file` now (never waits; a lock never taken is not
    held). One no process holds is deleted as it is let go: left by a killed run, or by a
    version that kept its lock files."""
    if not lock_file.exists():
        return False
    lock = PathLock(lock_file)
    try:
        if not lock.acquire(timeout=0):
            return True
    except OSError:
        return False
    lock.release()
    return False


def _embedding_entry(folder: Path) -> CacheEntry:
    from .embeddings import LAST_USED_FILE, lock_path, open_cache
    from .errors import DatasetError

    codes = _codes_files(folder)
    in_codes = {p for c in codes for p in c.paths}
    size = sum(_disk_size(p) for p in folder.rglob("*") if p.is_file() and p not in in_codes)
    try:
        meta = read_json(folder / "meta.json")
        meta = meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        meta = {}
    if _lock_held(lock_path(folder)):
        status = "locked" if (folder / "complete.json").exists() else "filling"
    elif not (folder / "complete.json").exists():
        status = "partial"
    else:
        try:
            open_cache(folder)
            status = "complete"
        except DatasetError:
            status = "damaged"
    header = _npy_shape(folder / "embeddings.npy")
    rows, dim, dtype = meta.get("n_rows"), meta.get("dim"), None
    if header is not None and len(header[0]) == 2:
        rows, dim, dtype = header[0][0], header[0][1], header[1]
    details = {name: meta[name] for name in ("model", "revision", "dataset_fingerprint", "text_column", "source", "precision", "encode_kwargs", "n_dataset_rows") if meta.get(name) is not None}
    if status in ("partial", "filling"):
        from .embeddings import _done_ranges

        try:
            details["rows_done"] = sum(b - a for a, b in _done_ranges(folder, rows, dim)) if rows is not None else 0
        except (OSError, ValueError):
            pass
    stamp = folder / LAST_USED_FILE
    mtimes = [stamp.stat().st_mtime] if stamp.exists() else []
    last_used = max([*mtimes, _newest_mtime(folder)])
    return CacheEntry(kind="embeddings", id=folder.name, path=folder, status=status, size=size, last_used=last_used, rows=rows, dim=dim, dtype=dtype, details=details, codes=codes)


def _codes_files(folder: Path) -> list[CodesFiles]:
    from .activations import codes_meta_path

    found: dict[str, list[Path]] = {}
    for path in folder.glob("codes-*"):
        if path.name.endswith((".npy", ".meta.json")):  # the meta file goes with its codes (`remove --codes`)
            digest = path.name[len("codes-") :].split(".")[0]
            found.setdefault(digest, []).append(path)
    codes = []
    for digest, paths in sorted(found.items()):
        values_path = folder / f"codes-{digest}.values.npy"
        header = _npy_shape(values_path)
        rows, k = (header[0] + (None, None))[:2] if header is not None else (None, None)
        try:
            meta = read_json(codes_meta_path(values_path))
        except (OSError, ValueError):  # none (the whole dataset's, or older codes) or unreadable
            meta = None
        domain = meta.get("domain") if isinstance(meta, dict) else None
        codes.append(
            CodesFiles(
                digest=digest,
                paths=sorted(paths),
                size=sum(_disk_size(p) for p in paths),
                rows=rows,
                k=k,
                last_used=max(p.stat().st_mtime for p in paths),
                domain=domain if isinstance(domain, dict) else None,
            )
        )
    return codes


def _label_vectors_entry(path: Path) -> CacheEntry:
    header = _npy_shape(path)
    shape, dtype = header if header is not None else ((), None)
    return CacheEntry(
        kind="label-vectors",
        id=path.stem,
        path=path,
        status="complete" if header is not None and len(shape) == 2 else "damaged",
        size=_disk_size(path),
        last_used=path.stat().st_mtime,
        rows=shape[0] if len(shape) == 2 else None,
        dim=shape[1] if len(shape) == 2 else None,
        dtype=dtype,
    )


def _records_entry(folder: Path) -> CacheEntry:
    from .data import json_records_lock_path

    details: dict = {"splits": sorted(p.stem for p in folder.glob("*.jsonl"))}
    try:
        details["json_field"] = read_json(folder / "features.json")["json_field"]
        complete = True
    except (OSError, ValueError, KeyError, TypeError):
        complete = False
    status = "filling" if _lock_held(json_records_lock_path(folder)) else ("complete" if complete else "partial")
    return CacheEntry(kind="json-records", id=folder.name, path=folder, status=status, size=_tree_size(folder), last_used=_newest_mtime(folder), details=details)


@dataclass
class Selection:
    """What `remove` would take: whole entries, or (with `codes`) the codes files of entries."""

    entries: list[CacheEntry]
    codes: list[tuple[CacheEntry, CodesFiles]]

    @property
    def size(self) -> int:
        return sum(e.size + sum(c.size for c in e.codes) for e in self.entries) + sum(c.size for _, c in self.codes)


def select(
    scan: CacheScan,
    ids: list[str] = (),
    older_than_days: float | None = None,
    partial: bool = False,
    codes: bool = False,
    all_entries: bool = False,
    kinds: list[str] | None = None,
    now: float | None = None,
) -> Selection:
    """The entries (or codes files) every given selector picks: `ids` (ids or unique
    prefixes of them), last used more than `older_than_days` ago, `partial` (interrupted or
    damaged), `kinds`; `all_entries` when no other selector narrows them."""
    if not (ids or older_than_days is not None or partial or all_entries):
        raise InputError("say what to remove: entry ids (see `sbert-sae cache list`), --older-than DAYS, --partial or --all")
    if codes and partial:
        raise InputError("--codes and --partial cannot be combined: codes files are only kept beside complete embedding caches")
    if older_than_days is not None and older_than_days < 0:
        raise InputError(f"--older-than must be >= 0 days, got {older_than_days}")
    chosen = list(scan.entries)
    if ids:
        chosen = []
        for given in ids:
            matches = [e for e in scan.entries if e.id.startswith(given.lower())] if given else []
            if not matches:
                raise InputError(f"no cache entry with id {given!r} in {scan.cache_dir} or {scan.records_dir} (see `sbert-sae cache list`)")
            if len(matches) > 1:
                raise InputError(f"id {given!r} is the start of {len(matches)} entries ({', '.join(e.id for e in matches[:5])}): give more of it")
            if matches[0] not in chosen:
                chosen.append(matches[0])
    if kinds:
        chosen = [e for e in chosen if e.kind in kinds]
    if partial:
        chosen = [e for e in chosen if e.status in ("partial", "damaged")]
    cutoff = None if older_than_days is None else (time.time() if now is None else now) - older_than_days * 86400
    if codes:
        picked = [(e, c) for e in chosen for c in e.codes if cutoff is None or c.last_used < cutoff]
        return Selection(entries=[], codes=picked)
    if cutoff is not None:
        chosen = [e for e in chosen if e.last_used < cutoff]
    return Selection(entries=chosen, codes=[])


@dataclass
class Removal:
    removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """One line each: which entry, and why it was left."""
    freed: int = 0


def remove(scan: CacheScan, selection: Selection, log=print) -> Removal:
    """Remove what `selection` holds, an entry at a time, each renamed aside (atomically)
    under its lock, then deleted. An entry whose lock another process holds is skipped."""
    result = Removal()
    empty_trash(scan)
    for entry in selection.entries:
        _remove_one(entry, [entry.path], entry.size + sum(c.size for c in entry.codes), entry.id, result, log)
    for entry, codes in selection.codes:
        _remove_one(entry, codes.paths, codes.size, f"{entry.id} codes-{codes.digest}", result, log)
    return result


def _remove_one(entry: CacheEntry, paths: list[Path], size: int, name: str, result: Removal, log) -> None:
    import contextlib

    from .data import json_records_lock_path
    from .embeddings import lock_path

    lock_file = {"embeddings": lock_path, "json-records": json_records_lock_path}.get(entry.kind)
    root = entry.path.parent.parent if entry.kind != "json-records" else entry.path.parent
    with contextlib.ExitStack() as stack:
        if lock_file is not None:
            # Taken even where no lock file is there yet: a process starting to fill the entry
            # now creates and takes the same one, and waits while this one holds it. The lock
            # file is deleted as it is let go, the entry moved aside (`PathLock`).
            lock = PathLock(lock_file(entry.path))
            try:
                lock_file(entry.path).parent.mkdir(parents=True, exist_ok=True)
                got = lock.acquire(timeout=0)
            except OSError as err:
                result.skipped.append(f"{name}: its lock {lock_file(entry.path)} cannot be taken ({err.strerror or err}); left in place")
                log(f"skipped {result.skipped[-1]}")
                return
            if not got:
                result.skipped.append(f"{name}: another process is writing it (it holds {lock_file(entry.path)}); left in place")
                log(f"skipped {result.skipped[-1]}")
                return
            stack.callback(lock.release)
        trash = root / TRASH / f"{entry.id}.{uuid.uuid4().hex[:8]}"
        try:
            trash.mkdir(parents=True)
            for path in paths:  # codes: values, indices (and meta), each renamed whole
                os.replace(path, trash / path.name)
        except OSError as err:
            result.skipped.append(f"{name}: cannot be moved aside ({err.strerror or err}); left in place")
            log(f"skipped {result.skipped[-1]}")
            return
    pause_point("cache-remove", len(result.removed) + 1)
    shutil.rmtree(trash, ignore_errors=True)
    result.removed.append(name)
    result.freed += size
    log(f"removed {name} ({format_size(size)})")


def empty_trash(scan: CacheScan) -> None:
    """Delete what a removal cut short left in the roots' `.trash` folders."""
    for trash in (scan.cache_dir / TRASH, scan.records_dir / TRASH):
        if trash.is_dir():
            for leftover in trash.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)


def format_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def format_time(t: float, now: float | None = None) -> str:
    days = ((time.time() if now is None else now) - t) / 86400
    ago = "today" if days < 1 else f"{days:.0f} day{'s' if days >= 1.5 else ''} ago"
    return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(t))} ({ago})"


def describe(entry: CacheEntry) -> list[str]:
    """An entry as `sbert-sae cache list` prints it: a line, then indented details."""
    shape = f"{entry.rows} x {entry.dim} {entry.dtype or ''}".strip() if entry.rows is not None and entry.dim is not None else "-"
    lines = [f"{entry.id}  {entry.kind:<13} {entry.status:<8}  {shape:<20} {format_size(entry.size):>9}  used {format_time(entry.last_used)}"]
    d = entry.details
    if entry.kind == "embeddings":
        source = d.get("source") or {}
        dataset = source.get("dataset")
        dataset = ", ".join(dataset) if isinstance(dataset, list) else dataset
        what = []  # meta.json, which says what the vectors are of, is written when they are complete
        if d.get("model"):
            what.append(f"model {d['model']}" + (f"@{d['revision']}" if d.get("revision") else ""))
        if dataset:
            what.append(f"dataset {dataset}" + "".join(f" {k}={source[k]}" for k in ("config_name", "split", "json_field", "max_rows") if source.get(k) is not None))
        if d.get("dataset_fingerprint"):
            what.append(f"fingerprint {d['dataset_fingerprint']}")
        if d.get("text_column"):
            what.append(f"column {d['text_column']}")
        if "rows_done" in d:
            what.append(f"{d['rows_done']} of {entry.rows} rows embedded")
        if what:
            lines.append("    " + ", ".join(what))
        for c in entry.codes:
            shape = f"{c.rows} x k={c.k}" if c.rows is not None else "unreadable"
            of_domain = f", domain {str(c.domain.get('value'))!r} (column {c.domain.get('column')})" if c.domain else ""
            lines.append(f"    codes {c.digest}: {shape}{of_domain}, {format_size(c.size)}, used {format_time(c.last_used)}")
    elif entry.kind == "json-records":
        lines.append(f"    --json-field {d.get('json_field', '?')}, splits {', '.join(d.get('splits') or ['-'])}")
    return lines
