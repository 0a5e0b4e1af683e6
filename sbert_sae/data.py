"""Text datasets: load any Hugging Face dataset, check its text column, split off held-out rows.

`--dataset` may be a Hub id (with config and split), a `save_to_disk` folder, a folder of
data files, or parquet / JSON-lines / JSON / CSV / text files (a JSON file that is one object
holding its records under a key, {"version": ..., "data": [...]}, with `--json-field data`, or
deeper, SQuAD's paragraphs, with a dotted path: `--json-field data.paragraphs`).
Rows are addressed by their index in the loaded split ("row id") everywhere downstream, so
every activation can be traced back to its text.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DatasetError
from .utils import clip

logger = logging.getLogger(__name__)

FILE_BUILDERS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "text",
}


COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
"""Compressed data files, which datasets reads as the file inside (x.csv.gz as CSV)."""


def _uncompressed_name(path: str) -> str:
    """`path` lowercased, less one compression suffix: the name its format is told by (x.tsv for X.TSV.gz)."""
    name = path.lower()
    return next((name[: -len(suffix)] for suffix in COMPRESSED_SUFFIXES if name.endswith(suffix)), name)


def _text_opener(path: str):
    """What opens data file `path` as it is stored: gzip.open for x.json.gz, bz2.open, lzma.open;
    `open` for any other (.zst too: the standard library has no reader of it)."""
    import bz2
    import gzip
    import lzma

    return {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(Path(path).suffix.lower(), open)


def _is_tsv(path: str) -> bool:
    """Whether a data file is tab-separated: .tsv, compressed or not (x.tsv.gz)."""
    return _uncompressed_name(path).endswith(".tsv")


def _builder_for(path: str) -> str:
    name = path.lower()
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for ext, builder in FILE_BUILDERS.items():
        if name.endswith(ext):
            return builder
    raise DatasetError(f"cannot tell the format of data file {path!r}: use one of {sorted(FILE_BUILDERS)}")


def dataset_source(source) -> str | list[str]:
    """`source` as `load_text_dataset` takes it: a path or name (a `pathlib.Path` too) as a
    string, a list or tuple of them as a list of strings. Anything else is refused by name: a
    `datasets.Dataset` or a DataFrame in memory is read from disk here (save it first)."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (list, tuple)) and all(isinstance(f, (str, os.PathLike)) for f in source):
        return [os.fspath(f) for f in source]
    hint = ""
    if hasattr(source, "save_to_disk"):
        hint = ": a dataset in memory is read from disk here: save it with save_to_disk(folder) and give the folder"
    elif hasattr(source, "to_parquet"):
        hint = ": a DataFrame in memory is read from disk here: save it with to_parquet('corpus.parquet') and give the file"
    raise DatasetError(f"dataset must be a Hub dataset id, a folder, a data file or a list of them, got {type(source).__name__}{hint}")


