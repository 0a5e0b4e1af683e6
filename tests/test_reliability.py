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


def test_a_damaged_checkpoint_is_passed_over_for_the_one_before(wiki_small, uninterrupted, tmp_path, caplog, training_crashes_at_step):
    """A checkpoint whose weights file was cut short after it was written (a failing disk): the
    resumption warns, takes the one before, and still ends at the uninterrupted run's model."""
    out = tmp_path / "damaged"
    train = ["train", "--dataset", wiki_small, *KILL_RUN, "-q", "--out", out]
    with training_crashes_at_step(23, KeyboardInterrupt()):  # stopped with Ctrl-C after step 22
        assert run_cli(*train) == 130
    newest = list_checkpoints(out)[-1]
    assert newest.name == "step-000000020"
    weights_file = newest / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])
    caplog.set_level(logging.INFO, logger="sbert_sae")
    assert run_cli(*train, "--resume") == 0
    assert "step-000000020 cannot be read" in caplog.text and "step-000000015 (step 15 of 35)" in caplog.text
    assert_same_model(out, uninterrupted)


def test_an_overwrite_that_is_stopped_keeps_the_run_it_replaces(labelled_run, wiki_small, uninterrupted, tmp_path, training_crashes_at_step):
    """`train --overwrite` into a labelled run's folder, stopped after its checkpoint of step
    20. It used to delete the old run's model, config and metrics before training, so the
    stop lost them (and it never removed the old feature_labels.json, which then loaded with
    the new SAE). The old run now stays, byte for byte, until the new one is complete; the
    new one finishes with --resume, to the uninterrupted run's model, without the old labels.
    The old run's learning curve (train_log.jsonl) also stays: the new run's used to replace it
    from the start, so the stop lost it and left the new run's partial curve beside the old
    model (which `push` published as its own)."""
    out = tmp_path / "replaced"
    shutil.copytree(labelled_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"model.safetensors", "config.json", "metrics.json", "feature_labels.json"} <= before.keys()
    train = ["train", "--dataset", wiki_small, *KILL_RUN, "-q", "--out", out]
    with training_crashes_at_step(23, KeyboardInterrupt()):  # stopped with Ctrl-C after step 22
        assert run_cli(*train, "--overwrite") == 130
    assert list_checkpoints(out)[-1].name == "step-000000020"
    for name, data in before.items():
        assert (out / name).read_bytes() == data, name
    assert SparseAutoencoder.from_pretrained(out).label_data is not None

    assert run_cli(*train, "--resume") == 0
    assert_same_model(out, uninterrupted)
    assert log_records(out) == log_records(uninterrupted)
    assert not (out / "feature_labels.json").exists() and not (out / ".finishing").exists()
    assert SparseAutoencoder.from_pretrained(out).label_data is None
    assert json.loads((out / "metrics.json").read_text())["steps"] == 35


def test_a_second_embedding_into_one_cache_waits_for_the_first(wiki_small, minilm, tmp_path):
    """Two `sbert-sae embed` of one dataset into one cache (two users, or a command run twice
    on a cluster) used to write into it at once: each re-created the vectors file the other
    was filling, overwrote its progress records and rewrote row_ids.npy under its reader. The
    second now waits (and says so) until the first is done, or, as here, killed; it then
    resumes from the first's finished rows, to the vectors `encode` gives."""
    from datasets import load_from_disk

    from sbert_sae.embeddings import open_cache

    cache = tmp_path / "cache"
    embed = ["embed", "--dataset", wiki_small, "--max-rows", "40", "--cache-dir", cache, "-q"]
    first = Child(embed, tmp_path / "first.log", pause="chunk:1")  # its rows embedded, not yet marked complete
    first.wait_until_paused()
    folder = next((cache / "embeddings").iterdir())
    second = Child(embed, tmp_path / "second.log")
    try:
        deadline = time.monotonic() + 300
        while "another process is embedding into" not in second.stderr:
            assert second.proc.poll() is None, f"did not wait for the first: exit {second.proc.returncode}\n{second.stderr[-2000:]}"
            assert time.monotonic() < deadline, "never waited"
            time.sleep(0.05)
        assert not (folder / "complete.json").exists()
    finally:
        first.kill()  # paused for an hour otherwise
    assert second.proc.wait(timeout=300) == 0, second.stderr[-2000:]
    result = open_cache(folder)
    texts = load_from_disk(str(wiki_small))["text"][:40]
    assert result.row_ids.tolist() == list(range(40))
    torch.testing.assert_close(torch.from_numpy(result.embeddings.copy()), torch.from_numpy(minilm.encode(texts)), atol=2e-5, rtol=0)


def test_labels_of_an_sae_replaced_while_labelling_are_not_written_beside_the_new_one(labelled_run, wiki_small, tmp_path, monkeypatch, capsys):
    """`label` loads the SAE and its corpus before it locks the folder (for the write). A
    `train --overwrite` that finished in between left the new SAE with labels made from the
    old one. The labelling now sees that the weights it read were replaced and writes nothing."""
    import sbert_sae.pipeline as pipeline

    out = tmp_path / "relabelled"
    shutil.copytree(labelled_run, out)
    (out / "feature_labels.json").unlink()
    real = pipeline.load_sae_corpus

    def another_run_replaces_the_sae(*args, **kwargs):
        loaded = real(*args, **kwargs)
        assert run_cli("train", "--dataset", wiki_small, *KILL_RUN, "-q", "--out", out, "--overwrite") == 0
        return loaded

    monkeypatch.setattr(pipeline, "load_sae_corpus", another_run_replaces_the_sae)
    capsys.readouterr()
    assert run_cli("label", out, "--dataset", wiki_small, "-q", "--top-texts", "10") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the SAE in {out} was replaced by another run while its labels were being made" in err[0], err
    assert not (out / "feature_labels.json").exists()
    assert SparseAutoencoder.from_pretrained(out).config.n_latents == 128  # the new SAE, unlabelled
    # `families` likewise (here the SAE is replaced by a run of the same settings: a new file).
    assert run_cli("families", out, "--dataset", wiki_small, "-q") == 2
    assert "while its families were being made" in capsys.readouterr().err
    assert not (out / "families.json").exists()


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


