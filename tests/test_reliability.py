"""Reliability: real runs killed with SIGKILL and resumed, a second run into a folder in use,
a disk that fills during a checkpoint, hostile files and fuzzed inputs (tests/RELIABILITY.md)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sbert_sae import SparseAutoencoder
from sbert_sae.cli import main
from sbert_sae.trainer import list_checkpoints, load_checkpoint
from sbert_sae.utils import TEST_PAUSE_ENV

# 223 training texts in batches of 32: 7 steps an epoch, 35 in all, a checkpoint every 5.
KILL_RUN = ["--n-latents", "128", "-k", "8", "--epochs", "5", "--batch-size", "32", "--seed", "5", "--report-to", "none",
            "--checkpoint-every", "5", "--checkpoint-min-seconds", "0", "--log-every", "1"]


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return SparseAutoencoder.from_pretrained(folder).state_dict()


def assert_same_model(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def log_records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


class Child:
    """A real `python -m sbert_sae ...` process, optionally told to pause (and say so) at a point."""

    def __init__(self, args: list, log: Path, pause: str | None = None):
        env = dict(os.environ)
        env.pop(TEST_PAUSE_ENV, None)
        self.flag = None
        if pause:
            self.flag = log.with_suffix(".paused")
            self.flag.unlink(missing_ok=True)
            env[TEST_PAUSE_ENV] = f"{pause}:{self.flag}"
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "sbert_sae", *map(str, args)], env=env, stdout=subprocess.DEVNULL, stderr=err)

    @property
    def stderr(self) -> str:
        return self.log.read_text()

    def wait_until_paused(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not self.flag.exists():
            assert self.proc.poll() is None, f"exited with {self.proc.returncode} before pausing:\n{self.stderr[-3000:]}"
            assert time.monotonic() < deadline, "never paused"
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=60) == -signal.SIGKILL


@pytest.fixture(scope="module")
def uninterrupted(wiki_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("reliability") / "whole"
    assert run_cli("train", "--dataset", wiki_small, *KILL_RUN, "-q", "--out", out) == 0
    return out


def test_killed_training_resumes_to_the_model_of_an_uninterrupted_run(wiki_small, uninterrupted, tmp_path, caplog):
    """SIGKILL during the first checkpoint's write, mid-epoch, and during a later checkpoint's
    write; every resumption starts from the last complete checkpoint and the end result is the
    uninterrupted run's model, bit for bit, with its learning curve. While a run is alive, a
    second run into its folder (even with --overwrite) is refused by the lock and changes nothing."""
    out = tmp_path / "killed"
    train = ["train", "--dataset", wiki_small, *KILL_RUN, "--out", out]

    # 1. Killed while writing its first checkpoint: nothing complete to resume from.
    child = Child([*train, "-q"], tmp_path / "a.log", pause="checkpoint:5")
    child.wait_until_paused()
    child.kill()
    assert [p.name for p in (out / "checkpoints").iterdir()] == [".tmp-step-000000005"]
    assert (out / "checkpoints" / ".tmp-step-000000005" / "model.safetensors").exists()
    assert list_checkpoints(out) == []

    # 2. Resumed (from the beginning), killed mid-epoch (step 13 = step 6 of epoch 2).
    child = Child([*train, "--resume"], tmp_path / "b.log", pause="step:13")
    child.wait_until_paused()
    assert "no checkpoint in" in child.stderr and "starting from the beginning" in child.stderr
    assert [p.name for p in list_checkpoints(out)] == ["step-000000005", "step-000000010"]
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"}
    for flag in ("--overwrite", "--resume"):
        second = subprocess.run([sys.executable, "-m", "sbert_sae", *map(str, train), flag, "-q"], capture_output=True, text=True, timeout=300)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert f"{out} is in use by another run (pid {child.proc.pid}" in lines[0]
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"} == before
    child.kill()

    # 3. Resumed from step 10 (its lock was left by a dead process: taken over), killed
    #    while writing the checkpoint of step 20.
    child = Child([*train, "--resume"], tmp_path / "c.log", pause="checkpoint:20")
    child.wait_until_paused()
    assert "resuming from" in child.stderr and "step-000000010 (step 10 of 35)" in child.stderr
    child.kill()
    assert [p.name for p in list_checkpoints(out)] == ["step-000000010", "step-000000015"]
    assert (out / "checkpoints" / ".tmp-step-000000020").is_dir()

    # 4. Resumed to the end, from step 15: never from the half-written checkpoint of step 20.
    caplog.set_level(logging.INFO, logger="sbert_sae")
    assert run_cli(*train, "--resume", "-q") == 0
    assert "step-000000015 (step 15 of 35)" in caplog.text
    assert_same_model(out, uninterrupted)
    assert log_records(out) == log_records(uninterrupted)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 35
    assert not (out / "checkpoints").exists() and not (out / ".lock").exists()


def test_a_damaged_checkpoint_is_passed_over_for_the_one_before(wiki_small, uninterrupted, tmp_path, caplog, monkeypatch):
    """A checkpoint whose weights file was cut short after it was written (a failing disk): the
    resumption warns, takes the one before, and still ends at the uninterrupted run's model."""
    import sbert_sae.trainer as trainer

    out = tmp_path / "damaged"
    train = ["train", "--dataset", wiki_small, *KILL_RUN, "-q", "--out", out]
    real = trainer.SparseAutoencoder.set_decoder_norm_to_unit
    steps = {"n": 0}

    def stops_after_step_22(self):
        steps["n"] += 1
        if steps["n"] == 23:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(trainer.SparseAutoencoder, "set_decoder_norm_to_unit", stops_after_step_22)
    assert run_cli(*train) == 130
    monkeypatch.undo()
    newest = list_checkpoints(out)[-1]
    assert newest.name == "step-000000020"
    weights_file = newest / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])
    caplog.set_level(logging.INFO, logger="sbert_sae")
    assert run_cli(*train, "--resume") == 0
    assert "step-000000020 cannot be read" in caplog.text and "step-000000015 (step 15 of 35)" in caplog.text
    assert_same_model(out, uninterrupted)