def load_text_dataset(
    source: str | list[str],
    config_name: str | None = None,
    split: str = "train",
    revision: str | None = None,
    json_field: str | None = None,
):
    """Load one split of a dataset as a `datasets.Dataset`.

    Args:
        source: Hub id, `save_to_disk` folder, data folder, data file, or a list of files.
        config_name: the Hub dataset's configuration (subset), if it has several.
        split: which split to use ("train", "test[:10%]", ...).
        revision: Hub revision (branch, tag or commit).
        json_field: the top-level key of JSON files that are one object each, under which
            their records sit ("data" in {"version": ..., "data": [...]}), or a dotted path to
            records nested deeper, every list on the way gone through in order ("data.paragraphs"
            in SQuAD's {"data": [{"title": ..., "paragraphs": [{"context": ...}]}]}; see
            `_load_json_records`).
    """
    import datasets

    # A pathlib.Path was iterated ("'PosixPath' object is not iterable"), a DataFrame as its
    # column names (a column "text" loaded datasets' text builder over the current folder).
    source = dataset_source(source)
    files = [source] if isinstance(source, str) else list(source)
    if not files or any(not f.strip() for f in files):
        # DataArguments' default: datasets took "" for the current folder, read every file under
        # it (minutes in a checkout) and failed with "IndexError: list index out of range".
        raise DatasetError(f"no dataset given (dataset={source!r}): name a Hub dataset id, a save_to_disk folder, a data folder or data files")
    # datasets' json builder reads its `field` option; other builders refuse it as unknown.
    field_kwargs = {"field": json_field} if json_field is not None else {}
    # A dotted path is walked here (datasets' `field` is one top-level key); a plain key is
    # left to datasets as before, so its runs' embedding caches stay valid.
    json_path = json_field is not None and "." in json_field
    try:
        if json_field is not None and not json_field:
            raise DatasetError("--json-field is empty: name the top-level key of the JSON object that holds the records")
        if json_path and not all(json_field.split(".")):
            raise DatasetError(f"--json-field {json_field!r} has an empty step: name keys joined by dots, e.g. data.paragraphs")
        if len(files) == 1 and Path(files[0]).is_dir() and _is_saved_dataset(Path(files[0])):
            if json_field is not None:
                raise DatasetError(f"--json-field {json_field!r} applies to JSON files; {files[0]!r} is a save_to_disk dataset")
            loaded = datasets.load_from_disk(files[0])
            single = not isinstance(loaded, datasets.DatasetDict)
            if single:
                # One saved Dataset is one split: "train", as data files are.
                loaded = datasets.DatasetDict({"train": loaded})
            ds = _select_split(loaded, split, files[0], what="a saved Dataset (not a DatasetDict) is one split, 'train'" if single else None)
        elif all(Path(f).is_file() for f in files):
            builders = {_builder_for(f) for f in files}
            if len(builders) > 1:
                raise DatasetError(f"data files mix formats {sorted(builders)}: {files}")
            builder = builders.pop()
            if json_field is not None and builder != "json":
                raise DatasetError(f"--json-field {json_field!r} applies to JSON files; {files} are {builder} files")
            tsv = [_is_tsv(f) for f in files]
            if any(tsv) and not all(tsv):
                raise DatasetError(f"data files mix tab-separated (.tsv) and comma-separated (.csv) files: {files}")
            kwargs = {"delimiter": "\t"} if all(tsv) else dict(field_kwargs)
            _check_split_names(split, ["train"], source, what="data files have one split, 'train'")  # data files given by name are one split
            if json_path:
                ds = _load_json_records({"train": files}, json_field, split, source)
            else:
                ds = datasets.load_dataset(builder, data_files=files, split=split, **kwargs)
        elif len(files) == 1 and Path(files[0]).is_dir():
            if json_path:
                ds = _load_json_records(_folder_json_files(files[0], json_field), json_field, split, source)
            else:
                ds = datasets.load_dataset(files[0], name=config_name, split=split, **field_kwargs)
        elif len(files) == 1 and _looks_like_path(files[0]):
            raise DatasetError(f"dataset {files[0]!r} not found: no such file or folder")
        elif json_path:
            raise DatasetError(f"a dotted --json-field ({json_field!r}) reads local JSON files; {files[0]!r} is not one: download its files and pass them to --dataset")
        else:
            ds = datasets.load_dataset(files[0], name=config_name, split=split, revision=revision, **field_kwargs)
    except DatasetError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types; name the source in one
        detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        root = _root_cause(err)
        if root is not err and str(root):
            # datasets' DatasetGenerationError says only "An error occurred while generating the
            # dataset": the parser's own message names the file's problem and its row.
            detail += f" ({type(root).__name__}: {_one_line(str(root))})"
        if json_field is not None and not json_path:
            problem = _json_field_problem(files, json_field)
            if problem:
                raise DatasetError(f"cannot load dataset {source!r} with --json-field {json_field!r}: {problem}") from err
        separated = _csv_separator_problem(_data_files_of(files))
        if separated:
            raise DatasetError(f"cannot load dataset {source!r}: {separated} ({detail})") from err
        if "EOF inside string" in detail and all(_is_tsv(p) for p in _data_files_of(files) or [""]):
            # A text that opens a double quote it never closes, in a file that does not quote its fields.
            detail += "; a field starts with a double quote (\") that no quote closes: if the file does not quote its fields, save it as parquet or JSON lines first (e.g. pandas.read_csv(path, sep='\\t', quoting=csv.QUOTE_NONE))"
        columns = _mismatched_columns(err, files)
        if columns:
            raise DatasetError(f"cannot load dataset {source!r}: {columns}") from err
        unknown_split = re.search(r'Unknown split "([^"]*)"\. Should be one of \[([^\]]*)\]', str(err))
        if unknown_split:
            # A data folder (or Hub dataset) without the split asked for, e.g. no "train": named as a
            # saved DatasetDict's is (`_check_split_names`), with the option that picks another.
            splits = sorted(re.findall(r"'([^']*)'", unknown_split.group(2)))
            raise DatasetError(f"split {unknown_split.group(1)!r} not in {source!r}; it has splits {splits} (--split {split!r})") from err
        if "corresponds to no data" in str(err):
            raise DatasetError(f"dataset {source!r} (split {split!r}) is empty") from err
        configs = re.search(r"Config name is missing.*?(\[[^\]]*\])", str(err), re.S)
        if configs:
            # datasets' own advice is Python ("load_dataset('name', 'en')"): name the option instead.
            raise DatasetError(f"dataset {source!r} has several configurations {configs.group(1)}: pick one with --config-name") from err
        raise DatasetError(f"cannot load dataset {source!r} (config={config_name!r}, split={split!r}): {detail}") from err
    if isinstance(ds, datasets.DatasetDict):  # a split expression that returned several
        raise DatasetError(f"dataset {source!r} gave several splits {sorted(ds)}: name one with --split")
    if len(ds) == 0:
        raise DatasetError(f"dataset {source!r} (split {split!r}) is empty")
    if (ds.info.builder_name or "") == "csv" and all(Path(f).exists() for f in files):
        paths = _data_files_of(files)
        if paths and all(_is_tsv(p) for p in paths):
            _warn_of_rows_read_as_one(ds, paths)
    return ds


def _warn_of_rows_read_as_one(ds, paths: list[str]) -> None:
    """Warn when a value of a tab-separated dataset holds a tab and a line break: a field that
    starts with a double quote is read as quoted, up to the next quote, taking in the fields
    and rows between (many TSV files do not quote: a text `"Hello" she said` or `"Unbalanced`),
    so rows were merged into one text and the row count is short. Nothing says so otherwise."""
    import pyarrow.compute as pc

    if getattr(ds, "_indices", None) is not None:
        return  # rows picked from the table: their positions are not its rows'
    for name in _string_columns(ds):
        column = ds.data.column(name)
        merged = pc.and_(pc.match_substring(column, "\t"), pc.match_substring(column, "\n"))
        count = pc.sum(merged).as_py() or 0
        if count:
            first = pc.index(merged, True).as_py()
            logger.warning(
                "%d value(s) of column %r of %s hold a tab and a line break (the first in row %d: %r): rows of the file were read as one, "
                "from a field that starts with a double quote (\") to the next quote; if the file does not quote its fields, save it as parquet "
                "or JSON lines first (e.g. pandas.read_csv(path, sep='\\t', quoting=csv.QUOTE_NONE))",
                count, name, ", ".join(Path(p).name for p in paths[:3]), first, clip(str(ds.data.column(name)[first].as_py()), 80),
            )