def test_killed_labelling_resumes_without_redoing_finished_features(labelled_run, wiki_small, tmp_path, caplog, monkeypatch, keybert_documents):
    """`sbert-sae label` killed with SIGKILL after its second block of 16 features was saved:
    the rerun takes those 32 from feature_labels.partial.json, asks KeyBERT about the other 32
    only, and ends with the labels of an uninterrupted run."""
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

    asked = keybert_documents()
    caplog.set_level(logging.INFO, logger="sbert_sae")
    assert run_cli("label", saes["killed"], *label) == 0
    assert "resuming labelling: 32 features already done" in caplog.text
    assert asked and min(map(int, asked)) >= 32
    whole = json.loads((saes["whole"] / "feature_labels.json").read_text())["features"]
    resumed = json.loads((saes["killed"] / "feature_labels.json").read_text())["features"]
    assert resumed == whole
    assert not (saes["killed"] / "feature_labels.partial.json").exists()


def test_labelling_killed_between_its_labels_and_its_scores_is_named_and_a_rerun_makes_them_agree(labelled_run, wiki_small, hub, tmp_path, caplog, capsys):
    """`sbert-sae label` writes feature_labels.json, then copies the labels' scores into
    metrics.json. SIGKILLed between the two writes, it left the new labels beside the old
    scores, and nothing said so: loading was silent and `push` published the pair. Loading now
    warns, `push` refuses (naming both files, publishing nothing), and a rerun of `label`
    ends with the two in agreement, which `push` then publishes."""
    from sbert_sae.errors import ModelLoadError
    from sbert_sae.labels import label_metrics

    out = tmp_path / "relabelled"
    shutil.copytree(labelled_run, out)
    old_metrics = json.loads((out / "metrics.json").read_text())
    label = ["label", out, "--dataset", wiki_small, "--top-texts", "10", "--seed", "7", "-q"]  # another held-out split: other scores
    child = Child(label, tmp_path / "label.log", pause="labels:1")
    child.wait_until_paused()
    child.kill()
    new_scores = label_metrics(json.loads((out / "feature_labels.json").read_text())["summary"])
    assert new_scores != label_metrics(old_metrics)  # new labels ...
    assert json.loads((out / "metrics.json").read_text()) == old_metrics  # ... beside the old scores

    caplog.set_level(logging.WARNING, logger="sbert_sae")
    loaded = SparseAutoencoder.from_pretrained(out)
    assert "metrics.json's label scores are not those of feature_labels.json" in caplog.text
    with pytest.raises(ModelLoadError, match=rf"{out} was not pushed: metrics.json's label scores are not those of feature_labels.json"):
        loaded.push_to_hub("org/half-labelled")
    capsys.readouterr()
    assert run_cli("push", out, "org/half-labelled", "-q") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.json's label scores are not those of feature_labels.json" in err[0] and f"sbert-sae label {out}" in err[0], err
    assert ("model", "org/half-labelled") not in hub.state.repos  # nothing published

    caplog.clear()
    assert run_cli(*label) == 0
    assert "metrics.json's label scores are not those" in caplog.text  # the rerun says what it mends
    metrics = json.loads((out / "metrics.json").read_text())
    labels = json.loads((out / "feature_labels.json").read_text())
    assert label_metrics(metrics) == label_metrics(labels["summary"]) == new_scores
    assert {k: v for k, v in metrics.items() if k not in new_scores} == {k: v for k, v in old_metrics.items() if k not in new_scores}
    assert not (out / "feature_labels.partial.json").exists()
    caplog.clear()
    SparseAutoencoder.from_pretrained(out)
    assert "label scores are not those" not in caplog.text
    assert run_cli("push", out, "org/half-labelled", "-q") == 0
    files = hub.files("org/half-labelled")
    assert label_metrics(json.loads(files["metrics.json"])) == label_metrics(json.loads(files["feature_labels.json"])["summary"]) == new_scores


def test_a_release_killed_between_its_labels_and_its_scores_is_labelled_again_by_resume(hub, wiki_small, tmp_path, monkeypatch):
    """`release --resume` takes a run that has feature_labels.json as labelled; one killed
    between the labels and their scores would have been published with no label scores in
    its metrics. It now finishes the labelling (from the partial file) and publishes the two in agreement."""
    from sbert_sae.labels import label_metrics

    monkeypatch.setenv("SBERT_SAE_REGISTRY", str(tmp_path / "registry.yaml"))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"name: tiny\nrepo_id: org/tiny-killed\nbase_model: sentence-transformers/all-MiniLM-L6-v2\n"
        f'dataset: {{path: "{wiki_small}"}}\nsae: {{n_latents: 32, k: 4}}\n'
        "training: {epochs: 2, batch_size: 32, report_to: none}\nlabels: {top_texts: 5}\n"
    )
    out = tmp_path / "run"
    child = Child(["release", recipe, "--out", out, "--no-push", "-q"], tmp_path / "release.log", pause="labels:1")
    child.wait_until_paused()
    child.kill()
    assert (out / "feature_labels.json").exists() and not label_metrics(json.loads((out / "metrics.json").read_text()))
    assert run_cli("release", recipe, "--out", out, "--resume", "-q") == 0
    files = hub.files("org/tiny-killed")
    published = label_metrics(json.loads(files["metrics.json"]))
    assert published and published == label_metrics(json.loads(files["feature_labels.json"])["summary"])


