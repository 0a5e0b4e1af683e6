"""Text datasets: load any Hugging Face dataset, check its text column, split off held-out rows.

`--dataset` may be a Hub id (with config and split), a `save_to_disk` folder, a folder of
data files, or parquet / JSON-lines / JSON / CSV / text files (a JSON file that is one object
holding its records under a key, SQuAD's {"version": ..., "data": [...]}, with `--json-field`).
Rows are addressed by their index in the loaded split ("row id") everywhere downstream, so
every activation can be traced back to its text.
"""

from __future__ import annotations

import logging
import re
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


def _builder_for(path: str) -> str:
    name = path.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for ext, builder in FILE_BUILDERS.items():
        if name.endswith(ext):
            return builder
    raise DatasetError(f"cannot tell the format of data file {path!r}: use one of {sorted(FILE_BUILDERS)}")


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
            their records sit ("data" in SQuAD's {"version": ..., "data": [...]}).
    """
    import datasets

    files = [source] if isinstance(source, str) else list(source)
    # datasets' json builder reads its `field` option; other builders refuse it as unknown.
    field_kwargs = {"field": json_field} if json_field is not None else {}
    try:
        if json_field is not None and not json_field:
            raise DatasetError("--json-field is empty: name the top-level key of the JSON object that holds the records")
        if len(files) == 1 and Path(files[0]).is_dir() and _is_saved_dataset(Path(files[0])):
            if json_field is not None:
                raise DatasetError(f"--json-field {json_field!r} applies to JSON files; {files[0]!r} is a save_to_disk dataset")
            loaded = datasets.load_from_disk(files[0])
            if not isinstance(loaded, datasets.DatasetDict):
                # One saved Dataset is one split: "train", as data files are.
                loaded = datasets.DatasetDict({"train": loaded})
            ds = _select_split(loaded, split, files[0])
        elif all(Path(f).is_file() for f in files):
            builders = {_builder_for(f) for f in files}
            if len(builders) > 1:
                raise DatasetError(f"data files mix formats {sorted(builders)}: {files}")
            builder = builders.pop()
            if json_field is not None and builder != "json":
                raise DatasetError(f"--json-field {json_field!r} applies to JSON files; {files} are {builder} files")
            kwargs = {"delimiter": "\t"} if all(f.lower().endswith(".tsv") for f in files) else dict(field_kwargs)
            _check_split_names(split, ["train"], source)  # data files given by name are one split, "train"
            ds = datasets.load_dataset(builder, data_files=files, split=split, **kwargs)
        elif len(files) == 1 and Path(files[0]).is_dir():
            ds = datasets.load_dataset(files[0], name=config_name, split=split, **field_kwargs)
        elif len(files) == 1 and _looks_like_path(files[0]):
            raise DatasetError(f"dataset {files[0]!r} not found: no such file or folder")
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
        if json_field is not None:
            problem = _json_field_problem(files, json_field)
            if problem:
                raise DatasetError(f"cannot load dataset {source!r} with --json-field {json_field!r}: {problem}") from err
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
    return ds


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


def _check_split_names(split: str, available, source) -> None:
    """Refuse a split expression ("train", "test[:10%]", "train+validation") that names a split
    `source` does not have, or that cannot be read."""
    from datasets import ReadInstruction

    try:
        names = {part.splitname for part in ReadInstruction.from_spec(split)._relative_instructions}
    except (ValueError, AssertionError) as err:
        raise DatasetError(f"cannot read split {split!r} of {source!r}: {err}") from err
    unknown = sorted(names - set(available))
    if unknown:
        what = "data files have one split, 'train'" if list(available) == ["train"] else f"it has splits {sorted(available)}"
        raise DatasetError(f"split {unknown[0]!r} not in {source!r}; {what} (--split {split!r})")


def _select_split(loaded, split: str, source: str):
    """The rows of `split` ("test", "train[:10%]", "train[100:]+validation") of a loaded DatasetDict."""
    import datasets

    if split in loaded:
        return loaded[split]
    _check_split_names(split, list(loaded), source)
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
            if holder:
                hint += f"; the JSON file is one object whose records appear to sit under key {holder!r}: pass --json-field {holder}"
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
    found none of them."""
    import datasets

    feature = ds.features.get(domain_column)
    if isinstance(feature, datasets.ClassLabel):
        return [None if v is None or v < 0 else feature.int2str(int(v)) for v in values]
    return [None if v is None else str(v) for v in values]


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