def _mismatched_columns(err: BaseException, files: list[str]) -> str | None:
    """What is wrong when datasets failed because data files of one dataset have different
    columns (it reads them as one table, typed by the first file): each set of columns and the
    files that have it. datasets' own words name no file (parquet, JSON lines) or span lines (CSV)."""
    from datasets.exceptions import DatasetGenerationCastError
    from datasets.table import CastError

    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    cast = next((e for e in chain if isinstance(e, CastError)), None)
    if cast is None and not any(isinstance(e, DatasetGenerationCastError) for e in chain):
        return None
    paths = _data_files_of(files)
    by_columns: dict[tuple, list[str]] = {}
    for path in paths:
        columns = _data_file_columns(path)
        if columns is not None:
            by_columns.setdefault(tuple(columns), []).append(path)
    if len(by_columns) > 1:

        def named(group: list[str]) -> str:
            return ", ".join(Path(p).name for p in group[:3]) + (f" and {len(group) - 3} more" if len(group) > 3 else "")

        kinds = "; ".join(f"{list(columns)} in {named(group)}" for columns, group in by_columns.items())
    elif cast is not None:
        kinds = f"{cast.table_column_names} in one, {cast.requested_column_names} in the first"
    else:
        return None
    return f"its data files do not all have the same columns ({kinds}): they are read as one table, so give --dataset the files of one shape, or give them the same columns"


CSV_SEPARATORS = (";", "|", "\t")
"""What a CSV file is separated by instead of commas (";" in the exports of spreadsheets set to
languages that write 0,5), which datasets' reader, comma-separated, does not guess."""


def _separator_in(header: str) -> str | None:
    """The first of `CSV_SEPARATORS` in `header`, a CSV file's first line read as one column (no
    comma in it): the file is separated by it, not by commas. None where it holds none."""
    return next((sep for sep in CSV_SEPARATORS if sep in header), None)


def _csv_separator_problem(paths: list[str]) -> str | None:
    """Why a .csv file among `paths` does not read as comma-separated: its header line holds no
    comma but one of `CSV_SEPARATORS` (a file of one column then loads as one column named
    "text;topic", or fails where a text holds a comma)."""
    for path in paths:
        if not _uncompressed_name(Path(path).name).endswith(".csv"):
            continue  # a .tsv file is read as tab-separated
        columns = _data_file_columns(path)
        header = columns[0] if columns is not None and len(columns) == 1 else None
        separator = _separator_in(header) if header else None
        if separator:
            return f"{Path(path).name} is separated by {separator!r}, not by commas (its first line: {clip(header, 80)!r}): .csv files are read as comma-separated (.tsv as tab-separated); save it with commas, or as parquet"
    return None


def _data_files_of(files: list[str]) -> list[str]:
    """The data files a dataset given as `files` (data files, or one data folder) is read from."""
    if all(Path(f).is_file() for f in files):
        return list(files)
    if len(files) == 1 and Path(files[0]).is_dir():
        from datasets.data_files import DataFilesDict, get_data_patterns

        try:
            found = DataFilesDict.from_patterns(get_data_patterns(files[0]), base_path=files[0])
        except Exception:  # noqa: BLE001 - no data files found: nothing to compare
            return []
        return [str(f) for split_files in found.values() for f in split_files]
    return []


def _data_file_columns(path: str) -> list[str] | None:
    """The column names of a local data file (parquet's schema, a CSV file's header line, the
    keys of a JSON-lines file's first record), or None where they cannot be read cheaply."""
    import csv
    import json

    try:
        builder = _builder_for(path)
    except DatasetError:
        return None
    if builder == "text":
        return ["text"]
    try:
        if builder == "parquet":
            import pyarrow.parquet as pq

            return [name for name in pq.read_schema(path).names if name != "__index_level_0__"]
        with _text_opener(path)(path, "rt", encoding="utf-8-sig", newline="") as f:
            if builder == "csv":
                delimiter = "\t" if _is_tsv(path) else ","
                return next(csv.reader(f, delimiter=delimiter), None)
            first = json.loads(f.readline())
            return list(first) if isinstance(first, dict) else None
    except (OSError, ValueError, EOFError, UnicodeDecodeError, ImportError):
        return None


def _json_field_problem(files: list[str], json_field: str) -> str | None:
    """Why `json_field` does not name the records of local JSON `files`, read after datasets
    failed (its own words are a bare KeyError: 'data' or a TypeError of list indices)."""
    import json

    for name in files:
        if not (Path(name).is_file() and _builder_for(name) == "json"):
            continue
        try:
            with open(name, encoding="utf-8") as f:
                top = json.load(f)
        except (OSError, ValueError):
            if _is_json_lines(name):
                return f"{name} holds JSON lines (one record a line), not one object: leave --json-field out"
            continue  # not JSON at all: datasets' own message says more
        if not isinstance(top, dict):
            return f"{name} is a JSON {type(top).__name__}, not an object with key {json_field!r}: leave --json-field out"
        if json_field not in top:
            return f"{name} has no top-level key {json_field!r}; its keys are {clip(str(list(top)), 300)}"
        if not isinstance(top[json_field], (list, dict)):
            return f"key {json_field!r} of {name} holds a {type(top[json_field]).__name__}, not a list of records"
    return None


JSON_RECORDS_DIR = "sbert_sae_json_records"
"""Folder of the datasets cache holding the records a dotted --json-field found, as JSON lines."""
_SCALARS = (str, int, float, bool)