# A real process holding a run folder's lock: it writes HELD once it has the lock and keeps
# it until RELEASE exists; refused, it prints the one line and exits 2.
HOLD_RUN_LOCK = """
import sys, time
from pathlib import Path
from sbert_sae.errors import OutputDirError
from sbert_sae.utils import run_lock
folder, held, release = map(Path, sys.argv[1:])
try:
    with run_lock(folder):
        held.write_text("held")
        while not release.exists():
            time.sleep(0.05)
except OutputDirError as err:
    print(err, file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.parametrize("left", ["dead pid", "empty"])
def test_two_runs_that_find_one_stale_lock_do_not_both_take_it(tmp_path, left):
    """Two runs find the lock of a killed run in a folder. Each used to delete it and create its
    own: the second deleted the lock the first had just made, and both wrote the folder. Here
    both are stopped after judging the lock stale; the first is let go and takes the folder,
    then the second: it now finds the first's lock and is refused, naming the first's pid.
    The lock left is a dead run's pid, or nothing (an older version killed between making its
    lock and writing its pid: taken for stale once old). The takeover's guard, made beside
    the lock, is gone with the runs."""
    import socket

    folder = tmp_path / "run"
    folder.mkdir()
    if left == "empty":
        (folder / ".lock").touch()
        long_ago = time.time() - 600
        os.utime(folder / ".lock", (long_ago, long_ago))
    else:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
        (folder / ".lock").write_text(f"{dead.stdout.strip()}@{socket.gethostname()}")  # left by a killed run
    runs = {}
    for name in ("a", "b"):
        env = {**os.environ, TEST_PAUSE_ENV: f"stale-lock:1:{tmp_path / (name + '.paused')}"}
        with open(tmp_path / f"{name}.log", "w") as err:
            runs[name] = subprocess.Popen(
                [sys.executable, "-c", HOLD_RUN_LOCK, str(folder), str(tmp_path / f"{name}.held"), str(tmp_path / f"{name}.release")], env=env, stderr=err
            )
    try:
        for name, run in runs.items():
            deadline = time.monotonic() + 300
            while not (tmp_path / f"{name}.paused").exists():  # the stale lock read and judged
                assert run.poll() is None and time.monotonic() < deadline, (tmp_path / f"{name}.log").read_text()
                time.sleep(0.05)
        (tmp_path / "a.paused").unlink()
        deadline = time.monotonic() + 300
        while not (tmp_path / "a.held").exists():
            assert runs["a"].poll() is None and time.monotonic() < deadline, (tmp_path / "a.log").read_text()
            time.sleep(0.05)
        (tmp_path / "b.paused").unlink()
        deadline = time.monotonic() + 300
        while runs["b"].poll() is None and not (tmp_path / "b.held").exists():
            assert time.monotonic() < deadline, "the second run neither took the folder nor was refused"
            time.sleep(0.05)
        assert not (tmp_path / "b.held").exists(), "both runs hold the folder"
        assert runs["b"].wait(timeout=60) == 2
        assert f"{folder} is in use by another run (pid {runs['a'].pid}" in (tmp_path / "b.log").read_text()
        assert (folder / ".lock").read_text() == f"{runs['a'].pid}@{socket.gethostname()}"
        (tmp_path / "a.release").touch()
        assert runs["a"].wait(timeout=60) == 0
        assert sorted(p.name for p in folder.iterdir()) == []
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()


def test_a_run_killed_as_it_takes_a_folder_leaves_it_free(tmp_path):
    """A run killed between making its lock file and writing its pid into it left an empty
    lock, and every later run into the folder was refused for good ("in use by another run
    (pid ?)"). The pid is now written first and the lock linked into place whole: a run
    killed there leaves no lock, the next takes the folder, and what the killed one left
    beside it goes."""
    from sbert_sae.utils import run_lock

    folder = tmp_path / "run"
    env = {**os.environ, TEST_PAUSE_ENV: f"lock-create:1:{tmp_path / 'killed.paused'}"}
    with open(tmp_path / "killed.log", "w") as err:
        killed = subprocess.Popen([sys.executable, "-c", HOLD_RUN_LOCK, str(folder), str(tmp_path / "killed.held"), str(tmp_path / "release")], env=env, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "killed.paused").exists():
            assert killed.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
            time.sleep(0.05)
    finally:
        killed.kill()
        killed.wait(timeout=60)
    with run_lock(folder) as lock:
        assert lock.read_text() == f"{os.getpid()}@{__import__('socket').gethostname()}"
        assert sorted(p.name for p in folder.iterdir()) == [".lock"]
    assert sorted(p.name for p in folder.iterdir()) == []


def test_the_lock_of_a_run_killed_with_sigkill_is_refused_while_it_lives_then_taken_with_a_warning(tmp_path, caplog):
    """A run holding a folder, killed with SIGKILL, leaves its lock file (pid@host). While it
    lives a second run is refused, naming its pid; once it is dead the lock is taken over
    without asking anyone to delete it, now with a warning naming the dead run's pid (it was
    taken silently: nothing said the folder's last run had been killed)."""
    import socket

    from sbert_sae.errors import OutputDirError
    from sbert_sae.utils import run_lock

    folder = tmp_path / "run"
    with open(tmp_path / "killed.log", "w") as err:
        killed = subprocess.Popen([sys.executable, "-c", HOLD_RUN_LOCK, str(folder), str(tmp_path / "held"), str(tmp_path / "release")], stderr=err)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "held").exists():
            assert killed.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
            time.sleep(0.05)
        with pytest.raises(OutputDirError, match=re.escape(f"{folder} is in use by another run (pid {killed.pid}; lock file {folder / '.lock'})")):
            with run_lock(folder):
                pass
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
    assert (folder / ".lock").read_text() == f"{killed.pid}@{socket.gethostname()}"
    with caplog.at_level(logging.WARNING, logger="sbert_sae.utils"), run_lock(folder):
        assert (folder / ".lock").read_text() == f"{os.getpid()}@{socket.gethostname()}"
    assert f"taking over the lock file {folder / '.lock'} of pid {killed.pid}, a run of this machine that is no longer running" in caplog.text
    assert not (folder / ".lock").exists()


