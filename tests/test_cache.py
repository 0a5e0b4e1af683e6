"""`sbert-sae cache list/remove` over real embedding caches of real Wikipedia text (MiniLM)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np
import pytest

from sbert_sae.cli import main
from sbert_sae.embeddings import lock_path, open_cache


@pytest.fixture(scope="session")
def embedded(tmp_path_factory, wiki_rows):
    """Two small `save_to_disk` corpora (20 and 12 real lead paragraphs, one text empty) and
    an embedding cache holding both, made by `sbert-sae embed` once for the module."""
    from datasets import Dataset

    base = tmp_path_factory.mktemp("cache-cmd")
    folders = []
    for name, rows in (("first", wiki_rows[:20]), ("second", wiki_rows[20:32])):
        rows = [dict(r) for r in rows]
        if name == "first":
            rows[3]["text"] = ""  # skipped: 19 rows cached
        folder = base / name
        Dataset.from_list(rows).save_to_disk(str(folder))
        folders.append(folder)
        _embed(folder, base / "cache")
    return folders, base / "cache"


@pytest.fixture
def corpora(embedded, tmp_path, monkeypatch):
    """The two corpora, their cache copied to `tmp_path / "cache"` for the test to change; the
    datasets cache, where JSON records of other tests may lie, is one of the test's own."""
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    folders, cache = embedded
    shutil.copytree(cache, tmp_path / "cache")
    return folders


def _embed(folder, cache_dir) -> None:
    assert main(["embed", "--dataset", str(folder), "--cache-dir", str(cache_dir), "-q"]) == 0


def _entries(cache_dir) -> list[dict]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["cache", "list", "--json", "--cache-dir", str(cache_dir)]) == 0
    return json.loads(out.getvalue())["entries"]


def _entry_of(entries, folder) -> dict:
    return next(e for e in entries if e["kind"] == "embeddings" and e["details"]["source"]["dataset"] == str(folder))


@contextmanager
def _lock_held_by_another_process(lock_file):
    """While inside, a separate process holds the filelock `lock_file`, as a run filling an entry does."""
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, filelock; lock = filelock.FileLock({str(lock_file)!r}); lock.acquire(); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def _disk(path) -> int:
    st = os.stat(path)
    return min(st.st_size, st.st_blocks * 512)


def test_list_shows_each_entry_its_rows_size_and_codes(corpora, tmp_path, capsys):
    from sbert_sae import SparseAutoencoder, SparseAutoencoderConfig
    from sbert_sae.activations import corpus_codes

    cache_dir = tmp_path / "cache"
    entries = _entries(cache_dir)
    assert [e["kind"] for e in entries] == ["embeddings", "embeddings"]
    first, second = _entry_of(entries, corpora[0]), _entry_of(entries, corpora[1])
    assert (first["rows"], first["dim"], first["dtype"], first["status"]) == (19, 384, "float32", "complete")
    assert (second["rows"], second["status"]) == (12, "complete")
    assert first["details"]["model"] == "sentence-transformers/all-MiniLM-L6-v2" and first["details"]["text_column"] == "text"
    folder = cache_dir / "embeddings" / first["id"]
    assert first["size"] == sum(_disk(p) for p in folder.iterdir()) and first["size"] >= 19 * 384 * 4
    # The codes of an SAE are listed inside the entry they were made from.
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=384, n_latents=32, k=3))
    corpus_codes(sae, open_cache(folder).embeddings, folder=folder)
    first = _entry_of(_entries(cache_dir), corpora[0])
    assert [(c["rows"], c["k"], len(c["paths"])) for c in first["codes"]] == [(19, 3, 2)]
    capsys.readouterr()
    assert main(["cache", "ls", "--cache-dir", str(cache_dir)]) == 0  # as `hf cache ls`
    out = capsys.readouterr().out
    assert f"{first['id']}  embeddings    complete  19 x 384 float32" in out
    assert f"codes {first['codes'][0]['digest']}: 19 x k=3" in out and f"dataset {corpora[0]}" in out
    assert "2 entries (2 embeddings, 0 json-records, 0 label-vectors)" in out and "1 SAE codes files" in out

    # Codes a run reads are in use however long ago they were made; codes no run reads go.
    ten_days_ago = time.time() - 10 * 86400
    for path in folder.glob("codes-*"):
        os.utime(path, (ten_days_ago, ten_days_ago))
    corpus_codes(sae, open_cache(folder).embeddings, folder=folder)  # read back, not computed
    assert main(["cache", "remove", "--codes", "--older-than", "5", "--yes", "--cache-dir", str(cache_dir)]) == 0
    assert "nothing to remove" in capsys.readouterr().out and len(list(folder.glob("codes-*"))) == 2
    # --codes removes the codes alone; the vectors stay and read as before.
    assert main(["cache", "remove", first["id"][:6], "--codes", "--yes", "--cache-dir", str(cache_dir)]) == 0
    assert not list(folder.glob("codes-*")) and open_cache(folder).embeddings.shape == (19, 384)
    assert _entry_of(_entries(cache_dir), corpora[0])["codes"] == []