def fill_disk_while_writing(monkeypatch, target: str) -> None:
    """The checkpoint writer's `target` file gets half its bytes, then the disk is full."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        path = Path(filename)
        if f"{path.parent.name}/{path.name}" == target:
            data = safetensors.torch.save(tensors, metadata=metadata)
            path.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_a_disk_that_fills_during_a_checkpoint_keeps_the_previous_one(wiki_small, uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    train = ["train", "--dataset", wiki_small, *KILL_RUN, "-q", "--out", out]
    fill_disk_while_writing(monkeypatch, ".tmp-step-000000010/optimizer.safetensors")
    assert run_cli(*train) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"sbert-sae: error: disk full while writing checkpoint {out}/checkpoints/step-000000010: "
        "the previous checkpoint step-000000005 is intact; free space and rerun with --resume"
    ]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000000005"]  # the half-written one is gone
    assert load_checkpoint(out / "checkpoints" / "step-000000005")[4]["global_step"] == 5
    monkeypatch.undo()
    assert run_cli(*train, "--resume") == 0
    assert_same_model(out, uninterrupted)


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode == 0


def test_a_real_full_disk_during_a_checkpoint_keeps_the_previous_one(wiki_small, uninterrupted, tmp_path, monkeypatch, capsys):
    """The same on a real 8 MB tmpfs, filled up after the first checkpoint: the writer's own
    error (safetensors reports ENOSPC in its message) is recognised as a full disk."""
    import sbert_sae.trainer as trainer

    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "8m"):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        out = disk / "run"
        ballast = disk / "ballast"
        real = trainer.save_checkpoint

        def then_the_disk_fills(*args, **kwargs):
            path = real(*args, **kwargs)
            if not ballast.exists():
                with open(ballast, "wb") as f:  # all but 64 KB: room for the log, not a checkpoint
                    free = shutil.disk_usage(disk).free
                    f.write(b"\0" * max(0, free - (64 << 10)))
            return path

        monkeypatch.setattr(trainer, "save_checkpoint", then_the_disk_fills)
        train = ["train", "--dataset", wiki_small, *KILL_RUN, "-q", "--out", out]
        assert run_cli(*train) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "disk full while writing checkpoint" in lines[0] and "step-000000010" in lines[0]
        assert "the previous checkpoint step-000000005 is intact; free space and rerun with --resume" in lines[0]
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000000005"]
        monkeypatch.undo()
        ballast.unlink()
        assert run_cli(*train, "--resume") == 0
        assert_same_model(out, uninterrupted)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_killed_labelling_resumes_without_redoing_finished_features(labelled_run, wiki_small, tmp_path, caplog, monkeypatch):
    """`sbert-sae label` killed with SIGKILL after its second block of 16 features was saved:
    the rerun takes those 32 from feature_labels.partial.json, asks KeyBERT about the other 32
    only, and ends with the labels of an uninterrupted run."""
    import keybert

    saes = {}
    for name in ("whole", "killed"):
        saes[name] = tmp_path / name
        saes[name].mkdir()
        for file in ("config.json", "model.safetensors", "training_args.json"):
            shutil.copy(labelled_run / file, saes[name] / file)
    label = ["--dataset", wiki_small, "--top-texts", "10", "--block-size", "16", "-q"]
    assert run_cli("label", saes["whole"], *label) == 0

    child = Child(["label", saes["killed"], *label], tmp_path / "label.log", pause="block:2")
    child.wait_until_paused()
    child.kill()
    partial = json.loads((saes["killed"] / "feature_labels.partial.json").read_text())
    assert sorted(map(int, partial["features"])) == list(range(32))
    assert not (saes["killed"] / "feature_labels.json").exists()

    asked: list[str] = []
    real_extract = keybert.KeyBERT.extract_keywords

    def recording(self, docs, *args, **kwargs):
        asked.extend(docs)
        return real_extract(self, docs, *args, **kwargs)

    monkeypatch.setattr(keybert.KeyBERT, "extract_keywords", recording)
    caplog.set_level(logging.INFO, logger="sbert_sae")
    assert run_cli("label", saes["killed"], *label) == 0
    assert "resuming labelling: 32 features already done" in caplog.text
    assert asked and min(map(int, asked)) >= 32
    whole = json.loads((saes["whole"] / "feature_labels.json").read_text())["features"]
    resumed = json.loads((saes["killed"] / "feature_labels.json").read_text())["features"]
    assert resumed == whole
    assert not (saes["killed"] / "feature_labels.partial.json").exists()


# ------------------------------------------------------------------ hostile files
class Tripwire:
    """Unpickling this creates the file `marker`: a test that finds no marker knows nothing was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _safetensors_parts(folder: Path) -> tuple[dict, bytes]:
    raw = (folder / "model.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _with_header(folder: Path, change) -> None:
    """Rewrite model.safetensors with its header changed by `change` and the same data bytes."""
    header, data = _safetensors_parts(folder)
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (folder / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data)


def _config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _truncate(folder: Path, keep: float) -> None:
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(raw[: int(len(raw) * keep)])


def _nan_in_decoder(folder: Path) -> None:
    header, data = _safetensors_parts(folder)
    raw = bytearray((folder / "model.safetensors").read_bytes())
    at = len(raw) - len(data) + header["W_dec"]["data_offsets"][0]
    raw[at : at + 4] = b"\x00\x00\xc0\x7f"  # a float32 NaN
    (folder / "model.safetensors").write_bytes(bytes(raw))


def _only(folder: Path, name: str, marker: Path) -> None:
    import pickle

    (folder / "model.safetensors").unlink()
    (folder / name).write_bytes(pickle.dumps({"W_enc": Tripwire(marker)}))


HOSTILE_FOLDERS = {
    # name: (how the folder is spoiled, error type, fragments of the message)
    "weights emptied": (lambda f, m: (f / "model.safetensors").write_bytes(b""), "ModelLoadError", ["model.safetensors", "damaged", "header too small"]),
    "weights cut in the header": (lambda f, m: _truncate(f, 0.01), "ModelLoadError", ["model.safetensors", "damaged"]),
    "weights cut in the data": (lambda f, m: _truncate(f, 0.5), "ModelLoadError", ["model.safetensors", "damaged", "not fully covered"]),
    "header length of 2^62": (lambda f, m: (f / "model.safetensors").write_bytes((1 << 62).to_bytes(8, "little") + (f / "model.safetensors").read_bytes()[8:]), "ModelLoadError", ["model.safetensors", "header too large"]),
    "header offsets overlapping": (lambda f, m: _with_header(f, lambda h: h["W_dec"].update(data_offsets=h["W_enc"]["data_offsets"])), "ModelLoadError", ["model.safetensors", "invalid offset"]),
    "header offsets past the end": (lambda f, m: _with_header(f, lambda h: h["b_pre"].update(data_offsets=[0, 10**12])), "ModelLoadError", ["model.safetensors", "damaged"]),
    "header shape swapped": (lambda f, m: _with_header(f, lambda h: h["W_dec"].update(shape=[16, 64])), "ModelLoadError", ["model.safetensors", "W_dec is [16, 64], not [64, 16]"]),
    "header dtype int64": (lambda f, m: _with_header(f, lambda h: h["W_dec"].update(dtype="I64", shape=[64, 8])), "ModelLoadError", ["model.safetensors", "W_dec is [64, 8]"]),
    "header dtype int32": (lambda f, m: _with_header(f, lambda h: h["W_dec"].update(dtype="I32")), "ModelLoadError", ["model.safetensors", "non-float", "W_dec is I32"]),
    "a tensor renamed": (lambda f, m: _with_header(f, lambda h: h.update(evil=h.pop("b_pre"))), "ModelLoadError", ["model.safetensors", "'evil'", "not an SAE's"]),
    "NaN in the decoder": (lambda f, m: _nan_in_decoder(f), "ModelLoadError", ["model.safetensors", "NaN or inf in W_dec"]),
    "a pickle named model.safetensors": (lambda f, m: (f / "model.safetensors").write_bytes(__import__("pickle").dumps(Tripwire(m))), "ModelLoadError", ["model.safetensors", "damaged"]),
    "weights a folder": (lambda f, m: ((f / "model.safetensors").unlink(), (f / "model.safetensors").mkdir()), "ModelLoadError", ["has no model.safetensors"]),
    "weights a link to /dev/zero": (lambda f, m: ((f / "model.safetensors").unlink(), (f / "model.safetensors").symlink_to("/dev/zero")), "ModelLoadError", ["has no model.safetensors"]),
    "only pytorch_model.bin": (lambda f, m: _only(f, "pytorch_model.bin", m), "ModelLoadError", ["has no model.safetensors", "only pytorch_model.bin", "never loads"]),
    "only model.pt": (lambda f, m: _only(f, "model.pt", m), "ModelLoadError", ["has no model.safetensors", "only model.pt"]),
    "only sae.ckpt": (lambda f, m: _only(f, "sae.ckpt", m), "ModelLoadError", ["only sae.ckpt"]),
    "config n_latents 10^12": (lambda f, m: _config(f, n_latents=10**12), "ModelLoadError", ["model.safetensors", "disagrees with its config.json", "n_latents=1000000000000"]),
    "config n_latents 2^70": (lambda f, m: _config(f, n_latents=2**70), "ModelLoadError", ["disagrees with its config.json"]),
    "config d_in disagreeing": (lambda f, m: _config(f, d_in=32), "ModelLoadError", ["disagrees with its config.json (n_latents=64, d_in=32)", "b_pre is [16], not [32]"]),
    "config k > n_latents": (lambda f, m: _config(f, k=100), "ConfigError", ["config.json", "k=100 is larger than n_latents=64"]),
    "config negative d_in": (lambda f, m: _config(f, d_in=-16), "ConfigError", ["config.json", "d_in must be a positive integer, got -16"]),
    "config k a string": (lambda f, m: _config(f, k="4"), "ConfigError", ["config.json", "k must be a positive integer, got '4'"]),
    "config k NaN": (lambda f, m: (f / "config.json").write_text((f / "config.json").read_text().replace('"k": 4', '"k": NaN')), "ConfigError", ["config.json", "got nan"]),
    "config normalize unknown": (lambda f, m: _config(f, normalize="zscore"), "ConfigError", ["config.json", "'zscore'"]),
    "config base_model_kwargs a string": (lambda f, m: _config(f, base_model_kwargs="x"), "ConfigError", ["config.json", "base_model_kwargs", "'x'"]),
    "config a JSON list": (lambda f, m: (f / "config.json").write_text("[1, 2]"), "ModelLoadError", ["config.json", "not an sbert-sae SAE"]),
    "config not JSON": (lambda f, m: (f / "config.json").write_text("{nope"), "ModelLoadError", ["config.json", "not a valid JSON"]),
    "config nested 100000 deep": (lambda f, m: (f / "config.json").write_text("[" * 100_000 + "]" * 100_000), "ModelLoadError", ["config.json", "RecursionError"]),
    "config without model_type": (lambda f, m: _config(f, model_type=None), "ModelLoadError", ["config.json", "model_type=None"]),
    "labels truncated": (lambda f, m: (f / "feature_labels.json").write_text('{"features": {"1": {"label": "a'), "ModelLoadError", ["feature_labels.json", "not valid JSON"]),
    "labels a list": (lambda f, m: (f / "feature_labels.json").write_text("[]"), "ModelLoadError", ["feature_labels.json", "malformed"]),
    "labels id not a number": (lambda f, m: (f / "feature_labels.json").write_text('{"features": {"x": {}}}'), "ModelLoadError", ["feature_labels.json", "feature id 'x' is not an integer"]),
    "labels id out of range": (lambda f, m: (f / "feature_labels.json").write_text('{"features": {"-1": {}}}'), "ModelLoadError", ["feature_labels.json", "feature id -1 is outside 0..63"]),
    "labels label not a string": (lambda f, m: (f / "feature_labels.json").write_text('{"features": {"1": {"label": ["a"]}}}'), "ModelLoadError", ["feature_labels.json", "label of feature 1 is list"]),
    "labels not UTF-8": (lambda f, m: (f / "feature_labels.json").write_bytes(b"\xff\xfe\x00garbage"), "ModelLoadError", ["feature_labels.json", "UnicodeDecodeError"]),
    "labels nested 100000 deep": (lambda f, m: (f / "feature_labels.json").write_text('{"features": ' + "[" * 100_000 + "]" * 100_000 + "}"), "ModelLoadError", ["feature_labels.json", "RecursionError"]),
    "labels a folder": (lambda f, m: (f / "feature_labels.json").mkdir(), "ModelLoadError", ["feature_labels.json", "IsADirectoryError"]),
    "metrics a list": (lambda f, m: (f / "metrics.json").write_text("[1]"), "ModelLoadError", ["metrics.json", "expected a JSON object, got a list"]),
    "activations link without repo": (lambda f, m: (f / "activations.json").write_text('{"revision": "main"}'), "ModelLoadError", ["activations.json", "'repo_id'"]),
}


@pytest.fixture
def sae_folder(tmp_path) -> Path:
    from sbert_sae import SparseAutoencoderConfig

    torch.manual_seed(0)
    folder = tmp_path / "sae"
    SparseAutoencoder(SparseAutoencoderConfig(d_in=16, n_latents=64, k=4)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", sorted(HOSTILE_FOLDERS))
def test_a_hostile_folder_is_refused_naming_the_file_and_the_problem(case, sae_folder, tmp_path):
    import sbert_sae

    spoil, error, fragments = HOSTILE_FOLDERS[case]
    marker = tmp_path / "unpickled"
    spoil(sae_folder, marker)
    with pytest.raises(getattr(sbert_sae, error)) as caught:
        SparseAutoencoder.from_pretrained(sae_folder)
    for fragment in fragments:
        assert fragment in str(caught.value), (fragment, str(caught.value))
    assert not marker.exists()  # nothing was unpickled


def test_pickles_and_remote_code_beside_good_weights_are_never_run(sae_folder, tmp_path):
    """Tripwire pickles next to the safetensors, and a config pointing at code in the folder, with
    trust_remote_code=True: the SAE loads from the safetensors and neither runs."""
    import pickle

    marker = tmp_path / "ran"
    for name in ("pytorch_model.bin", "model.pt", "training_args.bin"):
        (sae_folder / name).write_bytes(pickle.dumps(Tripwire(marker)))
    (sae_folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Evil: pass\n")
    _config(sae_folder, auto_map={"AutoConfig": "evil.Evil", "AutoModel": "evil.Evil"})
    sae = SparseAutoencoder.from_pretrained(sae_folder, trust_remote_code=True)
    assert isinstance(sae, SparseAutoencoder) and sae.config.n_latents == 64
    assert not marker.exists()


@pytest.mark.parametrize("case", ["weights cut in the data", "header shape swapped", "only pytorch_model.bin", "labels id out of range"])
def test_a_hostile_hub_repo_is_refused(case, hub, sae_folder, tmp_path):
    import sbert_sae
    from huggingface_hub import HfApi

    spoil, error, fragments = HOSTILE_FOLDERS[case]
    marker = tmp_path / "unpickled"
    spoil(sae_folder, marker)
    repo = f"org/hostile-{case.replace(' ', '-')}"
    HfApi().create_repo(repo)
    HfApi().upload_folder(folder_path=str(sae_folder), repo_id=repo)
    with pytest.raises(getattr(sbert_sae, error)) as caught:
        SparseAutoencoder.from_pretrained(repo)
    assert repo in str(caught.value)
    for fragment in fragments:
        assert fragment in str(caught.value), (fragment, str(caught.value))
    assert not marker.exists()