@pytest.mark.parametrize(
    ("content", "what"),
    [("", "is empty"), ("\0" * 12, "holds no run's pid ('" + "\\x00" * 12 + "')"), ("locked by alice", "holds no run's pid ('locked by alice')")],
    ids=["empty", "zeros", "text"],
)
def test_a_lock_without_a_pid_is_refused_while_new_and_taken_once_old(tmp_path, caplog, content, what):
    """An empty lock, as older versions left when killed as they took a folder, or one holding
    no pid (zeros a crash left, a hand-made file, which was refused forever as "pid <content>"):
    refused, saying so, while it may be a starting run's; taken over, with a warning, once old."""
    import socket

    from sbert_sae.errors import OutputDirError
    from sbert_sae.utils import EMPTY_LOCK_STALE_S, run_lock

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text(content)
    with pytest.raises(OutputDirError, match=re.escape(f"its lock file {folder / '.lock'} {what}; such a lock is taken for a dead run's once {EMPTY_LOCK_STALE_S} s old")):
        with run_lock(folder):
            pass
    assert (folder / ".lock").read_text() == content
    long_ago = time.time() - EMPTY_LOCK_STALE_S - 5
    os.utime(folder / ".lock", (long_ago, long_ago))
    with caplog.at_level(logging.WARNING, logger="sbert_sae.utils"), run_lock(folder):
        assert (folder / ".lock").read_text() == f"{os.getpid()}@{socket.gethostname()}"
    assert f"taking over the lock file {folder / '.lock'}, which {what}, left" in caplog.text
    assert not (folder / ".lock").exists()


@pytest.mark.filterwarnings("ignore:flock not supported on this filesystem")
def test_a_disk_without_flock_still_locks(tmp_path, monkeypatch):
    """Where flock answers ENOSYS (some FUSE mounts, Lustre without -o flock), the locks of
    caches and takeovers (`PathLock`) are filelock's, as they were before: a file that exists
    while it is held, deleted as it is let go (they raised "Function not implemented")."""
    import fcntl

    from sbert_sae.utils import PathLock

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    path = tmp_path / "entry.lock"
    first = PathLock(path)
    with pytest.warns(UserWarning, match="flock not supported"):
        assert first.acquire(timeout=0)
    assert path.exists() and not PathLock(path).acquire(timeout=0)
    first.release()
    assert not path.exists()
    second = PathLock(path)
    assert second.acquire(timeout=0)
    second.release()
    assert not path.exists()


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


# A fragment that is a tuple is matched by any of its wordings: safetensors 0.4 names its header
# errors by their variant (HeaderTooLarge, InvalidOffset, ...), newer ones in words.
HOSTILE_FOLDERS = {
    # name: (how the folder is spoiled, error type, fragments of the message)
    "weights emptied": (lambda f, m: (f / "model.safetensors").write_bytes(b""), "ModelLoadError", ["model.safetensors", "damaged", ("header too small", "HeaderTooSmall")]),
    "weights cut in the header": (lambda f, m: _truncate(f, 0.01), "ModelLoadError", ["model.safetensors", "damaged"]),
    "weights cut in the data": (lambda f, m: _truncate(f, 0.5), "ModelLoadError", ["model.safetensors", "damaged", ("not fully covered", "MetadataIncompleteBuffer")]),
    "header length of 2^62": (lambda f, m: (f / "model.safetensors").write_bytes((1 << 62).to_bytes(8, "little") + (f / "model.safetensors").read_bytes()[8:]), "ModelLoadError", ["model.safetensors", ("header too large", "HeaderTooLarge")]),
    "header offsets overlapping": (lambda f, m: _with_header(f, lambda h: h["W_dec"].update(data_offsets=h["W_enc"]["data_offsets"])), "ModelLoadError", ["model.safetensors", ("invalid offset", "InvalidOffset")]),
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
    for fragment in fragments:  # a tuple: any of its wordings
        assert any(f in str(caught.value) for f in (fragment if isinstance(fragment, tuple) else (fragment,))), (fragment, str(caught.value))
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
    from huggingface_hub import HfApi

    import sbert_sae

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
        assert any(f in str(caught.value) for f in (fragment if isinstance(fragment, tuple) else (fragment,))), (fragment, str(caught.value))
    assert not marker.exists()


# ------------------------------------------------------------------ hostile inputs (hypothesis)
import contextlib  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sbert_sae import ConfigError, InputError, SbertSaeError, SparseAutoencoderConfig  # noqa: E402

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_MODEL = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ANY_VALUE = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=6),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.one_of(st.text(max_size=3), st.integers()), st.integers(), max_size=2),
)
CONFIG_FIELDS = ("d_in", "n_latents", "k", "k_aux", "auxk_coef", "dead_threshold", "normalize", "base_model", "base_model_revision", "base_model_kwargs")


def names_value(message: str, value) -> bool:
    return repr(value) in message or str(value) in message


@FUZZ
@given(field=st.sampled_from(CONFIG_FIELDS), value=ANY_VALUE)
def test_fuzzed_config_values_build_a_valid_config_or_are_named(field, value):
    try:
        config = SparseAutoencoderConfig(**{field: value})
    except ConfigError as err:
        assert field in str(err) and names_value(str(err), value), str(err)
        return
    for name in ("d_in", "n_latents", "k", "k_aux"):
        size = getattr(config, name)
        assert isinstance(size, int) and not isinstance(size, bool) and size >= 1
    assert config.k <= config.n_latents
    assert isinstance(config.auxk_coef, (int, float)) and math.isfinite(config.auxk_coef) and config.auxk_coef >= 0
    assert config.normalize in ("l2", "none")


