"""The JSON writer every result file goes through, and the feature -> texts index of a corpus' codes."""

from __future__ import annotations

import json
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sbert_sae.activations import SparseActivations
from sbert_sae.utils import dumps_json, read_json, write_json

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=25)


def _nulled(value):
    """What JSON can hold of `value`: NaN and infinities as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nulled(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nulled(v) for v in value]
    return value


def _not_json(constant: str):
    raise AssertionError(f"{constant} is not JSON")


@settings(max_examples=300, deadline=None)
@given(_values, st.integers(0, 5))
def test_any_value_at_any_depth_reads_back_with_non_finite_floats_as_null(value, depth):
    text = dumps_json(value, depth)
    assert json.loads(text, parse_constant=_not_json) == _nulled(value)


def test_shallow_levels_are_indented_and_deeper_values_lie_on_one_line(tmp_path):
    data = {"summary": {"n": 2, "range": [1, 3]}, "features": {"0": {"label": "music", "keywords": [{"k": "music", "s": 0.5}]}, "1": {"label": None, "score": float("nan")}}}
    write_json(tmp_path / "a.json", data, depth=2)
    lines = (tmp_path / "a.json").read_text().splitlines()
    assert lines[0] == "{" and '    "n": 2,' in lines and '    "range": [1, 3]' in lines
    assert '    "0": {"label": "music", "keywords": [{"k": "music", "s": 0.5}]},' in lines  # a feature a line
    assert '    "1": {"label": null, "score": null}' in lines
    assert read_json(tmp_path / "a.json")["features"]["1"] == {"label": None, "score": None}


def test_by_feature_lists_each_features_texts_strongest_first_ties_in_row_order():
    rng = np.random.default_rng(0)
    n_texts, k, n = 5000, 8, 300
    indices = np.stack([rng.choice(n, k, replace=False) for _ in range(n_texts)]).astype(np.int32)
    values = (rng.integers(0, 6, (n_texts, k)) * 0.25).astype(np.float32)  # many ties, and zeros
    acts = SparseActivations(values, indices, n)
    rows = np.sort(rng.choice(n_texts, 3000, replace=False))
    for subset in (None, rows):
        index = acts.by_feature(subset)
        positions = np.arange(n_texts) if subset is None else subset
        for f in range(n):
            r, c = np.nonzero((indices[positions] == f) & (values[positions] > 0))
            expected = sorted(zip(-values[positions][r, c], positions[r]))  # strongest, then lower row
            assert list(zip(-index.acts_of(f), index.rows_of(f))) == expected


def test_a_wide_sae_encodes_a_corpus_in_batches_of_bounded_pre_activations():
    """Encoding a corpus makes (batch rows x n_latents) pre-activations at a time: for a wide
    SAE the batches are cut so that they stay within ENCODE_BATCH_ELEMENTS, with the same codes."""
    import torch

    from sbert_sae import SparseAutoencoder, SparseAutoencoderConfig
    from sbert_sae.activations import ENCODE_BATCH_ELEMENTS, encode_corpus

    class Recording(SparseAutoencoder):
        def pre_activations(self, x):
            pre = super().pre_activations(x)
            self.shapes.append(tuple(pre.shape))
            return pre

    torch.manual_seed(0)
    n_latents = 32768
    sae = Recording(SparseAutoencoderConfig(d_in=16, n_latents=n_latents, k=4))
    sae.shapes = []
    embeddings = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
    codes = encode_corpus(sae, embeddings)
    widest = ENCODE_BATCH_ELEMENTS // n_latents
    assert widest < len(embeddings)  # the default 8192 rows would have been one batch of all
    assert [rows for rows, _ in sae.shapes] == [widest, len(embeddings) - widest]
    assert all(rows * width <= ENCODE_BATCH_ELEMENTS and width == n_latents for rows, width in sae.shapes)
    assert codes.values.shape == codes.indices.shape == (3000, 4)
    assert codes.values.dtype == np.float32 and codes.indices.dtype == np.int32
    with torch.no_grad():
        for start in range(0, 3000, 500):
            v, i = sae.encode_topk(torch.from_numpy(embeddings[start : start + 500]))
            assert np.array_equal(codes.values[start : start + 500], v.numpy()) and np.array_equal(codes.indices[start : start + 500], i.numpy())
    sae.shapes = []
    encode_corpus(sae, embeddings[:250], batch_size=100)  # a smaller batch asked for is kept
    assert [rows for rows, _ in sae.shapes] == [100, 100, 50]


def test_corpus_codes_are_kept_beside_the_cache_and_read_back(tmp_path, caplog):
    import torch

    from sbert_sae import SparseAutoencoder, SparseAutoencoderConfig
    from sbert_sae.activations import codes_paths, corpus_codes, encode_corpus

    torch.manual_seed(0)
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=16, n_latents=64, k=4))
    embeddings = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    expected = encode_corpus(sae, embeddings)
    first = corpus_codes(sae, embeddings, tmp_path)
    values_path, indices_path = codes_paths(sae, tmp_path)
    assert values_path.exists() and indices_path.exists()
    again = corpus_codes(sae, embeddings, tmp_path)
    assert isinstance(again.values, np.memmap)  # read back, not recomputed
    for codes in (first, again):
        assert np.array_equal(codes.values, expected.values) and np.array_equal(codes.indices, expected.indices)
    # Another encoder (other weights) has codes of its own.
    original = sae.b_enc.detach().clone()
    with torch.no_grad():
        sae.b_enc += 0.1
    assert codes_paths(sae, tmp_path)[0] != values_path
    assert not isinstance(corpus_codes(sae, embeddings, tmp_path).values, np.memmap)
    with torch.no_grad():
        sae.b_enc.copy_(original)
    assert codes_paths(sae, tmp_path)[0] == values_path
    # A damaged file, or codes of another corpus' length, are computed again and replaced.
    values_path.write_bytes(b"not an array")
    with caplog.at_level("WARNING"):
        mended = corpus_codes(sae, embeddings, tmp_path)
    assert "could not read the corpus codes" in caplog.text
    assert np.array_equal(mended.values, expected.values)
    assert isinstance(corpus_codes(sae, embeddings, tmp_path).values, np.memmap)
    shorter = corpus_codes(sae, embeddings[:100], tmp_path)
    assert len(shorter) == 100 and np.array_equal(shorter.indices, expected.indices[:100])


def test_written_files_follow_the_umask(tmp_path):
    # Atomic writes went through tempfile.mkstemp, whose files are 0600: a run's model and
    # metrics were unreadable to anyone else on a shared disk.
    import os
    import stat

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "metrics.json", {"fvu": 0.3})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644
    assert read_json(tmp_path / "metrics.json") == {"fvu": 0.3}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_an_sae_saved_and_its_checkpoints_follow_the_umask(tmp_path):
    # safetensors' save_file makes its file anew, 0600 whatever the umask: a run's
    # model.safetensors and checkpoints were unreadable to anyone else on a shared disk.
    import os
    import stat

    from sbert_sae import SparseAutoencoder, SparseAutoencoderConfig
    from sbert_sae.trainer import TrainingArguments, train

    x = np.random.default_rng(0).normal(size=(80, 8)).astype(np.float32)
    old = os.umask(0o022)
    try:
        SparseAutoencoder(SparseAutoencoderConfig(d_in=8, n_latents=16, k=2)).save_pretrained(tmp_path / "sae")
        args = TrainingArguments(epochs=2, batch_size=16, report_to="none", show_progress=False, checkpoint_every=2, checkpoint_min_seconds=0)
        train(SparseAutoencoderConfig(d_in=8, n_latents=16, k=2), args, x, np.arange(70), np.arange(70, 80), tmp_path / "run")
    finally:
        os.umask(old)
    written = [*(tmp_path / "sae").iterdir(), *(tmp_path / "run").rglob("*")]
    assert any(p.suffix == ".safetensors" for p in written if "checkpoint" in str(p))
    modes = {p.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in written if p.is_file()}
    assert set(modes.values()) == {"0o644"}, modes


def test_a_temp_file_left_by_a_killed_write_is_removed_by_the_next_run_in_its_folder(tmp_path):
    """A write killed (SIGKILL, a power cut) before its temp file was renamed into place left that
    hidden file (`.feature_labels.json.<hex>.tmp`, as large as the file) in the run folder for
    good: no run ever removed it. The next run to take the folder's lock (train, label, families,
    compare), or the embedding cache's, now deletes those of killed writers; a live writer's, and
    one written on another machine, stay."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import time

    from sbert_sae.embeddings import _cache_lock
    from sbert_sae.utils import run_lock, temp_name

    run = tmp_path / "run"
    run.mkdir()
    script = (
        "import sys, time\nfrom pathlib import Path\nfrom sbert_sae.utils import atomic_write\n"
        "def write(tmp):\n    Path(tmp).write_text('half of it')\n    time.sleep(300)\n"
        "atomic_write(sys.argv[1], write)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, str(run / "feature_labels.json")])
    deadline = time.monotonic() + 300
    while not list(run.glob(".*.tmp")):
        assert writer.poll() is None and time.monotonic() < deadline, "the write never started"
        time.sleep(0.05)
    writer.kill()  # SIGKILL: nothing of the writer runs after this
    writer.wait()
    [left] = run.glob(".*.tmp")
    assert left.name.startswith(".feature_labels.json.")
    cache = tmp_path / "cache" / "embeddings" / "0123456789abcdef01234567"
    cache.mkdir(parents=True)
    shutil.copy(left, cache / left.name.replace(".feature_labels.json.", ".meta.json."))  # the same writer's, killed writing a cache's records

    live_writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        live = run / temp_name("metrics.json").replace(f".{os.getpid()}@", f".{live_writer.pid}@")
        elsewhere = run / f".metrics.json.{writer.pid}@not-{socket.gethostname()}.0123abcd.tmp"
        live.write_text("being written")
        elsewhere.write_text("being written on another machine")
        with run_lock(run):
            pass
        assert not left.exists() and live.exists() and elsewhere.exists()
        assert sorted(p.name for p in run.iterdir()) == sorted([live.name, elsewhere.name])  # never renamed into place
    finally:
        live_writer.kill()
        live_writer.wait()
    with _cache_lock(cache):
        pass
    assert list(cache.iterdir()) == []