def _load_json_records(files_by_split: dict[str, list[str]], json_field: str, split: str, source):
    """The records at the dotted path `json_field` of the JSON files of each split, as a
    Dataset: the path is walked from each file's top object, key by key; where a step meets a
    list every element is gone through in order, so "data.paragraphs" of SQuAD gives every
    paragraph of every article, in file order (files in the order given). A key that itself
    holds dots ("data.v1") is taken whole where an object has it.

    Records that are strings become rows of a column "text", as datasets reads a list of
    strings. The scalar fields (strings, numbers, booleans) of the objects the path passes
    through below the top come along under their path ("data.title", SQuAD's article title),
    unless a record has a field of that name. A field whose values pyarrow cannot type alike
    (SQuAD v2's `qas` holds `plausible_answers` in some questions only, another file's
    field is a string here and a number there) is kept as datasets' Json, each value as it
    was: the text column loads whatever the others hold, and rows whose text is not a string
    are skipped as usual.

    The records are written once, as JSON lines with their features beside them, to a folder
    of the datasets cache named by the path and the files' names, sizes and modification
    times: every later load (label, search, explore...) reads that folder, so its dataset
    fingerprint, and the embedding cache keyed by it, are the same; a changed file is read
    afresh. Memory: one file's parsed objects at a time, and one column of it in Arrow.
    """
    import datasets

    _check_split_names(split, list(files_by_split), source)
    folder = _json_records_folder(files_by_split, json_field)
    features = _read_json_records_features(folder)
    if features is not None:
        # When they were last read (`sbert-sae cache remove --older-than`); a read-only cache still reads.
        with contextlib.suppress(OSError):
            (folder / "last-used").touch()
    if features is None:
        # One process writes a folder at a time (and `sbert-sae cache remove` leaves a folder
        # being written alone); a second one waits, then reads what the first wrote.
        with _json_records_lock(folder):
            features = _read_json_records_features(folder)
            if features is None:
                features = _write_json_records(files_by_split, json_field, folder, source)
    data_files = {name: [str(folder / f"{name}.jsonl")] for name in files_by_split}
    return datasets.load_dataset("json", data_files=data_files, features=features, split=split)


def json_records_lock_path(folder: Path) -> Path:
    """The lock file held while the records folder `folder` is written."""
    return folder.parent / ".locks" / f"{folder.name}.lock"


@contextlib.contextmanager
def _json_records_lock(folder: Path):
    """Hold the lock of the records folder `folder`, waiting while another process holds it;
    its file is deleted as it is let go (`PathLock`)."""
    from .utils import PathLock

    path = json_records_lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = PathLock(path)
    if not lock.acquire(timeout=0):
        logger.warning("another process is writing the JSON records in %s: waiting for it to finish", folder)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _json_records_folder(files_by_split: dict[str, list[str]], json_field: str) -> Path:
    import hashlib
    import json

    import datasets

    stamps = {}
    for name, files in files_by_split.items():
        stamps[name] = []
        for f in files:
            stat = Path(f).stat()
            stamps[name].append([str(Path(f).resolve()), stat.st_size, stat.st_mtime_ns])
    key = json.dumps({"json_field": json_field, "files": stamps, "format": 1}, sort_keys=True)
    return Path(datasets.config.HF_DATASETS_CACHE) / JSON_RECORDS_DIR / hashlib.sha256(key.encode()).hexdigest()[:24]