@pytest.fixture(scope="module")
def fuzz_sae() -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=16, n_latents=64, k=4))
    sae.init_b_pre_from_data(torch.randn(32, 16))
    return sae


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn]
SPECIAL = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-45, 3e38, -3e38, 65504.0, float("nan"), float("inf"), float("-inf")])


@st.composite
def tensors(draw, width: int):
    """Tensors of any rank, shape, dtype and contents, on the CPU or the meta device, and non-tensors."""
    kind = draw(st.sampled_from(["tensor"] * 8 + ["numpy", "list", "none", "string"]))
    shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, width - 1, width, width + 1]), min_size=0, max_size=3)))
    if kind == "numpy":
        import numpy as np

        return np.zeros(shape, dtype=np.float32)
    if kind in ("list", "none", "string"):
        return {"list": [[0.0] * width], "none": None, "string": "embedding"}[kind]
    dtype = draw(st.sampled_from(DTYPES))
    if draw(st.integers(0, 9)) == 0:
        return torch.empty(shape, dtype=dtype, device="meta")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16)))) * draw(st.sampled_from([1.0, 1e-30, 1e30]))
    if x.numel() and draw(st.booleans()):
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(SPECIAL)
    if dtype.is_complex:
        return x.to(dtype)
    return x.to(dtype) if dtype.is_floating_point else x.clamp(-100, 100).nan_to_num(0).to(dtype)


def as_tensor(x):
    """A numpy array as the tensor the SAE reads it as (it takes `SentenceTransformer.encode`'s
    numpy output); anything else as it is."""
    import numpy as np

    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def embedding_problems(x, width: int) -> list[str]:
    """What an embedding batch's error must name (empty: the batch is valid)."""
    x = as_tensor(x)
    if not isinstance(x, torch.Tensor):
        return [type(x).__name__]
    problems = []
    if x.dim() != 2 or x.shape[1] != width:
        problems.append(str(tuple(x.shape)))
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        problems.append(str(x.dtype))
    if x.device.type == "meta":
        problems.append("meta")
    elif not problems and x.shape[0] == 0:
        problems.append("empty")
    elif not problems and not torch.isfinite(x).all():
        problems.append("NaN or inf")
    return problems


@FUZZ
@given(x=tensors(16), method=st.sampled_from(["encode", "encode_topk", "forward", "explain"]))
def test_fuzzed_embeddings_are_encoded_or_refused_naming_the_problem(fuzz_sae, x, method):
    assume(not (method == "explain" and isinstance(x, str)))  # texts: test_fuzzed_texts_...
    problems = embedding_problems(x, 16)
    seen = as_tensor(x)
    if method == "explain" and isinstance(seen, torch.Tensor):  # one embedding, as a vector or one row
        if seen.dim() == 1:
            problems = embedding_problems(seen.reshape(1, -1), 16)
        elif seen.dim() == 2 and seen.shape[0] != 1:
            problems = [f"got {seen.shape[0]} rows"]
        elif seen.dim() != 2:
            problems = [str(tuple(seen.shape))]
    try:
        with torch.no_grad():
            out = getattr(fuzz_sae, method)(x) if method != "forward" else fuzz_sae(x)
    except InputError as err:
        assert problems and any(p in str(err) for p in problems), (problems, str(err))
        return
    except SbertSaeError as err:  # pragma: no cover - reported as a failure below
        raise AssertionError(f"{type(err).__name__} for an input: {err}") from err
    if method == "explain" and not isinstance(seen, torch.Tensor):
        raise AssertionError(f"explain accepted a {type(x).__name__}")
    assert not problems, f"accepted an input with {problems}"
    n = x.reshape(-1, 16).shape[0]
    if method == "encode":
        assert out.shape == (n, 64) and torch.isfinite(out).all() and ((out != 0).sum(1) <= 4).all()
    elif method == "encode_topk":
        assert out[0].shape == out[1].shape == (n, 4) and (out[0] >= 0).all()
    elif method == "forward":
        assert out.reconstruction.shape == (n, 16) and torch.isfinite(out.loss)
    else:
        assert len(out) <= 4 and all(0 <= row["feature"] < 64 and row["activation"] > 0 for row in out)


@st.composite
def sparse_codes(draw):
    """(values, indices) pairs: mostly of one shape, with ids in and out of range, any dtypes."""
    shape = draw(st.sampled_from([(0, 4), (2, 4), (3, 4), (2, 1), (4,), (2, 4, 1), ()]))
    values = draw(tensors(4)) if draw(st.integers(0, 4)) == 0 else torch.rand(shape).to(draw(st.sampled_from(DTYPES[:4] + DTYPES[6:7])))
    if isinstance(values, torch.Tensor) and values.numel() and values.is_floating_point() and draw(st.booleans()):
        values.view(-1)[0] = draw(SPECIAL)
    kind = draw(st.sampled_from(["ids"] * 6 + ["float", "list"]))
    if kind != "ids":
        return values, (torch.zeros(shape) if kind == "float" else [[0, 1, 2, 3]])
    ids = torch.randint(0, 64, shape)
    if ids.numel() and draw(st.booleans()):
        ids.view(-1)[draw(st.integers(0, ids.numel() - 1))] = draw(st.sampled_from([-1, 64, 65, -(2**31), 2**31 - 1, 2**40]))
    return values, ids.to(draw(st.sampled_from([torch.int64, torch.int64, torch.int32, torch.int16])))