def test_remove_by_id_then_a_run_embeds_again(corpora, tmp_path, capsys, monkeypatch):
    cache_dir = tmp_path / "cache"
    entry, kept = _entry_of(_entries(cache_dir), corpora[0]), _entry_of(_entries(cache_dir), corpora[1])
    folder = cache_dir / "embeddings" / entry["id"]
    before = np.array(open_cache(folder).embeddings)
    capsys.readouterr()
    assert main(["cache", "remove", entry["id"][:8], "--yes", "--cache-dir", str(cache_dir)]) == 0
    assert f"removed {entry['id']}" in capsys.readouterr().out
    assert not folder.exists() and not list((cache_dir / ".trash").iterdir())
    assert [e["id"] for e in _entries(cache_dir)] == [kept["id"]]
    # The next run finds nothing and embeds every row again, the same vectors.
    from sbert_sae import embeddings

    loads = []
    real_load = embeddings.load_sentence_transformer
    monkeypatch.setattr(embeddings, "load_sentence_transformer", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    _embed(corpora[0], cache_dir)
    assert loads and (folder / "complete.json").exists()
    np.testing.assert_allclose(open_cache(folder).embeddings, before, atol=1e-6)


def test_older_than_removes_entries_no_run_used_lately(corpora, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    old = _entry_of(_entries(cache_dir), corpora[0])
    ten_days_ago = time.time() - 10 * 86400
    for path in [*(cache_dir / "embeddings" / old["id"]).iterdir(), cache_dir / "embeddings" / old["id"]]:
        os.utime(path, (ten_days_ago, ten_days_ago))
    entries = _entries(cache_dir)
    assert _entry_of(entries, corpora[0])["last_used"] == pytest.approx(ten_days_ago)
    assert main(["cache", "remove", "--older-than", "5", "--yes", "--cache-dir", str(cache_dir)]) == 0
    assert [e["id"] for e in _entries(cache_dir)] == [_entry_of(entries, corpora[1])["id"]]
    # Reading an entry counts as a use: embedding the same corpus again reads the cache, not the model.
    _embed(corpora[1], cache_dir)
    for path in (cache_dir / "embeddings").rglob("*"):
        os.utime(path, (ten_days_ago, ten_days_ago))
    _embed(corpora[1], cache_dir)
    assert main(["cache", "remove", "--older-than", "5", "--yes", "--cache-dir", str(cache_dir)]) == 0
    assert "nothing to remove" in capsys.readouterr().out and len(_entries(cache_dir)) == 1


def test_dry_run_and_no_terminal_remove_nothing(corpora, tmp_path, capsys, monkeypatch):
    cache_dir = tmp_path / "cache"
    entry = _entry_of(_entries(cache_dir), corpora[0])
    files = sorted(p.name for p in (cache_dir / "embeddings" / entry["id"]).iterdir())
    capsys.readouterr()
    assert main(["cache", "remove", entry["id"][:5], "--dry-run", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would remove 1 entry,") and entry["id"] in out and f"{entry['size'] / 1000:.1f} KB" in out
    assert main(["cache", "remove", "--all", "--dry-run", "--cache-dir", str(cache_dir)]) == 0
    assert capsys.readouterr().out.startswith("would remove 2 entries")
    # Not on a terminal and no --yes: nothing asked, nothing removed.
    with open(os.devnull) as no_terminal:
        monkeypatch.setattr(sys, "stdin", no_terminal)
        assert main(["cache", "remove", "--all", "--cache-dir", str(cache_dir)]) == 2
    assert "pass --yes" in capsys.readouterr().err
    assert sorted(p.name for p in (cache_dir / "embeddings" / entry["id"]).iterdir()) == files
    assert [e["status"] for e in _entries(cache_dir)] == ["complete", "complete"]


def test_an_entry_another_process_is_filling_is_skipped(corpora, tmp_path, capsys):
    """A process filling an entry holds its lock (<cache>/locks/<id>.lock): removing the entry
    under it would have it write into a folder that is gone, or leave a cache that reads as
    complete with files missing."""
    cache_dir = tmp_path / "cache"
    entries = _entries(cache_dir)
    busy, free = _entry_of(entries, corpora[0]), _entry_of(entries, corpora[1])
    busy_folder = cache_dir / "embeddings" / busy["id"]
    (busy_folder / "complete.json").unlink()  # as it is while being filled
    with _lock_held_by_another_process(lock_path(busy_folder)):
        assert _entry_of(_entries(cache_dir), corpora[0])["status"] == "filling"
        capsys.readouterr()
        assert main(["cache", "remove", "--all", "--yes", "--cache-dir", str(cache_dir)]) == 1
        out = capsys.readouterr().out
        assert f"skipped {busy['id']}: another process is writing it" in out and f"removed {free['id']}" in out
        assert (busy_folder / "embeddings.npy").exists() and (busy_folder / "meta.json").exists()
        assert main(["cache", "remove", "--partial", "--yes", "--cache-dir", str(cache_dir)]) == 0  # "filling" is not "partial"
        assert busy_folder.exists()
    # Once the process is gone, the interrupted entry is "partial" and --partial takes it.
    assert [e["status"] for e in _entries(cache_dir)] == ["partial"]
    assert main(["cache", "remove", "--partial", "--yes", "--cache-dir", str(cache_dir)]) == 0
    assert _entries(cache_dir) == []


def test_lock_files_go_once_no_process_holds_them(corpora, tmp_path, capsys):
    """Every entry ever filled left its lock file in <cache>/locks/ for good, and so did every
    one removed. A lock file is now deleted as its lock is let go; those that killed runs or
    older versions left, which no process holds, go as the cache is listed; one a process
    holds stays."""
    cache_dir = tmp_path / "cache"
    locks = cache_dir / "locks"
    assert sorted(p.name for p in locks.iterdir()) == []  # the two runs that filled the entries
    first = _entry_of(_entries(cache_dir), corpora[0])
    (locks / f"{first['id']}.lock").touch()  # left by a killed run, or an older version
    (locks / "0123abcd.lock").touch()  # the same, of an entry removed since
    with _lock_held_by_another_process(locks / "feedbeef.lock"):  # of an entry being started
        assert first["id"] in {e["id"] for e in _entries(cache_dir)}
        assert sorted(p.name for p in locks.iterdir()) == ["feedbeef.lock"]
    _entries(cache_dir)
    assert sorted(p.name for p in locks.iterdir()) == []
    assert main(["cache", "remove", first["id"], "--yes", "--cache-dir", str(cache_dir)]) == 0
    assert f"removed {first['id']}" in capsys.readouterr().out
    assert sorted(p.name for p in locks.iterdir()) == []


# A real process filling a cache entry: it takes the entry's lock (`_cache_lock`, as
# `embed_dataset` does), writes HELD once it has it, and keeps it until RELEASE exists.
HOLD_CACHE_LOCK = """
import sys, time
from pathlib import Path
from sbert_sae.embeddings import _cache_lock
folder, held, release = map(Path, sys.argv[1:])
with _cache_lock(folder):
    held.write_text("held")
    while not release.exists():
        time.sleep(0.05)
"""


def _flock_waiters() -> set[int]:
    """The pids of the processes waiting for a flock now (Linux's /proc/locks: '1: -> FLOCK ...')."""
    waiting = set()
    for line in open("/proc/locks").read().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "->" and fields[2] == "FLOCK":
            waiting.add(int(fields[5]))
    return waiting


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="tells a process waiting for a flock by /proc/locks (Linux)")
def test_two_processes_cannot_both_fill_an_entry_after_its_lock_file_went(tmp_path):
    """The classic race of deleting a lock file: B waits for the lock of an entry on its file;
    its holder deletes the file as it lets go; B is given the lock on the deleted file, while C
    makes the file anew and locks that. Unless B finds that the name no longer names the file
    it locked, B and C both fill the entry. Here exactly one holds it, the other waits."""
    from sbert_sae.embeddings import _cache_lock

    folder = tmp_path / "cache" / "embeddings" / "0123abcd"
    release = tmp_path / "release"
    procs = {}

    def start(name):
        with open(tmp_path / f"{name}.log", "w") as err:
            procs[name] = subprocess.Popen([sys.executable, "-c", HOLD_CACHE_LOCK, str(folder), str(tmp_path / f"{name}.held"), str(release)], stderr=err)

    def held():
        return sorted(name for name in procs if (tmp_path / f"{name}.held").exists())

    def alive():
        for name, proc in procs.items():
            assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()

    try:
        with _cache_lock(folder):  # this process fills the entry
            start("b")
            deadline = time.monotonic() + 300
            while procs["b"].pid not in _flock_waiters():  # b waits on the lock file as it is now
                alive()
                assert time.monotonic() < deadline, "b never waited for the lock"
                time.sleep(0.05)
        assert not lock_path(folder).exists()  # deleted as it was let go
        start("c")
        deadline = time.monotonic() + 300
        while not (len(held()) == 2 or (len(held()) == 1 and {procs[n].pid for n in procs if n not in held()} <= _flock_waiters())):
            alive()
            assert time.monotonic() < deadline, "neither b nor c took the lock"
            time.sleep(0.05)
        assert len(held()) == 1, "b and c both hold the lock of the entry"
        release.touch()  # each lets go in turn
        for name, proc in procs.items():
            assert proc.wait(timeout=120) == 0, (tmp_path / f"{name}.log").read_text()
        assert held() == ["b", "c"] and sorted(p.name for p in lock_path(folder).parent.iterdir()) == []
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


def test_a_damaged_entry_is_listed_so_and_taken_by_partial(corpora, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    entry = _entry_of(_entries(cache_dir), corpora[0])
    row_ids = cache_dir / "embeddings" / entry["id"] / "row_ids.npy"
    row_ids.write_bytes(row_ids.read_bytes()[:60])  # cut short, as by a full disk
    assert _entry_of(_entries(cache_dir), corpora[0])["status"] == "damaged"
    assert main(["cache", "remove", "--partial", "--yes", "--cache-dir", str(cache_dir)]) == 0
    assert [e["id"] for e in _entries(cache_dir)] == [_entry_of(_entries(cache_dir), corpora[1])["id"]]


def test_clear_errors_for_an_unknown_id_or_a_missing_cache(corpora, tmp_path, capsys, monkeypatch):
    cache_dir = tmp_path / "cache"
    assert main(["cache", "remove", "ffffffff", "--yes", "--cache-dir", str(cache_dir)]) == 2
    assert f"no cache entry with id 'ffffffff' in {cache_dir}" in capsys.readouterr().err
    assert main(["cache", "remove", "--yes", "--cache-dir", str(cache_dir)]) == 2
    assert "say what to remove" in capsys.readouterr().err
    assert main(["cache", "list", "--cache-dir", str(tmp_path / "nowhere")]) == 2
    assert f"no sbert-sae cache at {tmp_path / 'nowhere'} (--cache-dir)" in capsys.readouterr().err
    monkeypatch.setenv("SBERT_SAE_CACHE", str(tmp_path / "unset"))
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "no-datasets"))
    assert main(["cache", "list"]) == 2
    err = capsys.readouterr().err
    assert f"no sbert-sae cache at {tmp_path / 'unset'} ($SBERT_SAE_CACHE)" in err and "$HF_DATASETS_CACHE" in err
    assert len(_entries(cache_dir)) == 2


def test_json_records_are_listed_and_removed_whole(tmp_path, wiki_rows, capsys, monkeypatch):
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    data = tmp_path / "articles.json"
    data.write_text(json.dumps({"data": [{"title": "wiki", "items": [{"text": r["text"]} for r in wiki_rows[:10]]}]}))
    ten_days_ago = time.time() - 10 * 86400
    os.utime(data, (ten_days_ago, ten_days_ago))  # a file written long ago, read every day
    assert main(["embed", "--dataset", str(data), "--json-field", "data.items", "--cache-dir", str(tmp_path / "cache"), "-q"]) == 0
    entries = _entries(tmp_path / "cache")
    records = [e for e in entries if e["kind"] == "json-records"]
    assert len(records) == 1 and records[0]["status"] == "complete" and records[0]["details"] == {"splits": ["train"], "json_field": "data.items"}
    assert _entry_of(entries, data)["rows"] == 10
    assert list((tmp_path / "datasets" / "sbert_sae_json_records" / ".locks").iterdir()) == []  # let go, deleted
    # Records a run reads are in use, however long ago they were written.
    for path in (tmp_path / "datasets" / "sbert_sae_json_records").rglob("*"):
        if path.suffix != ".jsonl":  # whose time is their source's: datasets' fingerprint of them
            os.utime(path, (ten_days_ago, ten_days_ago))
    assert main(["embed", "--dataset", str(data), "--json-field", "data.items", "--cache-dir", str(tmp_path / "cache"), "-q"]) == 0
    assert main(["cache", "remove", "--older-than", "5", "--kind", "json-records", "--yes", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "nothing to remove" in capsys.readouterr().out
    # Records another process is writing (it holds their lock) are left alone.
    from sbert_sae.data import json_records_lock_path

    records_folder = tmp_path / "datasets" / "sbert_sae_json_records" / records[0]["id"]
    with _lock_held_by_another_process(json_records_lock_path(records_folder)):
        assert main(["cache", "remove", "--kind", "json-records", "--all", "--yes", "--cache-dir", str(tmp_path / "cache")]) == 1
        assert f"skipped {records[0]['id']}: another process is writing it" in capsys.readouterr().out
        assert (records_folder / "features.json").exists()
    assert main(["cache", "remove", "--kind", "json-records", "--all", "--yes", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert [e["kind"] for e in _entries(tmp_path / "cache")] == ["embeddings"]
    # Written again by the next run, the same records with the same fingerprint: their
    # embeddings are found in the cache, not made again.
    assert main(["embed", "--dataset", str(data), "--json-field", "data.items", "--cache-dir", str(tmp_path / "cache"), "-q"]) == 0
    again = _entries(tmp_path / "cache")
    assert sorted(e["kind"] for e in again) == ["embeddings", "json-records"]
    assert _entry_of(again, data)["id"] == _entry_of(entries, data)["id"]


def test_a_removal_killed_midway_leaves_no_half_entry(corpora, tmp_path, capsys):
    """An entry is renamed out of `embeddings/` before it is deleted: a `cache remove` killed
    while deleting leaves its rest in `.trash`, which no run reads as a cache and the next
    remove deletes."""
    from test_reliability import Child

    cache_dir = tmp_path / "cache"
    entry = _entry_of(_entries(cache_dir), corpora[0])
    child = Child(["cache", "remove", entry["id"], "--yes", "--cache-dir", cache_dir], tmp_path / "remove.log", pause="cache-remove:1")
    child.wait_until_paused()
    child.kill()
    assert not (cache_dir / "embeddings" / entry["id"]).exists()
    assert [p.name.split(".")[0] for p in (cache_dir / ".trash").iterdir()] == [entry["id"]]
    capsys.readouterr()
    assert main(["cache", "list", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert entry["id"] not in out and "left half removed by an interrupted `cache remove`" in out
    # Nothing of it is left where runs look for caches (`embeddings/`): the next run embeds
    # again (test_remove_by_id_then_a_run_embeds_again), and the next remove deletes the rest.
    assert not any((cache_dir / "embeddings").glob(f"{entry['id']}*"))
    assert main(["cache", "remove", "--older-than", "1", "--yes", "--cache-dir", str(cache_dir)]) == 0
    assert not list((cache_dir / ".trash").iterdir()) and len(_entries(cache_dir)) == 1
