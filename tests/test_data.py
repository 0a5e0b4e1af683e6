"""Loading datasets from every kind of source, checking text, held-out splits, domains."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sbert_sae.data import column_values, domain_row_ids, find_text_rows, load_text_dataset, split_heldout
from sbert_sae.errors import DatasetError

ROWS = [
    {"text": "Photosynthesis turns light into chemical energy.", "topic": "Biology"},
    {"text": "A group is a set with an associative operation.", "topic": "Mathematics"},
    {"text": "Impressionism began in 19th-century Paris.", "topic": "Arts"},
    {"text": "Mitochondria are the powerhouse of the cell.", "topic": "Biology"},
]


@pytest.fixture
def files(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_list(ROWS)
    out = {}
    out["parquet"] = tmp_path / "d.parquet"
    ds.to_parquet(str(out["parquet"]))
    out["jsonl"] = tmp_path / "d.jsonl"
    out["jsonl"].write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    out["csv"] = tmp_path / "d.csv"
    ds.to_csv(str(out["csv"]), index=False)
    out["disk"] = tmp_path / "saved"
    ds.save_to_disk(str(out["disk"]))
    out["folder"] = tmp_path / "folder"
    out["folder"].mkdir()
    ds.to_parquet(str(out["folder"] / "train.parquet"))
    return out


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "csv", "disk", "folder"])
def test_every_source_kind_loads_the_same_rows(files, kind):
    ds = load_text_dataset(str(files[kind]))
    assert ds["text"] == [r["text"] for r in ROWS]
    assert ds["topic"] == [r["topic"] for r in ROWS]


@pytest.mark.parametrize("source", ["", " ", []])
def test_no_dataset_given_is_named_as_such(source):
    # DataArguments() leaves its dataset "": loading it failed as "cannot load dataset ''
    # (config=None, split='train'): IndexError: list index out of range".
    with pytest.raises(DatasetError, match="no dataset given"):
        load_text_dataset(source)


def test_a_dataset_given_as_path_objects_loads_and_one_in_memory_is_named(files):
    # pathlib paths failed as "TypeError: 'PosixPath' object is not iterable" (load_text_dataset,
    # SteerableIndex.build); a DataFrame was iterated as its column names and "text" loaded as
    # datasets' text builder over the current folder's files; a Dataset, None, a number: TypeErrors.
    import pandas as pd
    from datasets import Dataset

    from sbert_sae.pipeline import DataArguments

    assert load_text_dataset(files["disk"])["text"] == [r["text"] for r in ROWS]
    assert load_text_dataset((files["jsonl"], files["jsonl"]))["text"] == [r["text"] for r in ROWS] * 2
    assert DataArguments(dataset=files["parquet"]).dataset == str(files["parquet"])
    assert DataArguments(dataset=[files["parquet"]]).dataset == [str(files["parquet"])]
    refused = {
        "Dataset": (Dataset.from_list(ROWS), r"save_to_disk\(folder\)"),
        "DataFrame": (pd.DataFrame(ROWS), r"to_parquet\("),
        "NoneType": (None, ""),
        "int": (3, ""),
    }
    for kind, (source, hint) in refused.items():
        for load in (load_text_dataset, lambda s: DataArguments(dataset=s)):
            with pytest.raises(DatasetError, match=f"dataset must be a Hub dataset id, a folder, a data file or a list of them, got {kind}.*{hint}"):
                load(source)


def test_dataset_dict_split_is_chosen_and_a_wrong_one_is_named(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(ROWS[:3]), "test": Dataset.from_list(ROWS[3:])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_text_dataset(str(tmp_path / "dd"), split="test")) == 1
    with pytest.raises(DatasetError, match=r"split 'validation' not in .* splits \['test', 'train'\]"):
        load_text_dataset(str(tmp_path / "dd"), split="validation")


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "csv", "disk", "folder"])
def test_a_split_slice_is_applied_to_every_source_kind(files, kind):
    # Data files and saved Datasets ignored --split: "train[:2]" trained on every row, "test" too.
    assert load_text_dataset(str(files[kind]), split="train[:2]")["text"] == [r["text"] for r in ROWS[:2]]
    assert load_text_dataset(str(files[kind]), split="train[-50%:]")["text"] == [r["text"] for r in ROWS[2:]]
    with pytest.raises(DatasetError, match=r"split '?\"?test"):
        load_text_dataset(str(files[kind]), split="test")


def test_a_data_folder_without_the_split_asked_for_names_its_splits(tmp_path):
    # A folder of data/test-*.parquet and data/validation-*.parquet (as Hub datasets hold them)
    # loaded without --split said "ValueError: Unknown split "train". Should be one of
    # ['validation', 'test']."; it is now named as a saved DatasetDict's missing split is.
    from datasets import Dataset

    (tmp_path / "corpus" / "data").mkdir(parents=True)
    for name, rows in (("test", ROWS[:2]), ("validation", ROWS[2:])):
        Dataset.from_list(rows).to_parquet(str(tmp_path / "corpus" / "data" / f"{name}-00000-of-00001.parquet"))
    with pytest.raises(DatasetError, match=r"^split 'train' not in '.*corpus'; it has splits \['test', 'validation'\] \(--split 'train'\)$"):
        load_text_dataset(str(tmp_path / "corpus"))
    assert load_text_dataset(str(tmp_path / "corpus"), split="validation")["text"] == [r["text"] for r in ROWS[2:]]


def test_a_missing_split_is_named_with_what_the_source_holds(files, tmp_path):
    # A saved Dataset (one split) asked for --split test said "data files have one split", as a
    # saved DatasetDict of one split did: neither is data files.
    from datasets import Dataset, DatasetDict

    with pytest.raises(DatasetError, match=r"split 'test' not in .*; a saved Dataset \(not a DatasetDict\) is one split, 'train' \(--split 'test'\)$"):
        load_text_dataset(str(files["disk"]), split="test")
    with pytest.raises(DatasetError, match=r"split 'test' not in .*; data files have one split, 'train' \(--split 'test'\)$"):
        load_text_dataset(str(files["parquet"]), split="test")
    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DatasetError, match=r"split 'test' not in .*; it has splits \['train'\] \(--split 'test'\)$"):
        load_text_dataset(str(tmp_path / "dd"), split="test")


def test_dataset_dict_split_slices_and_sums(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(ROWS[:3]), "test": Dataset.from_list(ROWS[3:])}).save_to_disk(str(tmp_path / "dd"))
    assert load_text_dataset(str(tmp_path / "dd"), split="train[1:]")["text"] == [r["text"] for r in ROWS[1:3]]
    assert load_text_dataset(str(tmp_path / "dd"), split="train[:1]+test")["text"] == [ROWS[0]["text"], ROWS[3]["text"]]
    with pytest.raises(DatasetError, match=r"split 'dev' not in .* splits \['test', 'train'\]"):
        load_text_dataset(str(tmp_path / "dd"), split="train+dev")
    with pytest.raises(DatasetError, match=r"cannot read split 'train\[\[' of"):
        load_text_dataset(str(tmp_path / "dd"), split="train[[")


def test_unknown_sources_are_named(tmp_path):
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_text_dataset(str(tmp_path / "nope.parquet"))
    bad = tmp_path / "notes.docx"
    bad.write_text("x")
    with pytest.raises(DatasetError, match="cannot tell the format of data file"):
        load_text_dataset(str(bad))


def test_empty_dataset_is_refused(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("text,topic\n")
    with pytest.raises(DatasetError, match="empty"):
        load_text_dataset(str(path))


def test_bad_text_rows_are_skipped_and_counted_or_refused():
    from datasets import Dataset

    ds = Dataset.from_dict({"text": ["fine", None, "", "   ", "also fine"], "other": [1, 2, 3, 4, 5]})
    rows = find_text_rows(ds, "text")
    assert rows.row_ids.tolist() == [0, 4]
    assert rows.skipped == {"missing": 1, "empty": 2}
    assert rows.examples["empty"] == [2, 3]
    with pytest.raises(DatasetError, match="row 1 of column 'text' is missing"):
        find_text_rows(ds, "text", on_bad="error")
    with pytest.raises(DatasetError, match=r"text column 'body' not in dataset; its columns are \['text', 'other'\]"):
        find_text_rows(ds, "body")
    with pytest.raises(DatasetError, match="text column 'other' holds int64 values, not strings"):
        find_text_rows(ds, "other")
    with pytest.raises(DatasetError, match="no row of column 'text' holds a non-empty string"):
        find_text_rows(Dataset.from_dict({"text": [None, " "]}), "text")


def test_heldout_split_is_seeded_disjoint_and_stable_under_subsets():
    ids = np.arange(20_000, dtype=np.int64)
    train, held = split_heldout(ids, 0.05, seed=0)
    assert len(np.intersect1d(train, held)) == 0
    assert len(train) + len(held) == len(ids)
    assert 0.04 < len(held) / len(ids) < 0.06
    again_train, again_held = split_heldout(ids, 0.05, seed=0)
    assert np.array_equal(held, again_held)
    other = split_heldout(ids, 0.05, seed=1)[1]
    assert not np.array_equal(held, other)
    # A domain's rows keep their fate when split alone.
    subset = ids[ids % 3 == 0]
    assert set(split_heldout(subset, 0.05, seed=0)[1]) == set(held[held % 3 == 0])
    with pytest.raises(DatasetError, match=r"held-out fraction must be in \[0, 1\), got 1.5"):
        split_heldout(ids, 1.5, seed=0)


def test_domains_group_rows(files):
    ds = load_text_dataset(str(files["disk"]))
    groups = domain_row_ids(ds, "topic", np.arange(len(ds)))
    assert {k: v.tolist() for k, v in groups.items()} == {"Arts": [2], "Biology": [0, 3], "Mathematics": [1]}
    with pytest.raises(DatasetError, match="domain column 'field' not in dataset"):
        domain_row_ids(ds, "field", np.arange(len(ds)))


def test_column_values_are_a_list_in_the_order_asked():
    """Read through Arrow as a plain list (not a datasets Column, which formats row by row when
    iterated), in the order of the ids, repeats and class labels included."""
    from datasets import ClassLabel, Dataset, Features, Value

    ds = Dataset.from_dict(
        {"text": ["a", "b", None, "d"], "topic": [1, 0, 1, 0]},
        features=Features({"text": Value("string"), "topic": ClassLabel(names=["arts", "maths"])}),
    )
    ids = np.array([3, 0, 2, 3])
    texts = column_values(ds, "text", ids)
    assert type(texts) is list and texts == ["d", "a", None, "d"]
    assert texts == [ds[int(i)]["text"] for i in ids]
    assert column_values(ds, "topic", ids) == [ds[int(i)]["topic"] for i in ids] == [0, 1, 1, 0]
    assert column_values(ds, "text", np.array([], dtype=np.int64)) == []
    with pytest.raises(DatasetError, match="'title'"):
        column_values(ds, "title", ids)


def test_a_classlabel_domain_column_groups_rows_by_class_name():
    # A ClassLabel column used to name its domains "0", "1", ...: --domain Mathematics found none,
    # folders were named by the integers and the activations' domain was the integer.
    import datasets

    ds = datasets.Dataset.from_dict(
        {"text": ["a", "b", "c", "d"], "topic": [1, 0, 1, -1]},
        features=datasets.Features({"text": datasets.Value("string"), "topic": datasets.ClassLabel(names=["Arts", "Mathematics"])}),
    )
    groups = domain_row_ids(ds, "topic", np.arange(4))
    assert {name: rows.tolist() for name, rows in groups.items()} == {"Arts": [1], "Mathematics": [0, 2]}  # -1: no label
    ints = datasets.Dataset.from_dict({"text": ["a", "b"], "topic": [3, 7]})
    assert sorted(domain_row_ids(ints, "topic", np.arange(2))) == ["3", "7"]


def test_a_domain_written_with_a_combining_accent_is_the_same_domain():
    """'Café' with a combining accent (U+0301) in some rows and with 'é' in others was two domains,
    two identical-looking rows of domains.md (folders 'caf' and 'caf-<digest>'), and --domain
    matched only the form it was typed in."""
    import unicodedata

    import datasets

    from sbert_sae.pipeline import DataArguments

    composed, decomposed = unicodedata.normalize("NFC", "Café"), unicodedata.normalize("NFD", "Café")
    assert composed != decomposed
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "topic": [composed, decomposed, "Arts"]})
    groups = domain_row_ids(ds, "topic", np.arange(3))
    assert {name: rows.tolist() for name, rows in groups.items()} == {composed: [0, 1], "Arts": [2]}
    assert DataArguments(dataset="x", domain_column="topic", domain=decomposed).domain == composed


def test_text_columns_of_other_shapes_are_named_or_addressed(tmp_path):
    # A missing text column named no candidates nor --text-column; a list-of-strings, number or
    # struct column was refused as "no row holds a non-empty string" ({'not a string': N}); a
    # nested field ("meta.body") could not be addressed at all.
    import datasets

    from sbert_sae.pipeline import DataArguments, load_texts

    path = tmp_path / "shapes.parquet"
    datasets.Dataset.from_dict(
        {
            "title": ["One", "Two", "Three"],
            "paras": [["a b", "c"], ["d"], ["e f"]],
            "year": [1999, 2000, 2001],
            "meta": [{"body": "first body", "lang": "en"}, {"body": "second body", "lang": "fr"}, {"body": "", "lang": "en"}],
        }
    ).to_parquet(str(path))
    with pytest.raises(DatasetError, match=r"--text-column \(string columns: \['title'\]; nested fields: \['meta.body', 'meta.lang'\]\)"):
        load_texts(DataArguments(dataset=str(path)))
    # datasets < 4 calls a list feature Sequence
    with pytest.raises(DatasetError, match=r"'paras' holds (List|Sequence) values .*not one string per row"):
        load_texts(DataArguments(dataset=str(path), text_column="paras"))
    with pytest.raises(DatasetError, match=r"'year' holds int64 values, not strings.*string columns: \['title'\]"):
        load_texts(DataArguments(dataset=str(path), text_column="year"))
    with pytest.raises(DatasetError, match=r"'meta' is a struct with fields \['body', 'lang'\]: address a field with --text-column, e.g. 'meta.body'"):
        load_texts(DataArguments(dataset=str(path), text_column="meta"))
    texts = load_texts(DataArguments(dataset=str(path), text_column="meta.body", domain_column="meta.lang"))
    assert texts.rows.row_ids.tolist() == [0, 1] and texts.rows.skipped == {"empty": 1}
    assert column_values(texts.ds, "meta.body", texts.rows.row_ids) == ["first body", "second body"]
    assert {k: v.tolist() for k, v in domain_row_ids(texts.ds, "meta.lang", texts.rows.row_ids).items()} == {"en": [0], "fr": [1]}


def test_a_json_text_column_of_mixed_types_is_read_as_its_strings(tmp_path):
    # A JSON lines file whose "text" mixes strings with numbers or lists loads as a `Json`
    # feature, stored as JSON text: texts were read (embedded, labelled, searched) as
    # '"a cat sat"', quotes included; the others are now skipped as "not a string".
    rows = [{"text": "a cat sat"}, {"text": 12345}, {"text": 'say "hi"\n'}, {"text": ["a", "b"]}, {"other": 1}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import datasets

    if not hasattr(datasets, "Json"):  # datasets < 4.7 cannot load a column of mixed types at all
        with pytest.raises(DatasetError, match="cannot load dataset .*mixed.jsonl"):
            load_text_dataset(str(path))
        return
    ds = load_text_dataset(str(path))
    rows = find_text_rows(ds, "text")
    assert rows.row_ids.tolist() == [0, 2] and rows.skipped == {"not a string": 2, "missing": 1}
    assert column_values(ds, "text", rows.row_ids) == ["a cat sat", 'say "hi"\n']


def test_a_dataset_folder_with_several_configs_asks_for_config_name(tmp_path):
    # A Hub-style folder whose README declares configs: without --config-name datasets' error
    # advised Python ("load_dataset('hubdir', 'en')"); it now names the option and the configs.
    import datasets

    for name in ("en", "de"):
        (tmp_path / "hubdir" / name).mkdir(parents=True)
        datasets.Dataset.from_dict({"text": [f"{name} one", f"{name} two"]}).to_parquet(str(tmp_path / "hubdir" / name / "train.parquet"))
    (tmp_path / "hubdir" / "README.md").write_text(
        "---\nconfigs:\n- config_name: en\n  data_files: en/*.parquet\n- config_name: de\n  data_files: de/*.parquet\n---\n"
    )
    with pytest.raises(DatasetError, match=r"several configurations \['en', 'de'\]: pick one with --config-name"):
        load_text_dataset(str(tmp_path / "hubdir"))
    assert load_text_dataset(str(tmp_path / "hubdir"), config_name="de")["text"] == ["de one", "de two"]


@pytest.mark.parametrize("ext", ["parquet", "jsonl", "csv"])
@pytest.mark.parametrize("given", ["folder", "files"])
def test_data_files_with_different_columns_are_named_with_their_columns(tmp_path, ext, given):
    # datasets reads a dataset's files as one table; files of other columns failed with "CastError:
    # Couldn't cast text: string source: string ... because column names don't match", naming
    # no file (parquet, JSON lines), or with a message of several lines (CSV).
    import pandas as pd

    folder = tmp_path / "data"
    folder.mkdir()
    frames = {"a": pd.DataFrame(ROWS[:2]), "b": pd.DataFrame(ROWS[2:]).rename(columns={"topic": "source"})}
    for name, frame in frames.items():
        path = folder / f"{name}.{ext}"
        {"parquet": lambda f, p: f.to_parquet(p, index=False), "jsonl": lambda f, p: f.to_json(p, orient="records", lines=True), "csv": lambda f, p: f.to_csv(p, index=False)}[ext](frame, path)
    source = str(folder) if given == "folder" else [str(folder / f"a.{ext}"), str(folder / f"b.{ext}")]
    with pytest.raises(DatasetError) as err:
        load_text_dataset(source)
    message = str(err.value)
    assert f"do not all have the same columns (['text', 'topic'] in a.{ext}; ['text', 'source'] in b.{ext})" in message, message
    assert "\n" not in message


def test_a_csv_file_separated_by_semicolons_is_named_so(tmp_path):
    # A semicolon-separated .csv (a spreadsheet's export in many languages) failed with the
    # parser's "Expected 1 fields in line 3, saw 2" where a text held a comma, or loaded as one
    # column "text;topic" and was refused for having no column 'text': neither said why.
    with_commas = tmp_path / "commas.csv"
    with_commas.write_text("text;topic\nPhotosynthesis;Biology\nA group, with an operation;Mathematics\n")
    with pytest.raises(DatasetError, match=r"commas.csv is separated by ';', not by commas \(its first line: 'text;topic'\)"):
        load_text_dataset(str(with_commas))
    without = tmp_path / "plain.csv"
    without.write_text("text;topic\nPhotosynthesis;Biology\nA group;Mathematics\n")
    with pytest.raises(DatasetError, match=r"columns are \['text;topic'\].*the file is separated by ';', not by commas"):
        find_text_rows(load_text_dataset(str(without)), "text")


def test_a_compressed_tsv_file_is_read_as_tab_separated(tmp_path):
    # x.tsv.gz was read as comma-separated (only a name ending in .tsv got the tab): one column
    # "text\ttopic", or a parser error where a text held a comma.
    import gzip

    body = "text\ttopic\n" + "".join(f"{r['text']}\t{r['topic']}\n" for r in ROWS)
    with gzip.open(tmp_path / "d.tsv.gz", "wt") as f:
        f.write(body)
    ds = load_text_dataset(str(tmp_path / "d.tsv.gz"))
    assert ds.column_names == ["text", "topic"] and ds["text"] == [r["text"] for r in ROWS]
    (tmp_path / "d.csv").write_text("text,topic\nx,y\n")
    with pytest.raises(DatasetError, match=r"data files mix tab-separated \(.tsv\) and comma-separated \(.csv\) files"):
        load_text_dataset([str(tmp_path / "d.tsv.gz"), str(tmp_path / "d.csv")])


def test_rows_of_a_tsv_file_read_as_one_are_warned_about(tmp_path, caplog):
    # A TSV file that does not quote its fields, with a text starting with a double quote: the
    # rows up to the next quote were read as one text (6 rows loaded as 4), without a word.
    path = tmp_path / "unquoted.tsv"
    path.write_text('text\ttopic\n"Hello" she said\tA\n"Unbalanced start\tB\nrow three\tC\n"another" one\tD\nrow five\tE\n')
    with caplog.at_level("WARNING", logger="sbert_sae.data"):
        ds = load_text_dataset(str(path))
    assert len(ds) == 3  # what datasets reads: the warning says why it is not 5
    assert "1 value(s) of column 'text' of unquoted.tsv hold a tab and a line break (the first in row 1: 'Unbalanced start\\tB\\nrow three" in caplog.text
    # a quoted field holding a line break (as pandas writes one) is no such case
    caplog.clear()
    quoted = tmp_path / "quoted.tsv"
    quoted.write_text('text\ttopic\n"two\nlines"\tA\nplain\tB\n')
    with caplog.at_level("WARNING", logger="sbert_sae.data"):
        assert load_text_dataset(str(quoted))["text"] == ["two\nlines", "plain"]
    assert "line break" not in caplog.text
    # a quote never closed: the parser's error, and what it means
    (tmp_path / "open.tsv").write_text('text\ttopic\nrow one\tA\n"never closed\tB\nrow three\tC\n')
    with pytest.raises(DatasetError, match=r"EOF inside string.*a field starts with a double quote \(\"\) that no quote closes: if the file does not quote its fields"):
        load_text_dataset(str(tmp_path / "open.tsv"))


def test_a_file_that_does_not_parse_is_refused_with_the_parsers_reason(tmp_path):
    # datasets wraps parser errors in "DatasetGenerationError: An error occurred while generating
    # the dataset", which named neither what nor where; the parser's own message now follows it.
    path = tmp_path / "quotes.tsv"
    path.write_text('text\ttopic\n"Hi there, she said\tA\nSecond line\tB\n')
    with pytest.raises(DatasetError, match=r"quotes.tsv.*\(ParserError: .*EOF inside string starting at row 1\)"):
        load_text_dataset(str(path))


def test_a_json_object_holding_its_records_under_a_key_is_read_with_json_field(files, tmp_path):
    # A SQuAD-style file {"version": "1.1", "data": [records]} loaded as one row: the error named
    # its columns ['version', 'data'] but not where the records were, and no option could read
    # them. --json-field names the key; the error now says which key and which option.
    from sbert_sae.pipeline import DataArguments, load_texts

    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": "1.1", "data": ROWS}))
    with pytest.raises(DatasetError, match=r"columns are \['version', 'data'\].*records appear to sit under key 'data': pass --json-field data"):
        load_texts(DataArguments(dataset=str(path)))
    texts = load_texts(DataArguments(dataset=str(path), json_field="data", domain_column="topic"))
    assert column_values(texts.ds, "text", texts.rows.row_ids) == [r["text"] for r in ROWS]
    assert sorted(domain_row_ids(texts.ds, "topic", texts.rows.row_ids)) == ["Arts", "Biology", "Mathematics"]
    # several files, a split slice, a folder of such files, a key holding plain strings ("text")
    other = tmp_path / "more.json"
    other.write_text(json.dumps({"version": "1.1", "data": ROWS[:2]}))
    assert load_text_dataset([str(path), str(other)], json_field="data", split="train[3:]")["text"] == [ROWS[3]["text"]] + [r["text"] for r in ROWS[:2]]
    (tmp_path / "folder_of_json").mkdir()
    (tmp_path / "folder_of_json" / "train.json").write_text(path.read_text())
    assert load_text_dataset(str(tmp_path / "folder_of_json"), json_field="data")["text"] == [r["text"] for r in ROWS]
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps({"source": "notes", "texts": [r["text"] for r in ROWS]}))
    assert load_text_dataset(str(strings), json_field="texts")["text"] == [r["text"] for r in ROWS]
    # a key that does not hold the records, and sources --json-field does not apply to
    with pytest.raises(DatasetError, match=r"squad.json has no top-level key 'records'; its keys are \['version', 'data'\]"):
        load_text_dataset(str(path), json_field="records")
    with pytest.raises(DatasetError, match=r"key 'version' of .*squad.json holds a str, not a list of records"):
        load_text_dataset(str(path), json_field="version")
    with pytest.raises(DatasetError, match=r"d.jsonl holds JSON lines \(one record a line\), not one object: leave --json-field out"):
        load_text_dataset(str(files["jsonl"]), json_field="data")
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    with pytest.raises(DatasetError, match=r"list.json is a JSON list, not an object with key 'data': leave --json-field out"):
        load_text_dataset(str(tmp_path / "list.json"), json_field="data")
    with pytest.raises(DatasetError, match=r"--json-field 'data' applies to JSON files; .*d.csv'\] are csv files"):
        load_text_dataset(str(files["csv"]), json_field="data")
    with pytest.raises(DatasetError, match=r"--json-field 'data' applies to JSON files; .*saved' is a save_to_disk dataset"):
        load_text_dataset(str(files["disk"]), json_field="data")


def _squad(articles: list[tuple[str, list[str]]], version: str = "v2.0") -> dict:
    """A SQuAD-shaped document: articles with a title and paragraphs, each paragraph its
    context and questions (v2: an unanswerable one has plausible_answers, the others not)."""
    data = []
    for a, (title, contexts) in enumerate(articles):
        paragraphs = []
        for p, context in enumerate(contexts):
            first = context.split()[0]
            qas = [{"question": f"What does the passage start with? ({title})", "id": f"{a}-{p}-0", "answers": [{"text": first, "answer_start": 0}], "is_impossible": False}]
            if p % 2:
                qas.append({"question": "Who wrote it?", "id": f"{a}-{p}-1", "answers": [], "plausible_answers": [{"text": first, "answer_start": 0}], "is_impossible": True})
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": title, "paragraphs": paragraphs})
    return {"version": version, "data": data}


def test_a_dotted_json_field_reads_records_nested_in_lists_as_squad_holds_them(files, tmp_path):
    # SQuAD holds its texts one level below "data": data[].paragraphs[].context. --json-field
    # named one top-level key, so "data" gave the articles (title, paragraphs) and no option
    # reached the paragraphs. A dotted path now walks every list on the way, in file order;
    # the articles' titles come along as "data.title", the questions as they are.
    from sbert_sae.pipeline import DataArguments, load_texts

    texts = [r["text"] for r in ROWS]
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(_squad([("Cells", [texts[0], texts[3]]), ("Maths and arts", [texts[1], texts[2]])])))
    # without the path, or with its first key only, the error names the path that holds "context"
    with pytest.raises(DatasetError, match=r"records appear to sit under key 'data.paragraphs': pass --json-field data.paragraphs"):
        load_texts(DataArguments(dataset=str(path), text_column="context"))
    with pytest.raises(DatasetError, match=r"columns are \['title', 'paragraphs'\].*field 'paragraphs' of its records holds records with field 'context': add '.paragraphs' to the end of the --json-field path"):
        load_texts(DataArguments(dataset=str(path), json_field="data", text_column="context"))
    ds = load_text_dataset(str(path), json_field="data.paragraphs")
    assert ds.column_names == ["context", "qas", "data.title"]
    assert ds["context"] == [texts[0], texts[3], texts[1], texts[2]]
    assert ds["data.title"] == ["Cells", "Cells", "Maths and arts", "Maths and arts"]
    assert ds[1]["qas"][1]["plausible_answers"] == [{"text": "Mitochondria", "answer_start": 0}]
    assert ds[0]["qas"][0]["answers"] == [{"text": "Photosynthesis", "answer_start": 0}]
    # read again (another stage of the same run): the same dataset fingerprint, so the same
    # embedding cache entry; the text and domain columns work as for any dataset
    assert load_text_dataset(str(path), json_field="data.paragraphs")._fingerprint == ds._fingerprint
    loaded = load_texts(DataArguments(dataset=str(path), json_field="data.paragraphs", text_column="context", domain_column="data.title"))
    assert column_values(loaded.ds, "context", loaded.rows.row_ids) == ds["context"]
    assert {k: v.tolist() for k, v in domain_row_ids(loaded.ds, "data.title", loaded.rows.row_ids).items()} == {"Cells": [0, 1], "Maths and arts": [2, 3]}
    # several files in the order given, a split slice, a folder of them (train / test by name)
    other = tmp_path / "dev.json"
    other.write_text(json.dumps(_squad([("Art", [texts[2]])], version="1.1")))
    assert load_text_dataset([str(other), str(path)], json_field="data.paragraphs", split="train[:2]")["context"] == [texts[2], texts[0]]
    (tmp_path / "squad_folder").mkdir()
    (tmp_path / "squad_folder" / "train.json").write_text(path.read_text())
    (tmp_path / "squad_folder" / "test.json").write_text(other.read_text())
    assert load_text_dataset(str(tmp_path / "squad_folder"), json_field="data.paragraphs", split="test")["context"] == [texts[2]]
    assert load_text_dataset(str(tmp_path / "squad_folder"), json_field="data.paragraphs")["context"] == ds["context"]
    # a path ending at strings gives a "text" column, as a list of strings does; a path through
    # objects (no list), and a key that itself holds a dot, taken whole
    assert load_text_dataset(str(path), json_field="data.paragraphs.context")["text"] == ds["context"]
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"corpus": {"en.v1": {"docs": [{"body": t} for t in texts]}, "lang": "en"}}))
    assert load_text_dataset(str(nested), json_field="corpus.en.v1.docs")["body"] == texts
    # a file saved with a byte-order mark (as Windows editors do), gzip-compressed
    import gzip

    marked = tmp_path / "marked.json.gz"
    marked.write_bytes(gzip.compress(b"\xef\xbb\xbf" + path.read_bytes()))
    assert load_text_dataset(str(marked), json_field="data.paragraphs")["context"] == ds["context"]
    # a changed file is read afresh, not from the records written for it before
    path.write_text(json.dumps(_squad([("Cells", [texts[3]])])))
    assert load_text_dataset(str(path), json_field="data.paragraphs")["context"] == [texts[3]]


def test_a_dotted_json_field_keeps_fields_of_mixed_types_and_the_text_column_loads(tmp_path):
    # Records whose field holds a list in one file and a string in another (or a number here
    # and a string there) cannot be typed alike by pyarrow: such a field is kept as JSON
    # values, and a text column holding a number in one row loads, that row skipped.
    import datasets

    texts = [r["text"] for r in ROWS]
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"data": [{"paragraphs": [{"context": texts[0], "qas": [{"id": 1}], "rank": 1}, {"context": texts[1], "qas": [], "rank": "high"}]}]}))
    second.write_text(json.dumps({"data": [{"paragraphs": [{"context": 7, "qas": "none"}, {"context": texts[2], "qas": {"id": "x"}}]}]}))
    ds = load_text_dataset([str(first), str(second)], json_field="data.paragraphs")
    if hasattr(datasets, "Json"):
        assert [ds[i]["qas"] for i in range(4)] == [[{"id": 1}], [], "none", {"id": "x"}]
        assert ds["rank"] == [1, "high", None, None]
    else:  # datasets without a Json feature (3.x): such values are kept as JSON text
        assert [ds[i]["qas"] for i in range(4)] == ['[{"id": 1}]', "[]", "none", '{"id": "x"}']
        assert ds["rank"] == ["1", "high", None, None]
    rows = find_text_rows(ds, "context")
    if hasattr(datasets, "Json"):
        assert rows.row_ids.tolist() == [0, 1, 3] and rows.skipped == {"not a string": 1}
        assert column_values(ds, "context", rows.row_ids) == texts[:3]
    else:  # there the number 7 became the text "7"
        assert rows.row_ids.tolist() == [0, 1, 2, 3] and column_values(ds, "context", [2]) == ["7"]


def test_a_dotted_json_field_names_the_step_and_the_file_it_fails_at(files, tmp_path):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(_squad([("Cells", [ROWS[0]["text"]]), ("Maths", [ROWS[1]["text"]])])))
    with pytest.raises(DatasetError, match=r"--json-field 'data.paras'.*data\[0\] of .*squad.json has no key 'paras' \(step 2 of the path\); its keys are \['title', 'paragraphs'\]"):
        load_text_dataset(str(path), json_field="data.paras")
    with pytest.raises(DatasetError, match=r"squad.json has no top-level key 'articles'; its keys are \['version', 'data'\]"):
        load_text_dataset(str(path), json_field="articles.paragraphs")
    with pytest.raises(DatasetError, match=r"data\[0\].title of .*squad.json holds a str, not an object with key 'x'"):
        load_text_dataset(str(path), json_field="data.title.x")
    with pytest.raises(DatasetError, match=r"key 'version' of .*squad.json holds a str, not an object with key 'paragraphs'"):
        load_text_dataset(str(path), json_field="version.paragraphs")
    with pytest.raises(DatasetError, match=r"data\[0\].paragraphs\[0\].qas\[0\].is_impossible of .*squad.json is a bool, not a record"):
        load_text_dataset(str(path), json_field="data.paragraphs.qas.is_impossible")
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"data": [{"title": "None yet", "paragraphs": []}]}))
    with pytest.raises(DatasetError, match=r"--json-field 'data.paragraphs': it finds no records in .*empty.json"):
        load_text_dataset(str(empty), json_field="data.paragraphs")
    with pytest.raises(DatasetError, match=r"d.jsonl holds JSON lines \(one record a line\), not one object: leave --json-field out"):
        load_text_dataset(str(files["jsonl"]), json_field="data.paragraphs")
    broken = tmp_path / "broken.json"
    broken.write_text('{"data": [{"paragraphs": [')
    with pytest.raises(DatasetError, match=r"broken.json is not valid JSON \(JSONDecodeError: "):
        load_text_dataset(str(broken), json_field="data.paragraphs")
    with pytest.raises(DatasetError, match=r"--json-field 'data.paragraphs' applies to JSON files; .*d.csv'\] are csv files"):
        load_text_dataset(str(files["csv"]), json_field="data.paragraphs")
    with pytest.raises(DatasetError, match=r"--json-field 'data.paragraphs' applies to JSON files; .*saved' is a save_to_disk dataset"):
        load_text_dataset(str(files["disk"]), json_field="data.paragraphs")
    with pytest.raises(DatasetError, match=r"--json-field 'data.paragraphs' applies to JSON files; folder .*folder' holds parquet files"):
        load_text_dataset(str(files["folder"]), json_field="data.paragraphs")
    with pytest.raises(DatasetError, match=r"a dotted --json-field \('data.paragraphs'\) reads local JSON files; 'rajpurkar/squad' is not one"):
        load_text_dataset("rajpurkar/squad", json_field="data.paragraphs")
    with pytest.raises(DatasetError, match=r"--json-field 'data..context' has an empty step"):
        load_text_dataset(str(path), json_field="data..context")