@FUZZ
@given(code=sparse_codes())
def test_fuzzed_sparse_codes_are_decoded_or_refused_naming_the_problem(fuzz_sae, code):
    values, indices = code
    checked_values, checked_indices = as_tensor(values), as_tensor(indices)
    problems = []
    if not isinstance(checked_values, torch.Tensor) or not isinstance(checked_indices, torch.Tensor):
        problems.append(type(checked_values if not isinstance(checked_values, torch.Tensor) else checked_indices).__name__)
    else:
        if checked_values.shape != checked_indices.shape or checked_values.dim() != 2:
            problems.append(str(tuple(checked_values.shape)))
        if checked_values.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            problems.append(str(checked_values.dtype))
        if checked_indices.dtype not in (torch.int32, torch.int64):
            problems.append(str(checked_indices.dtype))
        if checked_values.device.type == "meta":
            problems.append("meta")
        elif not problems and checked_indices.numel() and not ((checked_indices >= 0) & (checked_indices < 64)).all():
            problems.append("feature ids in 0..63")
        elif not problems and not torch.isfinite(checked_values).all():
            problems.append("NaN or inf")
    try:
        out = fuzz_sae.decode_topk(values, indices)
    except InputError as err:
        assert problems and any(p in str(err) for p in problems), (problems, str(err))
        return
    assert not problems, f"accepted a code with {problems}"
    assert out.shape == (values.shape[0], 16)


@FUZZ
@given(latents=tensors(64))
def test_fuzzed_dense_codes_are_decoded_or_refused_naming_the_problem(fuzz_sae, latents):
    problems = embedding_problems(latents, 64)
    if problems == ["empty"]:
        problems = []  # decoding no rows gives no rows
    try:
        out = fuzz_sae.decode(latents)
    except InputError as err:
        assert problems and any(p in str(err) for p in problems), (problems, str(err))
        return
    assert not problems, f"accepted latents with {problems}"
    assert out.shape == (latents.shape[0], 16)


TEXTS = st.lists(st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40), min_size=0, max_size=4)


@pytest.fixture(scope="module")
def text_sae(minilm) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=384, n_latents=256, k=8, base_model="sentence-transformers/all-MiniLM-L6-v2"))
    sae._base_model = minilm  # the real model, loaded once for the session
    return sae


@FUZZ_MODEL
@given(texts=TEXTS, method=st.sampled_from(["encode_texts", "explain"]))
def test_fuzzed_texts_are_encoded_or_refused_naming_the_text(text_sae, texts, method):
    # explain takes one text, named "text" in its refusals; encode_texts a list, named by index.
    def problem(i, t):
        where = "text" if method == "explain" else f"texts[{i}]"
        if not t.strip():
            return f"{where} is empty"
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            return f"{where} is not valid Unicode"
        return None

    if method == "explain":
        texts = texts[:1] or [""]
    problems = [p for p in (problem(i, t) for i, t in enumerate(texts)) if p] or (["texts is empty"] if not texts else [])
    try:
        out = text_sae.encode_texts(texts) if method == "encode_texts" else text_sae.explain(texts[0])
    except InputError as err:
        assert problems and str(err).startswith(problems[0]), (problems, str(err))
        return
    assert not problems, f"accepted {texts!r}"
    if method == "encode_texts":
        assert out.shape == (len(texts), 256) and torch.isfinite(out).all() and ((out > 0).sum(1) <= 8).all()
    else:
        assert all(0 <= row["feature"] < 256 for row in out)


# --------------------------------------------------------------- fuzzed command lines
def _int(text):
    try:
        return int(text)
    except ValueError:
        return None


def _float(text):
    try:
        return float(text)
    except ValueError:
        return None


def _in(choices):
    return lambda v: v in choices


def _positive(v):
    return _int(v) is not None and _int(v) >= 1


def _trackers(v):
    from accelerate.utils import LoggerType

    return v in ("auto", "none") or all(t.strip() in {t.value for t in LoggerType} for t in v.split(","))


