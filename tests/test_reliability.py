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