def _read_json_records_features(folder: Path):
    """The features of records written before, or None (never written, or unreadable)."""
    import json

    import datasets

    try:
        recorded = json.loads((folder / "features.json").read_text(encoding="utf-8"))
        return datasets.Features.from_dict(recorded["features"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_json_records(files_by_split: dict[str, list[str]], json_field: str, folder: Path, source):
    """Write each split's records to `folder` as JSON lines; return (and write last, as the
    mark that the folder is complete) their features."""
    import json

    import datasets
    import pyarrow as pa

    from .utils import atomic_write

    steps = json_field.split(".")
    types: dict[str, list] = {}  # field -> its Arrow type in each file; None where untypable
    try:
        records_written = _write_split_records(files_by_split, steps, json_field, folder, source, types)
    except BaseException:
        # Without its features.json the folder is never read: a walk that failed leaves none.
        shutil.rmtree(folder, ignore_errors=True)
        raise
    json_type = getattr(datasets, "Json", None)  # datasets >= 4.? only
    features, mixed = {}, []
    for field_name, seen in types.items():
        arrow_type = _common_type(seen)
        feature = None
        if arrow_type is not None:
            try:
                feature = datasets.Features.from_arrow_schema(pa.schema([pa.field(field_name, arrow_type)]))[field_name]
            except Exception:  # noqa: BLE001 - a type datasets has no feature for (an empty struct...)
                feature = None
        if feature is None:
            mixed.append(field_name)
            feature = json_type() if json_type is not None else datasets.Value("string")
        elif feature == datasets.Value("null"):
            feature = datasets.Value("string")  # null in every record: typed as text would be
        features[field_name] = feature
    as_text = []
    if mixed:
        how = "kept as JSON values" if json_type is not None else "kept as JSON text (this datasets version has no Json feature)"
        logger.warning("fields %s of the records at %r hold values of several types: %s", mixed, json_field, how)
        if json_type is None:
            as_text = mixed
    # Objects were given their field's keys one file and `NESTED_CHUNK` records at a time
    # (`_normalise_nested`); across files or chunks a key may still be missing somewhere.
    several = sum(len(files) for files in files_by_split.values()) > 1 or records_written > NESTED_CHUNK
    fill = {name: _common_type(seen) for name, seen in types.items() if name not in mixed and several and _holds_struct(_common_type(seen))}
    if fill or as_text:
        _rewrite_records(folder, list(files_by_split), fill, as_text)
    features = datasets.Features(features)
    atomic_write(folder / "features.json", lambda tmp: Path(tmp).write_text(json.dumps({"json_field": json_field, "features": features.to_dict()}), encoding="utf-8"))
    return features


def _write_split_records(files_by_split: dict[str, list[str]], steps: list[str], json_field: str, folder: Path, source, types: dict[str, list]) -> int:
    """Write each split's records, a file at a time, to `folder`/<split>.jsonl; return how many."""
    import json

    from .utils import atomic_write

    total = 0
    for split_name, files in files_by_split.items():
        count = 0

        def write(tmp: str, files=files) -> None:
            nonlocal count
            with open(tmp, "w", encoding="utf-8") as out:
                for name in files:
                    records = _json_path_records(name, steps, json_field, source)
                    _normalise_nested(records)
                    _note_field_types(records, types)
                    out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
                    count += len(records)

        atomic_write(folder / f"{split_name}.jsonl", write)
        # datasets fingerprints a local file by its modification time, and the embedding cache
        # is keyed by that fingerprint: records written again (after `sbert-sae cache remove`)
        # are the same records, stamped alike, so their embeddings are found, not made again.
        newest = max(Path(name).stat().st_mtime_ns for name in files)
        os.utime(folder / f"{split_name}.jsonl", ns=(newest, newest))
        if not count:
            raise DatasetError(f"cannot load dataset {source!r} with --json-field {json_field!r}: it finds no records in {clip(str(files), 300)} (every list on the path is empty)")
        total += count
    return total


NESTED_CHUNK = 20_000
"""Records typed (and their objects given the same keys) at a time: one chunk of one field in Arrow."""


def _sorted_keys(value):
    if isinstance(value, dict):
        return {key: _sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(item) for item in value]
    return value


def _holds_struct(arrow_type) -> bool:
    import pyarrow as pa

    if arrow_type is None:
        return False
    if pa.types.is_struct(arrow_type):
        return True
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return _holds_struct(arrow_type.value_type)
    return False


def _normalise_nested(records: list, chunk: int = NESTED_CHUNK) -> None:
    """Give the objects inside the records' fields (not the records' own fields, the columns)
    every key their field's other objects have (None where absent) and their keys in sorted
    order, in place, `chunk` records at a time. datasets up to 3.x types a struct with its
    fields sorted, and cannot cast one whose fields come in another order or lack one
    (SQuAD's questions hold question, id, answers, and in v2 some plausible_answers too):
    written so, the lines load on every version as they do on the newest."""
    import pyarrow as pa

    nested = dict.fromkeys(name for record in records if isinstance(record, dict) for name, value in record.items() if isinstance(value, (dict, list)))
    for name in nested:
        for start in range(0, len(records), chunk):
            part = [r for r in records[start : start + chunk] if isinstance(r, dict) and name in r]
            try:  # pyarrow's one type for the values gives each object the keys the others have
                values = pa.array([r[name] for r in part]).to_pylist()
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                values = [r[name] for r in part]  # not typable alike: kept as JSON values, as they are
            for record, value in zip(part, values):
                record[name] = _sorted_keys(value)


def _note_field_types(records: list[dict], types: dict[str, list], chunk: int = 20_000) -> None:
    """Add each field's Arrow type over `records` (None where pyarrow cannot type its values
    alike) to `types`, a field and `chunk` records at a time: beside the parsed records, one
    chunk of one column in Arrow."""
    import pyarrow as pa

    names = dict.fromkeys(name for record in records for name in record)
    for name in names:
        seen = []
        for start in range(0, len(records), chunk):
            try:
                seen.append(pa.array([record.get(name) for record in records[start : start + chunk]]).type)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                seen = [None]
                break
        types.setdefault(name, []).append(_common_type(seen))


def _common_type(seen: list):
    """The one Arrow type the types a field has in each file widen to, or None."""
    import pyarrow as pa

    if any(t is None for t in seen):
        return None
    known = list(dict.fromkeys(t for t in seen if not pa.types.is_null(t)))
    if not known:
        return pa.null()
    if len(known) == 1:
        return known[0]
    try:
        return pa.unify_schemas([pa.schema([pa.field("f", t)]) for t in known], promote_options="permissive").field("f").type
    except (pa.ArrowException, TypeError, ValueError):
        return None


def _rewrite_records(folder: Path, splits: list[str], fill: dict, as_text: list[str], chunk: int = NESTED_CHUNK) -> None:
    """Rewrite each split's records: the objects of the fields in `fill` given every key of
    the field's type over all files (None where absent, keys sorted, see `_normalise_nested`);
    without datasets' Json feature, the non-string values of the fields `as_text` as JSON
    text. The file keeps its time (the dataset's fingerprint, see `_write_split_records`)."""
    import itertools
    import json

    import pyarrow as pa

    from .utils import atomic_write

    for split_name in splits:
        path = folder / f"{split_name}.jsonl"

        def write(tmp: str, path=path) -> None:
            with open(path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as out:
                while lines := list(itertools.islice(src, chunk)):
                    records = [json.loads(line) for line in lines]
                    for name, arrow_type in fill.items():
                        part = [r for r in records if name in r]
                        try:
                            values = pa.array([r[name] for r in part], type=arrow_type).to_pylist()
                        except (pa.ArrowException, TypeError, ValueError, OverflowError):
                            continue
                        for record, value in zip(part, values):
                            record[name] = _sorted_keys(value)
                    for record in records:
                        for name in as_text:
                            value = record.get(name)
                            if value is not None and not isinstance(value, str):
                                record[name] = json.dumps(value, ensure_ascii=False)
                    out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)

        stamp = path.stat().st_mtime_ns
        atomic_write(path, write)
        os.utime(path, ns=(stamp, stamp))


def _json_path_records(name: str, steps: list[str], json_field: str, source) -> list[dict]:
    """The records at the path `steps` of the JSON file `name` (see `_load_json_records`)."""
    top = _read_json_document(name, json_field, source)
    records: list[dict] = []

    def fail(problem: str) -> DatasetError:
        return DatasetError(f"cannot load dataset {source!r} with --json-field {json_field!r}: {problem}")

    def walk(value, i: int, where: str, keys: str, carried: dict) -> None:
        if isinstance(value, list):
            for j, item in enumerate(value):
                walk(item, i, f"{where}[{j}]", keys, carried)
            return
        if i == len(steps):
            if isinstance(value, dict):
                records.append({**value, **{k: v for k, v in carried.items() if k not in value}} if carried else value)
            elif isinstance(value, str):
                records.append({"text": value, **carried})
            elif "[" in where:
                raise fail(f"{where} of {name} is a {type(value).__name__}, not a record (an object) or a text (a string)")
            else:
                raise fail(f"key {where!r} of {name} holds a {type(value).__name__}, not a list of records")
            return
        if not isinstance(value, dict):
            if not where:
                raise fail(f"{name} is a JSON {type(value).__name__}, not an object with key {steps[i]!r}: leave --json-field out")
            raise fail(f"{where if '[' in where else f'key {where!r}'} of {name} holds a {type(value).__name__}, not an object with key {steps[i]!r}")
        key, taken = None, 0
        for j in range(len(steps) - i, 0, -1):  # a key holding dots ("data.v1") is taken whole
            if ".".join(steps[i : i + j]) in value:
                key, taken = ".".join(steps[i : i + j]), j
                break
        if key is None:
            if not where:
                raise fail(f"{name} has no top-level key {steps[i]!r}; its keys are {clip(str(list(value)), 300)}")
            raise fail(f"{where} of {name} has no key {steps[i]!r} (step {i + 1} of the path); its keys are {clip(str(list(value)), 300)}")
        if keys:  # an object below the top: its scalar fields come along, named by their path
            carried = {**carried, **{f"{keys}.{k}": v for k, v in value.items() if k != key and isinstance(v, _SCALARS)}}
        walk(value[key], i + taken, f"{where}.{key}" if where else key, f"{keys}.{key}" if keys else key, carried)

    walk(top, 0, "", "", {})
    return records


def _read_json_document(name: str, json_field: str, source):
    """The parsed JSON file `name` (.gz, .bz2, .xz read as such)."""
    import json

    opener = _text_opener(name)
    if Path(name).suffix.lower() == ".zst":
        raise DatasetError(f"--json-field {json_field!r} reads .json, .json.gz, .json.bz2 or .json.xz files: decompress {name}")
    try:
        with opener(name, "rt", encoding="utf-8-sig") as f:  # a byte-order mark, as Windows editors write, is skipped
            return json.load(f)
    except ValueError as err:
        if opener is open and _is_json_lines(name):
            problem = f"{name} holds JSON lines (one record a line), not one object: leave --json-field out"
        else:
            problem = f"{name} is not valid JSON ({type(err).__name__}: {_one_line(str(err))})"
        raise DatasetError(f"cannot load dataset {source!r} with --json-field {json_field!r}: {problem}") from err
    except OSError as err:
        raise DatasetError(f"cannot read {name}: {err}") from err


def _folder_json_files(folder: str, json_field: str) -> dict[str, list[str]]:
    """The data files of each split of a folder, found as datasets finds them (train.json,
    test.json, ...), for a dotted --json-field: JSON files only."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(folder), base_path=folder)
    except Exception as err:  # noqa: BLE001 - datasets' EmptyDatasetError and kin
        raise DatasetError(f"cannot find data files in folder {folder!r}: {err}") from err
    files_by_split = {str(name): [str(f) for f in files] for name, files in found.items()}
    for files in files_by_split.values():
        others = sorted({_builder_for(f) for f in files} - {"json"})
        if others:
            raise DatasetError(f"--json-field {json_field!r} applies to JSON files; folder {folder!r} holds {others[0]} files")
    return files_by_split


def _is_json_lines(name: str) -> bool:
    import json

    try:
        with open(name, encoding="utf-8") as f:
            first = f.readline()
        return isinstance(json.loads(first), dict)
    except (OSError, ValueError):
        return False


def _root_cause(err: BaseException) -> BaseException:
    seen = {id(err)}
    while (err.__cause__ or err.__context__) is not None and id(err.__cause__ or err.__context__) not in seen:
        err = err.__cause__ or err.__context__
        seen.add(id(err))
    return err


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_split_names(split: str, available, source, what: str | None = None) -> None:
    """Refuse a split expression ("train", "test[:10%]", "train+validation") that names a split
    `source` does not have, or that cannot be read; `what` says which splits it has, where
    "it has splits [...]" would not say why (data files given by name are one split)."""
    from datasets import ReadInstruction

    try:
        names = {part.splitname for part in ReadInstruction.from_spec(split)._relative_instructions}
    except (ValueError, AssertionError) as err:
        raise DatasetError(f"cannot read split {split!r} of {source!r}: {err}") from err
    unknown = sorted(names - set(available))
    if unknown:
        what = what or f"it has splits {sorted(available)}"
        raise DatasetError(f"split {unknown[0]!r} not in {source!r}; {what} (--split {split!r})")


def _select_split(loaded, split: str, source: str, what: str | None = None):
    """The rows of `split` ("test", "train[:10%]", "train[100:]+validation") of a loaded DatasetDict
    (`what`: as `_check_split_names` takes it)."""
    import datasets

    if split in loaded:
        return loaded[split]
    _check_split_names(split, list(loaded), source, what)
    from datasets import ReadInstruction

    parts = [
        loaded[part.splitname].select(range(part.from_, part.to))
        for part in ReadInstruction.from_spec(split).to_absolute({name: len(d) for name, d in loaded.items()})
    ]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).exists() for name in ("state.json", "dataset_dict.json", "dataset_info.json"))


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).suffix.lower() in FILE_BUILDERS


def dataset_fingerprint(ds) -> str:
    """A string that changes when the dataset's content changes (datasets' own fingerprint)."""
    return f"{getattr(ds, '_fingerprint', None)}:{len(ds)}"


def flatten_for(ds, *columns: str | None):
    """`ds` with its struct columns flattened ("meta" -> "meta.body", "meta.lang") when a
    column named with a dot ("meta.body") is asked for and is not a column of its own: the way
    to address a nested field as the text or domain column. Flattening is deterministic (its
    fingerprint follows from the dataset's), so the embedding cache finds the same entry."""
    wanted = [c for c in columns if c and "." in c and c not in ds.column_names]
    if wanted and any(isinstance(ds.features[name], dict) for name in ds.column_names):
        return ds.flatten()
    return ds


def _string_columns(ds) -> list[str]:
    import datasets

    return [name for name, feature in ds.features.items() if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")]


def require_column(ds, column: str, purpose: str) -> None:
    if column not in ds.column_names:
        hint = ""
        if purpose == "text":
            # Name the columns that could hold the texts, and the option that picks one.
            nested = [f"{name}.{field}" for name, feature in ds.features.items() if isinstance(feature, dict) for field in feature]
            hint = f"; pick one with --text-column (string columns: {_string_columns(ds) or 'none'}" + (f"; nested fields: {nested}" if nested else "") + ")"
            holder = _records_key(ds)
            deeper = _nested_records_path(ds, column)
            if holder:
                # SQuAD's texts sit below the records under "data": name the whole path.
                below = deeper if deeper and deeper[0] == holder else [holder]
                hint += f"; the JSON file is one object whose records appear to sit under key {'.'.join(below)!r}: pass --json-field {'.'.join(below)}"
            elif deeper:
                path = ".".join(deeper)
                hint += f"; field {path!r} of its records holds records with field {column!r}: add '.{path}' to the end of the --json-field path"
            if (ds.info.builder_name or "") == "csv" and len(ds.column_names) == 1:
                separator = _separator_in(ds.column_names[0])
                if separator:
                    hint += f"; the CSV file's one column is named with {separator!r}: the file is separated by {separator!r}, not by commas, as .csv files are read (.tsv: tabs); save it with commas, or as parquet"
        raise DatasetError(f"{purpose} column {column!r} not in dataset; its columns are {ds.column_names}{hint}")


def _records_key(ds) -> str | None:
    """The column holding a list (of records or of texts) when `ds` is a JSON file read as one
    object, one row: SQuAD's {"version": "1.1", "data": [...]} loads as columns version and data."""
    import pyarrow as pa

    if len(ds) != 1 or (ds.info.builder_name or "") != "json":
        return None
    schema = ds.data.schema
    lists = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)]
    if not lists:
        return None
    return max(lists, key=lambda name: len(ds[0][name] or []))


def _nested_records_path(ds, column: str) -> list[str] | None:
    """The keys from a list column of a JSON dataset down to nested records (objects in lists)
    that have a field `column`: ["paragraphs"] when the articles of SQuAD read with
    --json-field data have no "context" but their paragraphs do."""
    import pyarrow as pa

    def below(arrow_type, through_list: bool) -> list[str] | None:
        while pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
            arrow_type, through_list = arrow_type.value_type, True
        if not pa.types.is_struct(arrow_type):
            return None
        names = [arrow_type.field(i).name for i in range(arrow_type.num_fields)]
        if through_list and column in names:
            return []
        for i, name in enumerate(names):
            path = below(arrow_type.field(i).type, through_list)
            if path is not None:
                return [name, *path]
        return None

    if (ds.info.builder_name or "") != "json":
        return None
    for f in ds.data.schema:
        if pa.types.is_list(f.type) or pa.types.is_large_list(f.type):
            path = below(f.type, False)
            if path is not None:
                return [f.name, *path]
    return None


def check_text_column_type(ds, text_column: str) -> None:
    """Refuse, naming its type, a text column whose type cannot hold strings (numbers, lists of
    strings, structs, class labels): each of its rows would be skipped as "not a string"."""
    import datasets

    feature = ds.features[text_column]
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "null"):
        return
    if _is_json_feature(feature):
        return  # rows of mixed types (a JSON file): each row is checked, non-strings skipped
    if isinstance(feature, dict):
        fields = [f"{text_column}.{name}" for name in feature]
        what = f"is a struct with fields {list(feature)}: address a field with --text-column, e.g. {fields[0]!r}" if fields else "is an empty struct"
    elif isinstance(feature, datasets.Value):
        what = f"holds {feature.dtype} values, not strings (cast it to strings first, or pick another column)"
    else:
        kind = type(feature).__name__
        inner = getattr(feature, "feature", None)
        what = f"holds {kind} values ({inner!r} per row), not one string per row: join or explode them into a string column first" if inner is not None else f"holds {kind} values, not strings"
    others = [c for c in _string_columns(ds) if c != text_column]
    raise DatasetError(f"text column {text_column!r} {what}" + (f"; string columns: {others}" if others else ""))