# option -> whether a value is valid (Python's int()/float() decide what a number is)
TRAIN_OPTIONS = {
    "--k": lambda v: _positive(v) and _int(v) <= 6144,
    "--n-latents": lambda v: _positive(v) and _int(v) >= 32,
    "--k-aux": lambda v: _positive(v) and _int(v) <= 6144,  # at most --n-latents (6144), as --k
    "--auxk-coef": lambda v: _float(v) is not None and math.isfinite(_float(v)) and _float(v) >= 0,
    "--dead-threshold": _positive,
    "--epochs": _positive,
    "--batch-size": _positive,
    "--lr": lambda v: _float(v) is not None and math.isfinite(_float(v)) and _float(v) > 0,
    "--decoder-lr-scale": lambda v: _float(v) is not None and math.isfinite(_float(v)) and _float(v) > 0,
    "--encoder-init-scale": lambda v: _float(v) is not None and math.isfinite(_float(v)) and _float(v) > 0,
    "--decay-fraction": lambda v: _float(v) is not None and 0 <= _float(v) <= 0.95,  # 1 - the default warm-up
    "--warmup-fraction": lambda v: _float(v) is not None and 0 <= _float(v) < 1,
    "--grad-clip": lambda v: _float(v) is not None and math.isfinite(_float(v)) and _float(v) >= 0,
    "--heldout-fraction": lambda v: _float(v) is not None and 0 <= _float(v) < 1,
    "--seed": lambda v: _int(v) is not None and 0 <= _int(v) < 2**32,
    "--checkpoint-every": lambda v: _int(v) is not None and _int(v) >= 0,
    "--checkpoint-min-seconds": lambda v: _float(v) is not None and math.isfinite(_float(v)) and _float(v) >= 0,
    "--log-every": _positive,
    "--max-rows": _positive,
    "--embed-batch-size": _positive,
    "--device": lambda v: v == "cpu" or (v.startswith("cuda") and torch.cuda.is_available() and v in ("cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count())))),
    "--report-to": _trackers,
    "--mixed-precision": _in(("auto", "no", "bf16", "fp16")),
    "--normalize": _in(("l2", "none")),
    "--lr-schedule": _in(("constant", "linear", "cosine", "wsd")),
    "--embed-precision": _in(("auto", "fp32", "fp16", "bf16")),
}
LABEL_OPTIONS = {
    "--top-texts": _positive,
    "--quantile-texts": lambda v: _int(v) is not None and _int(v) >= 0,
    "--negatives": _positive,
    "--min-df": _positive,
    "--candidates": _positive,
    "--keywords": _positive,
    "--max-label-keywords": _positive,
    "--block-size": _positive,
    "--label-heldout-fraction": lambda v: _float(v) is not None and 0 < _float(v) < 1,
    "--seed": lambda v: _int(v) is not None and _int(v) >= 0,
    "--ngram": lambda v: (lambda lo, hi: lo is not None and hi is not None and 1 <= lo <= hi <= 6)(_int(v.partition("-")[0]), _int(v.partition("-")[2] or v.partition("-")[0])),
}
FAMILY_OPTIONS = {
    "--threshold": lambda v: _float(v) is not None and 0 < _float(v) < 1,
    "--max-jaccard": lambda v: _float(v) is not None and 0 <= _float(v) <= 1,
    "--max-density": lambda v: _float(v) is not None and 0 < _float(v) <= 1,
    "--removal-rounds": lambda v: _int(v) is not None and _int(v) >= 0,
    "--min-out-degree": _positive,
    "--min-children": _positive,
    "--permutations": _positive,
    "--top": _positive,
    "--seed": lambda v: _int(v) is not None and _int(v) >= 0,
}
OPTION_VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "-0", "1", "-1", "0.5", "1e400", "-1e400", "nan", "inf", "1e3", "1_000", "١٢", " 7 ", "", " ", "\n", "0x10", "cpu", "cuda",
                     "cuda:7", "meta", "foo", "auto", "none", "tensorboard", "wandb,x", "l2", "bf16", "fp8", "cosine", "1-3", "3-1", "0-2", "2-9", "1-"]),
    st.text(max_size=8),
)


def _run_main(argv: list[str]) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse's refusals
            code = exit.code
    return code, err.getvalue().splitlines()


def _assert_one_line_naming(code, lines, option, value, valid, target):
    assert code == 2 and len(lines) == 1, (code, lines)
    line = lines[0]
    if valid:
        assert target in line, f"{option}={value!r} is valid, yet: {line}"
        return
    assert target not in line, f"{option}={value!r} is invalid, yet reached: {line}"
    # The option as typed, not the setting it fills ("lr must be > 0" left the user to guess).
    assert re.search(rf"{re.escape(option)}(?![\w-])", line), f"{option} not named in: {line}"
    shown = {value, repr(value), value.strip()}
    for parse in (_int, _float):
        if parse(value) is not None:
            shown |= {str(parse(value)), repr(parse(value))}
    if option == "--report-to":
        shown |= {repr(t.strip()) for t in value.split(",")}
    assert any(s and s in line for s in shown) or (value == "" and "''" in line), f"{value!r} not named in: {line}"


