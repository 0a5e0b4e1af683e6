"""Scaling sweeps: the power-law fit, the grid and memory checks, and a real sweep by the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sbert_sae import ConfigError, InputError, SparseAutoencoder
from sbert_sae.cli import main
from sbert_sae.sweep import check_grid, check_memory, estimate_training_bytes, fit_power_law, training_flops


def test_power_law_fit_recovers_a_known_law():
    n = np.array([1536, 3072, 6144, 12288])
    fit = fit_power_law(n, 2.5 * n**-0.31)
    assert fit.exponent == pytest.approx(0.31) and fit.a == pytest.approx(2.5) and fit.r2 == pytest.approx(1.0)
    noisy = fit_power_law(n, 2.5 * n**-0.31 * np.array([1.02, 0.97, 1.01, 0.99]))
    assert 0.25 < noisy.exponent < 0.37 and noisy.r2 < 1.0
    assert fit_power_law([3072, 3072], [0.3, 0.2]) is None  # one size: nothing to fit


def test_grid_is_checked():
    assert check_grid([64, 32], [8, 4]) == [(32, 4), (32, 8), (64, 4), (64, 8)]
    with pytest.raises(InputError, match="k must not exceed n: n=32 k=64"):
        check_grid([32, 128], [64])
    with pytest.raises(InputError, match="n values repeat"):
        check_grid([32, 32], [4])
    with pytest.raises(InputError, match="grid is empty"):
        check_grid([], [4])


def test_a_grid_too_large_for_memory_is_refused_up_front():
    need = estimate_training_bytes(98304, 64, 384, 4096, 10_000, embeddings_on_device=False)
    # Weights, gradients and Adam's moments alone are 16 bytes a parameter.
    assert need > 16 * 2 * 98304 * 384
    check_memory([(1536, 16)], 384, 4096, 10_000, "cpu", free=8 * 10**9)
    with pytest.raises(ConfigError, match=r"n=98304 k=64 needs ~\d+\.\d GB with batch 4096, but 2\.0 GB is free") as err:
        check_memory([(1536, 16), (98304, 64)], 384, 4096, 10_000, "cpu", free=2 * 10**9)
    assert "n=1536" not in str(err.value)
    assert training_flops(1000, 384, 1536, 16) == 1000 * 6 * 384 * (1536 + 16)


def test_sweep_command_trains_the_grid_and_fits_it(wiki_small, tmp_path, capsys, monkeypatch):
    import sbert_sae.pipeline as pipeline

    loads = []
    real_load = pipeline.load_and_embed
    monkeypatch.setattr(pipeline, "load_and_embed", lambda *a, **kw: loads.append(1) or real_load(*a, **kw))
    out = tmp_path / "sweep"
    args = ["sweep", "--dataset", str(wiki_small), "--n", "32,96", "--k", "4,8", "--epochs", "3", "--batch-size", "32", "--out", str(out), "-q", "--report-to", "none"]
    assert main(args) == 0
    assert len(loads) == 1  # the corpus is read once for the four points
    printed = capsys.readouterr().out
    doc = json.loads((out / "sweep.json").read_text())
    assert [(r["n"], r["k"]) for r in doc["rows"]] == [(32, 4), (32, 8), (96, 4), (96, 8)]
    assert sorted(p.name for p in out.iterdir()) == ["n32-k4", "n32-k8", "n96-k4", "n96-k8", "scaling.png", "sweep.json", "sweep.md"]
    for row in doc["rows"]:
        metrics = json.loads((out / row["folder"] / "metrics.json").read_text())
        assert row["heldout_fvu"] == metrics["heldout_fvu"]
        assert json.loads((out / row["folder"] / "config.json").read_text())["n_latents"] == row["n"]
    for k in ("4", "8"):
        fit = doc["fit_fvu_vs_n"][k]
        rows = [r for r in doc["rows"] if str(r["k"]) == k]
        # Two sizes: the fitted law goes through both points.
        assert fit["a"] * rows[0]["n"] ** -fit["exponent"] == pytest.approx(rows[0]["heldout_fvu"], rel=1e-6)
        assert f"k={k}: held-out FVU = " in printed
    assert (out / "scaling.png").stat().st_size > 10_000
    # Run again: every point is reused, nothing retrained.
    before = {p: (out / p / "model.safetensors").stat().st_mtime_ns for p in ("n32-k4", "n96-k8")}
    assert main(args) == 0
    assert "already trained, reused: n32-k4, n32-k8, n96-k4, n96-k8" in capsys.readouterr().out
    assert before == {p: (out / p / "model.safetensors").stat().st_mtime_ns for p in before}


def test_sweep_refuses_bad_grids_in_one_line(wiki_small, tmp_path, capsys):
    base = ["sweep", "--dataset", str(wiki_small), "--out", str(tmp_path / "s"), "-q", "--report-to", "none"]
    assert main([*base, "--n", "32", "--k", "64"]) == 2
    assert "--k must not exceed --n: --n=32 --k=64" in capsys.readouterr().err
    assert main([*base, "--n", "4000000000", "--k", "8"]) == 2
    err = capsys.readouterr().err
    assert "the grid does not fit in CPU memory: n=4000000000 k=8 needs ~" in err and err.count("\n") == 1
    assert not (tmp_path / "s" / "n4000000000-k8").exists()
    with pytest.raises(SystemExit):
        main([*base, "--n", "32,x", "--k", "4"])
    assert "expected comma-separated positive integers, got 'x'" in capsys.readouterr().err


def test_a_rerun_with_other_settings_refuses_points_trained_with_the_old_ones(wiki_small, tmp_path, capsys):
    """A point trained with --epochs 1 was reused by a sweep with --epochs 3: its FVU mixed into
    the fits and its compute was counted with 3 epochs. Now the sweep names the difference."""
    out = tmp_path / "sweep"
    base = ["sweep", "--dataset", str(wiki_small), "--n", "32", "--k", "4", "--batch-size", "32", "--out", str(out), "-q", "--report-to", "none"]
    assert main([*base, "--epochs", "1"]) == 0
    first = json.loads((out / "sweep.json").read_text())["rows"][0]
    weights = (out / "n32-k4" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*base, "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    # Named by the option typed (it said "epochs 1, not 3", the setting's field).
    assert "n32-k4 was trained with other settings than this sweep's (--epochs 1 -> 3)" in err and "--overwrite" in err
    assert err.count("\n") == 1
    # The Python API names the settings by their fields, and the error is still an InputError.
    from sbert_sae.pipeline import DataArguments, SaeArguments
    from sbert_sae.sweep import check_reusable
    from sbert_sae.trainer import TrainingArguments

    cache_name = Path(json.loads((out / "n32-k4" / "training_args.json").read_text())["embedding_cache"]).name
    with pytest.raises(InputError, match=r"training_args\.epochs: 1 -> 3"):
        check_reusable(out / "n32-k4", DataArguments(dataset=str(wiki_small)), SaeArguments(n_latents=32, k=4), TrainingArguments(epochs=3, batch_size=32), cache_name)
    assert (out / "n32-k4" / "model.safetensors").stat().st_mtime_ns == weights
    assert json.loads((out / "sweep.json").read_text())["rows"][0] == first
    # The same settings reuse it; --overwrite trains it again with the new ones.
    assert main([*base, "--epochs", "1"]) == 0
    assert "already trained, reused: n32-k4" in capsys.readouterr().out
    assert main([*base, "--epochs", "3", "--overwrite"]) == 0
    row = json.loads((out / "sweep.json").read_text())["rows"][0]
    assert row["train_samples"] == 3 * first["train_samples"] and row["steps"] > first["steps"]


def test_a_sweep_without_held_out_texts_is_refused_before_training(wiki_small, tmp_path, capsys):
    """--heldout-fraction 0 trained every point, then stopped with a TypeError formatting the
    missing held-out FVU, writing no sweep.json."""
    out = tmp_path / "sweep"
    args = ["sweep", "--dataset", str(wiki_small), "--n", "32,64", "--k", "4", "--epochs", "1", "--heldout-fraction", "0", "--out", str(out), "-q", "--report-to", "none"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--heldout-fraction 0 leaves no held-out texts" in err and err.count("\n") == 1
    assert not (out / "n32-k4").exists()


def test_an_overwrite_stopped_part_way_resumes_keeping_the_points_it_finished(wiki_small, tmp_path, capsys, training_crashes_at_step):
    """`sweep --overwrite` with new settings, stopped in its second point of three: the first point
    holds its new SAE, the second its old one beside the new run's checkpoints, the third its old
    one. `sweep --resume` with the new settings was refused, the second point's old results named
    as trained with other settings ('pass --overwrite', which trains every point again and drops the
    checkpoints); now it refuses only the third, untouched point, and `--resume --overwrite` (which
    retrained every point) keeps the first, continues the second from its checkpoints and trains
    the third again: the grid of an uninterrupted sweep with those settings."""
    from sbert_sae.trainer import list_checkpoints

    base = ["sweep", "--dataset", str(wiki_small), "--n", "32,48,64", "--k", "4", "--batch-size", "32", "--seed", "3", "-q", "--report-to", "none",
            "--checkpoint-every", "2", "--checkpoint-min-seconds", "0"]
    out = tmp_path / "sweep"
    assert main([*base, "--out", str(out), "--epochs", "1"]) == 0
    steps = json.loads((out / "n32-k4" / "metrics.json").read_text())["steps"]
    with training_crashes_at_step(2 * steps + 5):  # the 5th step of the second point, at 2 epochs
        assert main([*base, "--out", str(out), "--epochs", "2", "--overwrite"]) == 1
    assert json.loads((out / "n32-k4" / "metrics.json").read_text())["steps"] == 2 * steps
    assert json.loads((out / "n48-k4" / "metrics.json").read_text())["steps"] == steps  # the old run, kept
    assert list_checkpoints(out / "n48-k4") and not list_checkpoints(out / "n64-k4")
    finished = (out / "n32-k4" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()

    assert main([*base, "--out", str(out), "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "n64-k4 was trained with other settings than this sweep's (--epochs 1 -> 2)" in err and "with --resume as well" in err
    assert main([*base, "--out", str(out), "--epochs", "2", "--resume", "--overwrite"]) == 0
    assert "already trained, reused: n32-k4" in capsys.readouterr().out
    assert (out / "n32-k4" / "model.safetensors").stat().st_mtime_ns == finished
    assert not (out / "n48-k4" / "checkpoints").exists()
    whole = tmp_path / "whole"
    assert main([*base, "--out", str(whole), "--epochs", "2"]) == 0
    for point in ("n32-k4", "n48-k4", "n64-k4"):
        resumed, uninterrupted = (SparseAutoencoder.from_pretrained(folder / point).state_dict() for folder in (out, whole))
        assert all(torch.equal(resumed[name], uninterrupted[name]) for name in uninterrupted), point
    rows = [{k: v for k, v in row.items() if k != "train_seconds"} for row in json.loads((out / "sweep.json").read_text())["rows"]]
    assert rows == [{k: v for k, v in row.items() if k != "train_seconds"} for row in json.loads((whole / "sweep.json").read_text())["rows"]]