@dataclass
class TextRows:
    """Which rows of a dataset have usable text.

    Attributes:
        row_ids: (n_valid,) int64 indices of the rows whose text is a non-empty string.
        skipped: reason -> number of rows skipped ("missing", "not a string", "empty").
        examples: reason -> up to 5 row ids, for the log.
    """

    row_ids: np.ndarray
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[int]] = field(default_factory=dict)
    only_text: str | None = None
    """The text, when every usable row holds the same one (e.g. a constant column chosen as the text)."""

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


def find_text_rows(ds, text_column: str, on_bad: str = "skip", batch_size: int = 10_000) -> TextRows:
    """Check every row's text; skip (and count) or refuse rows that are missing, not strings or empty.

    Args:
        on_bad: "skip" counts bad rows and leaves them out; "error" raises on the first.
    """
    require_column(ds, text_column, "text")
    check_text_column_type(ds, text_column)
    if on_bad not in ("skip", "error"):
        raise DatasetError(f"on_bad must be 'skip' or 'error', got {on_bad!r}")
    keep: list[np.ndarray] = []
    skipped: dict[str, int] = {}
    examples: dict[str, list[int]] = {}
    column = ds.select_columns([text_column])
    first, all_same = None, True
    for start in range(0, len(ds), batch_size):
        values = column[start : start + batch_size][text_column]
        ok = np.ones(len(values), dtype=bool)
        for offset, value in enumerate(values):
            if value is None:
                reason = "missing"
            elif not isinstance(value, str):
                reason = "not a string"
            elif not value.strip():
                reason = "empty"
            else:
                if first is None:
                    first = value
                elif all_same and value != first:
                    all_same = False
                continue
            row = start + offset
            if on_bad == "error":
                raise DatasetError(f"row {row} of column {text_column!r} is {reason} ({value!r})")
            ok[offset] = False
            skipped[reason] = skipped.get(reason, 0) + 1
            examples.setdefault(reason, [])
            if len(examples[reason]) < 5:
                examples[reason].append(row)
        keep.append(np.flatnonzero(ok).astype(np.int64) + start)
    row_ids = np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)
    if skipped:
        logger.warning(
            "skipped %d rows of column %r: %s (first rows: %s)",
            sum(skipped.values()),
            text_column,
            skipped,
            examples,
        )
    if len(row_ids) == 0:
        raise DatasetError(f"no row of column {text_column!r} holds a non-empty string ({skipped})")
    return TextRows(row_ids=row_ids, skipped=skipped, examples=examples, only_text=first if all_same else None)