@pytest.fixture(scope="module")
def nowhere(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "no-such-dataset"


@FUZZ
@given(option=st.sampled_from(sorted(TRAIN_OPTIONS)), value=OPTION_VALUES)
def test_fuzzed_train_arguments_give_one_line_naming_the_value(nowhere, option, value):
    """A bad value is named in one line before any work; a good one gets as far as the
    (missing) dataset, which is then what the line names."""
    code, lines = _run_main(["train", "--dataset", str(nowhere), "--out", str(nowhere.parent / "out"), "-q", f"{option}={value}"])
    _assert_one_line_naming(code, lines, option, value, TRAIN_OPTIONS[option](value), "no-such-dataset")


@FUZZ
@given(option=st.sampled_from(sorted(LABEL_OPTIONS)), value=OPTION_VALUES)
def test_fuzzed_label_arguments_give_one_line_naming_the_value(nowhere, option, value):
    code, lines = _run_main(["label", str(nowhere.parent / "no-such-sae"), "--dataset", str(nowhere), "-q", f"{option}={value}"])
    _assert_one_line_naming(code, lines, option, value, LABEL_OPTIONS[option](value), "no-such-sae")


@FUZZ
@given(option=st.sampled_from(sorted(FAMILY_OPTIONS)), value=OPTION_VALUES)
def test_fuzzed_families_arguments_give_one_line_naming_the_value(nowhere, option, value):
    # --seed -1 escaped as numpy's "ValueError: expected non-negative integer" (exit 1).
    code, lines = _run_main(["families", str(nowhere.parent / "no-such-sae"), "-q", f"{option}={value}"])
    _assert_one_line_naming(code, lines, option, value, FAMILY_OPTIONS[option](value), "no-such-sae")


@pytest.mark.parametrize(
    "argv, line",
    [
        (["train", "--lr", "0"], "sbert-sae: error: --lr must be > 0, got 0.0"),
        (["train", "--k", "64", "--n-latents", "32"], "sbert-sae: error: --k=64 is larger than --n-latents=32: --k must be in 1..--n-latents"),
        # Was accepted and silently used as n_latents.
        (["train", "--k-aux", "100", "--n-latents", "64"], "sbert-sae: error: --k-aux=100 is larger than --n-latents=64: --k-aux must be in 1..--n-latents"),
        (["sweep", "--n", "32,64", "--k", "4", "--k-aux", "100"], "sbert-sae: error: --k-aux=100 is larger than --n=64: --k-aux must be in 1..--n"),
        (["train", "--decay-fraction", "0.9", "--warmup-fraction", "0.5"], "sbert-sae: error: --decay-fraction must be in [0, 1 - --warmup-fraction], got 0.9"),
        (["train", "--report-to", "lr,k"], "sbert-sae: error: --report-to names unknown trackers ['lr', 'k']: use auto, none, or a comma list of "),
        (["train", "--device", "meta"], "sbert-sae: error: --device 'meta' cannot run sbert-sae (use cpu, cuda, cuda:N or mps)"),
        (["sweep", "--n", "16", "--k", "32"], "sbert-sae: error: --k must not exceed --n: --n=16 --k=32"),
        (["sweep", "--n", "64", "--k", "4", "--encoder-init-scale", "0"], "sbert-sae: error: --encoder-init-scale must be a finite number > 0, got 0.0"),
        (["label", "--quantile-texts", "-1"], "sbert-sae: error: --quantile-texts must be >= 0, got -1"),
        (["families", "--seed", "-1"], "sbert-sae: error: --seed must be an integer >= 0, got -1"),
    ],
)
def test_a_bad_option_is_named_as_typed_on_the_command_line_and_as_the_field_in_python(nowhere, argv, line):
    """The settings' checks name their fields (lr, k_aux, ...), right for a Python caller; on
    the command line the same check names the option the user typed."""
    command, *options = argv
    where = {
        "train": ["--dataset", str(nowhere), "--out", str(nowhere.parent / "out")],
        "sweep": ["--dataset", str(nowhere), "--out", str(nowhere.parent / "out")],
        "label": [str(nowhere.parent / "no-such-sae"), "--dataset", str(nowhere)],
        "families": [str(nowhere.parent / "no-such-sae")],
    }[command]
    code, lines = _run_main([command, *where, "-q", *options])
    assert code == 2 and len(lines) == 1 and lines[0].startswith(line), (code, lines)
    from sbert_sae.families import FamilyArguments
    from sbert_sae.labels import LabelArguments
    from sbert_sae.trainer import TrainingArguments

    with pytest.raises(ConfigError, match=r"^lr must be > 0, got 0$"):
        TrainingArguments(lr=0).validate()
    with pytest.raises(ConfigError, match=r"^k=64 is larger than n_latents=32"):
        SparseAutoencoderConfig(d_in=8, n_latents=32, k=64)
    from sbert_sae.pipeline import DataArguments, SaeArguments, run_training

    with pytest.raises(ConfigError, match=r"^k_aux=65 is larger than n_latents=64: k_aux must be in 1\.\.n_latents$"):
        run_training(DataArguments(dataset=str(nowhere)), SaeArguments(n_latents=64, k=4, k_aux=65), TrainingArguments(), nowhere.parent / "out")
    SaeArguments(n_latents=64, k=4, k_aux=64).validate()
    # Left out, k_aux is 2k: above a small n_latents (96 > 64) it is not refused, as it never was.
    SaeArguments(n_latents=64, k=48).validate()
    with pytest.raises(ConfigError, match=r"^quantile_texts must be >= 0"):
        LabelArguments(quantile_texts=-1).validate()
    with pytest.raises(ConfigError, match=r"^seed must be an integer >= 0, got -1$"):
        FamilyArguments(seed=-1).validate()


def test_a_bad_compare_or_search_option_is_named_as_typed(tmp_path):
    """compare's --min-cosine is checked by run_comparison (min_cosine), search's strengths by
    the index ("up strength for '0'"): both now name the option."""
    from sbert_sae.compare import compare_saes

    for name in ("a", "b"):
        SparseAutoencoder(SparseAutoencoderConfig(d_in=8, n_latents=16, k=2)).save_pretrained(tmp_path / name)
    code, lines = _run_main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "-q", "--min-cosine", "2"])
    assert (code, lines) == (2, ["sbert-sae: error: --min-cosine must be in [-1, 1], got 2.0"])
    with pytest.raises(InputError, match=r"^min_cosine must be in \[-1, 1\], got 2$"):
        sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=8, n_latents=16, k=2))
        compare_saes(sae, sae, min_cosine=2)
    for options, line in (
        (["--up", "0", "--strength", "nan"], "sbert-sae: error: --strength must be a finite number, got nan"),
        (["--down", "0=inf"], "sbert-sae: error: --down '0=inf': 'inf' is not a finite number"),
    ):
        code, lines = _run_main(["search", str(tmp_path / "a"), "a query", "-q", *options])
        assert (code, lines) == (2, [line])


@pytest.mark.parametrize("port", ["0", "65536", "70000", "x"])
def test_a_port_out_of_range_is_refused_by_its_option(port):
    # 70000 reached the explorer's server, which stopped with "OverflowError: bind(): port
    # must be 0-65535" (exit 1) after the SAE had been loaded.
    code, lines = _run_main(["explore", "no-such-sae", "--port", port, "--no-browser", "-q"])
    assert code == 2 and len(lines) == 1 and "--port" in lines[0] and repr(port) in lines[0], (code, lines)


def test_an_sae_too_large_to_allocate_is_a_config_error():
    with pytest.raises(ConfigError, match=r"n_latents=1099511627776 and d_in=1099511627776 needs .* GiB"):
        SparseAutoencoder(SparseAutoencoderConfig(d_in=2**40, n_latents=2**40, k=1))


def test_a_folder_holding_a_run_is_refused_naming_the_python_arguments_too(tmp_path):
    # run_training from a notebook was told to "pass --overwrite ... or --resume", options of
    # a command line it never used.
    from sbert_sae import OutputDirError, ResumeError
    from sbert_sae.pipeline import check_output_dir

    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(OutputDirError, match=r"--overwrite .*--resume .*\(overwrite=True or resume=True from Python\)"):
        check_output_dir(tmp_path, overwrite=False, resume=False)
    with pytest.raises(ResumeError, match=r"nothing to resume \(use --overwrite, overwrite=True from Python, to train again\)"):
        check_output_dir(tmp_path, overwrite=False, resume=True)