def column_values(ds, column: str, row_ids: np.ndarray) -> list:
    """Values of `column` at `row_ids`, in that order, as a list. Read through Arrow: the
    datasets `Column` that `ds[column]` gives formats one row at a time in Python when
    iterated (7.4 s against 0.7 s for 220k texts)."""
    require_column(ds, column, "requested")
    if not len(row_ids):
        return []
    values = ds.select_columns([column]).select(row_ids).with_format("arrow")[column].to_pylist()
    if _is_json_feature(ds.features[column]):
        # A JSON column whose rows mix types (strings and numbers, lists...) is a datasets `Json`
        # feature, stored in Arrow as JSON text: read raw, the string "cat" was '"cat"', quotes
        # and escapes included, and was embedded and labelled so. Decode it as `ds[column]` does.
        import json

        values = [None if v is None else json.loads(v) for v in values]
    return values


def _is_json_feature(feature) -> bool:
    import datasets

    json_type = getattr(datasets, "Json", None)  # datasets >= 4.? only
    return json_type is not None and isinstance(feature, json_type)


def domain_names(ds, domain_column: str, values: list) -> list:
    """`values` of `domain_column` as domain names: a ClassLabel's integers become its class
    names (its -1, "no label", becomes None), other values their string; None stays None.
    Without this a ClassLabel column's domains were named "0", "1", ... and `--domain <name>`
    found none of them. Names are in Unicode's composed form (NFC): "Café" written with a
    combining accent in some rows (text pasted from macOS file names, some exports) and with
    "é" in others was two domains, with identical-looking rows in domains.md."""
    import unicodedata

    import datasets

    feature = ds.features.get(domain_column)
    if isinstance(feature, datasets.ClassLabel):
        names = [None if v is None or v < 0 else feature.int2str(int(v)) for v in values]
    else:
        names = [None if v is None else str(v) for v in values]
    return [None if name is None else unicodedata.normalize("NFC", name) for name in names]


def domain_row_ids(ds, domain_column: str, row_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Group `row_ids` by the name (`domain_names`) of `domain_column`; rows with no value are left out."""
    require_column(ds, domain_column, "domain")
    values = domain_names(ds, domain_column, column_values(ds, domain_column, row_ids))
    groups: dict[str, list[int]] = {}
    missing = 0
    for row, value in zip(row_ids.tolist(), values):
        if value is None or not value.strip():
            missing += 1
            continue
        groups.setdefault(value, []).append(row)
    if missing:
        logger.warning("%d rows have no value in domain column %r and belong to no domain", missing, domain_column)
    return {name: np.asarray(rows, dtype=np.int64) for name, rows in sorted(groups.items())}


def split_heldout(row_ids: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of `row_ids` into (train, held-out); held-out rows are never trained on.

    The choice depends only on the row ids, the fraction and the seed, so a domain's
    held-out rows are the same whether it is trained alone or with the others.
    """
    if not 0 <= fraction < 1:
        raise DatasetError(f"held-out fraction must be in [0, 1), got {fraction}")
    # A hash of (seed, row id) instead of a permutation keeps each row's fate independent
    # of which other rows are present.
    seed_term = np.uint64((seed * 0xBF58476D1CE4E5B9 + 1) % (1 << 64))
    keys = row_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + seed_term
    keys ^= keys >> np.uint64(31)
    keys *= np.uint64(0x94D049BB133111EB)
    keys ^= keys >> np.uint64(29)
    u = (keys >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    heldout = u < fraction
    if fraction > 0 and not heldout.any() and len(row_ids) > 1:
        heldout[np.argmin(u)] = True
    if heldout.all():
        raise DatasetError(f"held-out fraction {fraction} leaves no training rows out of {len(row_ids)}")
    return row_ids[~heldout], row_ids[heldout]
