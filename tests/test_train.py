"""`sbert-sae train` end to end on real Wikipedia text with the real MiniLM model."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from sbert_sae import SparseAutoencoder
from sbert_sae.cli import main
from sbert_sae.trainer import list_checkpoints

SMALL = ["--n-latents", "256", "-k", "8", "--epochs", "4", "--batch-size", "64", "-q", "--report-to", "none"]


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def trained(wiki_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "wiki"
    # Also the settings that travel from the command line to training_args.json.
    assert run_cli("train", "--dataset", wiki_small, "--out", out, *SMALL, "--lr-schedule", "wsd", "--decay-fraction", "0.3", "--decoder-lr-scale", "4", "--no-cuda-graphs") == 0
    return out


def test_output_folder_holds_a_complete_run(trained):
    for name in ("config.json", "model.safetensors", "training_args.json", "metrics.json", "density.png", "train_log.jsonl", "split.json"):
        assert (trained / name).exists(), name
    assert not (trained / "checkpoints").exists()
    metrics = json.loads((trained / "metrics.json").read_text())
    for key in ("heldout_fvu", "heldout_normalized_mse", "heldout_cosine", "heldout_l0", "dead_fraction", "dense_fraction", "neighbour_overlap_at_10", "train_fvu"):
        assert isinstance(metrics[key], float), key
    assert 0 < metrics["heldout_fvu"] < 1
    assert 0 < metrics["heldout_l0"] <= 8
    assert 0 <= metrics["neighbour_overlap_at_10"] <= 1
    assert metrics["heldout_seen_in_training"] == 0.0  # wiki_small holds no text twice
    args = json.loads((trained / "training_args.json").read_text())
    assert args["sae"]["n_latents"] == 256 and args["training"]["epochs"] == 4
    assert args["training"]["lr_schedule"] == "wsd" and args["training"]["decay_fraction"] == 0.3
    assert args["training"]["cuda_graphs"] is False and args["training"]["decoder_lr_scale"] == 4
    assert args["data"]["text_column"] == "text"
    split = json.loads((trained / "split.json").read_text())
    assert split["n_train"] + split["n_heldout"] == 240
    log = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["epoch"] == 4 and "heldout_fvu" in log[-1]


def test_a_second_run_in_one_process_may_use_another_precision(wiki_small, tmp_path):
    # Accelerate keeps its state per process: a run in bf16 after one in fp32, in one Python
    # process (a notebook, a sweep), failed with 'AcceleratorState has already been initialized'.
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        assert run_cli("train", "--dataset", wiki_small, "--out", out, *SMALL, "--epochs", "1", "--mixed-precision", precision) == 0
        assert json.loads((out / "training_args.json").read_text())["training"]["mixed_precision"] == precision


def test_trained_sae_loads_and_encodes(trained, wiki_small):
    from datasets import load_from_disk

    sae = SparseAutoencoder.from_pretrained(trained)
    assert sae.config.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert sae.config.d_in == 384
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(256), atol=1e-4)
    texts = load_from_disk(str(wiki_small))["text"][:3]
    z = sae.encode_texts(texts)
    assert z.shape == (3, 256) and ((z > 0).sum(1) <= 8).all() and ((z > 0).sum(1) > 0).all()
    # The held-out rows were never trained on: training on them too would change the model.
    split = json.loads((trained / "split.json").read_text())
    assert len(split["heldout_row_ids"]) == split["n_heldout"] > 0


def test_training_lowers_heldout_fvu(trained):
    log = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    curve = [r["heldout_fvu"] for r in log if "heldout_fvu" in r]
    assert curve[-1] < curve[0]


def test_second_run_into_the_same_folder_is_refused(trained, wiki_small, capsys):
    before = (trained / "model.safetensors").read_bytes()
    assert run_cli("train", "--dataset", wiki_small, "--out", trained, *SMALL) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "--overwrite" in err[0]
    assert (trained / "model.safetensors").read_bytes() == before


def test_an_out_that_is_a_file_is_refused_naming_it(wiki_small, tmp_path, capsys):
    # It said "FileExistsError: [Errno 17] File exists: '...'" (exit 1), as if a run were there.
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    for out, message in ((taken, f"{taken} is a file, not a folder"), (taken / "run", f"cannot make the folder {taken / 'run'}: Not a directory")):
        assert run_cli("train", "--dataset", wiki_small, "--out", out, *SMALL) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert taken.read_text() == "mine"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--text-column", "body"], "text column 'body' not in dataset; its columns are ['id', 'text', 'description', 'topic']"),
        (["--n-latents", "16", "-k", "32"], "--k=32 is larger than --n-latents=16"),  # the options, not the fields
        (["--domain-column", "topic", "--domain", "Geology"], "domain 'Geology' not found in column 'topic'"),
        (["--domain", "Arts"], "--domain needs --domain-column"),
    ],
)
def test_bad_arguments_give_one_clear_line(wiki_small, tmp_path, capsys, args, fragment):
    code = run_cli("train", "--dataset", wiki_small, "--out", tmp_path / "bad", *SMALL, *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and fragment in err[0], err


def test_missing_dataset_is_named(tmp_path, capsys):
    assert run_cli("train", "--dataset", tmp_path / "nowhere", "--out", tmp_path / "o", *SMALL) == 2
    assert "nowhere" in capsys.readouterr().err


def test_per_domain_trains_one_sae_per_domain(wiki_small, tmp_path, capsys):
    out = tmp_path / "domains"
    assert run_cli("train", "--dataset", wiki_small, "--out", out, "--domain-column", "topic", "--per-domain", *SMALL) == 0
    table = json.loads((out / "domains.json").read_text())
    assert [row["domain"] for row in table] == ["Arts", "Biology and health sciences", "Mathematics"]
    for row in table:
        folder = out / row["folder"]
        assert (folder / "model.safetensors").exists()
        assert row["n_train"] + row["n_heldout"] == 80
        assert json.loads((folder / "training_args.json").read_text())["domain"] == row["domain"]
    assert "| Mathematics | mathematics |" in (out / "domains.md").read_text()
    # Each domain starts from its own random decoder (one seed for all would make them look alike).
    seeds = {json.loads((out / row["folder"] / "training_args.json").read_text())["training"]["seed"] for row in table}
    assert len(seeds) == len(table)
    # The run's own folder holds no SAE: each command that takes an SAE said what the folder
    # lacked ("has no config.json"; search and families: "pass --dataset", which led nowhere).
    capsys.readouterr()
    for command in (["label", out, "--dataset", wiki_small], ["families", out], ["search", out, "a query"], ["info", out], ["compare", out / "arts", out]):
        assert run_cli(*command) == 2
        err = capsys.readouterr().err
        assert f"{out} holds a --per-domain run: its SAEs, one per domain, are in its sub-folders (arts, biology-and-health-sciences, mathematics): name one, e.g. {out / 'arts'}" in err, err


def test_one_domain(wiki_small, tmp_path):
    out = tmp_path / "maths"
    assert run_cli("train", "--dataset", wiki_small, "--out", out, "--domain-column", "topic", "--domain", "Mathematics", *SMALL) == 0
    assert json.loads((out / "split.json").read_text())["n_train"] + json.loads((out / "split.json").read_text())["n_heldout"] == 80


def test_interrupted_run_resumes_to_the_same_model(wiki_small, tmp_path, training_crashes_at_step):
    """A run that dies mid-training, resumed with --resume, ends bitwise equal to one that did not."""
    common = ["train", "--dataset", wiki_small, *SMALL, "--checkpoint-every", "5", "--checkpoint-min-seconds", "0", "--seed", "3"]
    assert run_cli(*common, "--out", tmp_path / "whole") == 0

    with training_crashes_at_step(12):
        assert run_cli(*common, "--out", tmp_path / "broken") == 1
    checkpoints = sorted(p.name for p in (tmp_path / "broken" / "checkpoints").iterdir())
    assert checkpoints == ["step-000000005", "step-000000010"]
    assert not (tmp_path / "broken" / "model.safetensors").exists()

    # Changed settings are refused, the checkpoint is kept.
    assert run_cli(*common[:-2], "--seed", "4", "--checkpoint-every", "5", "--checkpoint-min-seconds", "0", "--out", tmp_path / "broken", "--resume") == 2
    assert run_cli(*common, "--out", tmp_path / "broken", "--resume") == 0
    whole = SparseAutoencoder.from_pretrained(tmp_path / "whole").state_dict()
    resumed = SparseAutoencoder.from_pretrained(tmp_path / "broken").state_dict()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def _fp16_scaling_accelerator(args, out):
    """The Accelerator an fp16 run gets on a GPU, on this CPU: Accelerate gives fp16 on a CPU
    no loss scaling (its `scaler` is None, no autocast), so the test hands it a real CPU
    `GradScaler` and turns on its fp16 autocast; backward, the optimiser step and clipping then
    go through the scaler as they do on a GPU. A huge initial scale makes the first steps
    overflow (skipped, scale backed off) and a short growth interval makes it grow again."""
    from sbert_sae.trainer import make_accelerator

    accelerator = make_accelerator(args, out, device="cpu")
    assert accelerator.mixed_precision == "fp16" and accelerator.scaler is None
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30, growth_interval=4)
    accelerator.native_amp = True
    return accelerator


def test_an_interrupted_fp16_run_resumes_with_its_loss_scale(tmp_path, training_crashes_at_step, caplog):
    """The fp16 loss scale and its growth count were not in checkpoints: a resumed run started
    again at the initial scale, skipped steps the uninterrupted run took, and ended elsewhere.
    They are now in state.json (JSON, no pickle), restored on resume; a checkpoint without
    them (an older fp16 run) still resumes, saying the scale starts again."""
    from sbert_sae import SparseAutoencoderConfig
    from sbert_sae.trainer import TrainingArguments, train

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(300, 16)) * rng.uniform(0.1, 3, size=16)).astype(np.float32)
    args = TrainingArguments(epochs=4, batch_size=32, report_to="none", show_progress=False, checkpoint_every=5, checkpoint_min_seconds=0, mixed_precision="fp16", grad_clip=0.5, seed=3)

    def run(out, resume=False):
        accelerator = _fp16_scaling_accelerator(args, out)
        result = train(SparseAutoencoderConfig(d_in=16, n_latents=64, k=4), args, x, np.arange(20, 300), np.arange(20), out, resume=resume, accelerator=accelerator)
        return result, accelerator.scaler.state_dict()

    whole, whole_scaler = run(tmp_path / "whole")
    assert whole_scaler["scale"] < 2.0**30, "no step overflowed: loss scaling was not exercised"
    with training_crashes_at_step(20), pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "broken")
    saved = json.loads((tmp_path / "broken" / "checkpoints" / "step-000000015" / "state.json").read_text())
    assert saved["grad_scaler"]["scale"] < 2.0**30 and saved["grad_scaler"]["growth_interval"] == 4
    shutil.copytree(tmp_path / "broken", tmp_path / "old")

    resumed, resumed_scaler = run(tmp_path / "broken", resume=True)
    assert resumed_scaler == whole_scaler
    for name, tensor in whole.sae.state_dict().items():
        assert torch.equal(tensor, resumed.sae.state_dict()[name]), name

    # A checkpoint written before the scale was saved resumes, from the initial scale.
    for path in (tmp_path / "old" / "checkpoints").iterdir():
        state = json.loads((path / "state.json").read_text())
        del state["grad_scaler"]
        (path / "state.json").write_text(json.dumps(state))
    with caplog.at_level("WARNING", logger="sbert_sae.trainer"):
        old, _ = run(tmp_path / "old", resume=True)
    assert old.steps == whole.steps
    assert "holds no fp16 loss scale: the loss scale starts again at 1.07374e+09" in caplog.text


def test_a_resume_that_is_refused_is_refused_before_any_embedding(wiki_small, tmp_path, capsys, training_crashes_at_step):
    """--resume into checkpoints of other settings, or into a finished run, embedded the whole
    dataset and only then refused: both are now refused before the texts are embedded (nothing
    is written to a fresh cache), and a resume that is not refused still continues."""
    common = ["train", "--dataset", wiki_small, *SMALL, "--checkpoint-every", "5", "--checkpoint-min-seconds", "0", "--max-rows", "120"]
    with training_crashes_at_step(7):
        assert run_cli(*common, "--out", tmp_path / "broken") == 1
    assert [p.name for p in (tmp_path / "broken" / "checkpoints").iterdir()] == ["step-000000005"]
    assert run_cli(*common, "--out", tmp_path / "done") == 0
    capsys.readouterr()

    fresh = tmp_path / "fresh-cache"
    for out, extra, fragment in (
        # Named by the option typed, not by the key the run records (training_args.seed).
        ("broken", ["--seed", "4"], "; --seed 0 -> 4)"),  # after the training texts, which the seed's held-out split changes
        ("broken", ["--n-latents", "128"], "the run's settings changed (--n-latents 256 -> 128)"),
        # k_aux follows k when not given: named as such, not as an option typed.
        ("broken", ["-k", "4"], "the run's settings changed (--k 8 -> 4; --k-aux (not given: 2k) 16 -> 8)"),
        ("done", [], "holds a finished run: nothing to resume"),
    ):
        assert run_cli(*common, *extra, "--out", tmp_path / out, "--resume", "--cache-dir", fresh) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
        assert not fresh.exists(), f"--resume {extra} embedded before it was refused"
    # The Python API names the settings as its caller wrote them: the fields.
    from sbert_sae.errors import SettingsChangedError
    from sbert_sae.pipeline import DataArguments, SaeArguments, run_training
    from sbert_sae.trainer import TrainingArguments

    with pytest.raises(SettingsChangedError, match=r"training_args\.seed: 0 -> 4") as refused:
        run_training(DataArguments(dataset=str(wiki_small), max_rows=120, cache_dir=str(fresh)), SaeArguments(n_latents=256, k=8), TrainingArguments(seed=4, report_to="none"), tmp_path / "broken", resume=True)
    assert "--seed" not in str(refused.value) and ("training_args.seed", 0, 4) in refused.value.changes
    assert run_cli(*common, "--out", tmp_path / "broken", "--resume", "--cache-dir", fresh) == 0
    assert (tmp_path / "broken" / "model.safetensors").exists() and (fresh / "embeddings").is_dir()


def test_a_per_domain_run_stopped_part_way_resumes_keeping_the_domains_it_finished(wiki_small, tmp_path, capsys, training_crashes_at_step):
    """--per-domain --resume after a crash in the second domain refused the first domain's
    finished folder ('nothing to resume'), so such a run could only start again: the finished
    domains are now kept (when trained with these settings and data), the rest resume."""
    out = tmp_path / "domains"
    common = ["train", "--dataset", wiki_small, "--out", out, "--domain-column", "topic", "--per-domain", *SMALL, "--checkpoint-every", "2", "--checkpoint-min-seconds", "0"]
    with training_crashes_at_step(13):  # 8 steps a domain
        assert run_cli(*common) == 1
    arts, biology, maths = out / "arts", out / "biology-and-health-sciences", out / "mathematics"
    assert (arts / "metrics.json").exists() and (biology / "checkpoints").is_dir() and not (maths / "model.safetensors").exists()
    kept = (arts / "model.safetensors").read_bytes()
    capsys.readouterr()

    fresh = tmp_path / "fresh-cache"
    assert run_cli(*common, "--resume", "--seed", "3", "--cache-dir", fresh) == 2  # other settings: refused, before embedding
    err = capsys.readouterr().err
    # The seed the user gave for the whole run (each domain records its own, derived from it).
    assert f"cannot keep the finished run in {arts}" in err and "; --seed 0 -> 3)" in err and not fresh.exists()

    assert run_cli(*common, "--resume") == 0
    assert (arts / "model.safetensors").read_bytes() == kept
    table = json.loads((out / "domains.json").read_text())
    assert [row["domain"] for row in table] == ["Arts", "Biology and health sciences", "Mathematics"]
    assert all(row["heldout_fvu"] is not None for row in table)
    assert (biology / "model.safetensors").exists() and (maths / "model.safetensors").exists()
    assert not (biology / "checkpoints").exists()

    # a finished run that does not record its settings cannot be vouched for
    doc = json.loads((arts / "training_args.json").read_text())
    del doc["run_signature"]
    (arts / "training_args.json").write_text(json.dumps(doc))
    assert run_cli(*common, "--resume") == 2
    assert "settings are not recorded" in capsys.readouterr().err


def test_a_per_domain_overwrite_stopped_part_way_finishes_with_resume_and_overwrite(wiki_small, tmp_path, capsys, training_crashes_at_step):
    """A --per-domain --overwrite with another seed, stopped in its second domain: the first domain
    holds its new SAE, the second its old one beside the new run's checkpoints, the third its old
    one. --resume refuses the third (other settings), and --overwrite alone trains every domain
    again; --resume --overwrite refused it too, so the stopped run's work could not be kept. It now
    keeps the first, continues the second and trains the third again, to the SAEs of an
    uninterrupted run."""
    out, whole = tmp_path / "domains", tmp_path / "whole"
    common = ["train", "--dataset", wiki_small, "--domain-column", "topic", "--per-domain", *SMALL, "--checkpoint-every", "2", "--checkpoint-min-seconds", "0"]
    assert run_cli(*common, "--out", out) == 0
    with training_crashes_at_step(13):  # 8 steps a domain
        assert run_cli(*common, "--out", out, "--overwrite", "--seed", "3") == 1
    arts, biology, maths = out / "arts", out / "biology-and-health-sciences", out / "mathematics"
    assert list_checkpoints(biology) and not list_checkpoints(maths)
    kept = (arts / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert run_cli(*common, "--out", out, "--resume", "--seed", "3") == 2
    err = capsys.readouterr().err
    assert f"cannot keep the finished run in {maths}" in err and "--seed 0 -> 3)" in err and "--overwrite with --resume" in err

    assert run_cli(*common, "--out", out, "--resume", "--overwrite", "--seed", "3") == 0
    assert (arts / "model.safetensors").read_bytes() == kept
    assert not list_checkpoints(biology)
    assert run_cli(*common, "--out", whole, "--seed", "3") == 0
    for name in ("arts", "biology-and-health-sciences", "mathematics"):
        resumed, uninterrupted = (SparseAutoencoder.from_pretrained(folder / name).state_dict() for folder in (out, whole))
        assert all(torch.equal(resumed[key], uninterrupted[key]) for key in uninterrupted), name


def test_console_script_and_module_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sbert_sae", "--help"], capture_output=True, text=True, check=True)
    assert "train" in result.stdout and "embed" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "sbert_sae", "train", "--dataset", "x", "--out", str(tmp_path), "-k", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "expected a positive integer, got '0'" in bad.stderr


def _mpirun_env(tmp_path) -> dict:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = {**os.environ, "MPIRUN_HOSTFILE": str(hostfile)}
    if os.geteuid() == 0:  # Open MPI refuses root unless told
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


@pytest.mark.parametrize("launcher", ["--cpu", "--cpu with mpirun", "--multi_gpu", "--cpu reporting to tensorboard"])
def test_accelerate_launch_two_processes_matches_one(wiki_small, tmp_path, launcher, accelerate_launch_two):
    """Data-parallel training over 2 CPU processes (gloo) reaches the quality of one process.

    accelerate's `--cpu` launcher starts several processes through mpirun only (with
    `--mpirun_hostfile`; accelerate/commands/launch.py's simple_launcher runs one `Popen`
    otherwise): without a hostfile sbert-sae reads `--num_processes` from the launcher and
    starts the processes itself with torchrun (sbert_sae/launch.py). With a hostfile it
    needs Open MPI (.ci/run installs it). `--multi_gpu` starts them with torchrun, which on
    a machine without GPUs runs CPU processes over gloo.

    Batches of 57 leave each epoch's last batch one row (229 training texts): the second
    process' share of it is empty, which crashed the run ('embeddings is an empty batch').
    """
    flag = launcher.split()[0]
    launch = accelerate_launch_two(flag)
    env = dict(os.environ)
    if launcher == "--cpu with mpirun":
        if shutil.which("mpirun") is None:
            pytest.skip("accelerate launch --cpu --mpirun_hostfile needs Open MPI, which is not installed")
        env = _mpirun_env(tmp_path)
        launch += ["--mpirun_hostfile", env["MPIRUN_HOSTFILE"]]
    args = ["train", "--dataset", str(wiki_small), *SMALL, "--epochs", "8", "--seed", "1", "--batch-size", "57"]
    assert run_cli(*args, "--out", tmp_path / "one") == 0
    assert json.loads((tmp_path / "one" / "split.json").read_text())["n_train"] % 57 == 1
    if launcher.endswith("tensorboard"):
        # accelerate's end_training destroyed the process group while the processes had yet
        # to meet again: "Default process group has not been initialized"
        pytest.importorskip("tensorboard")  # in the test extras: runs in CI
        args += ["--report-to", "tensorboard"]
    result = subprocess.run([*launch, "-m", "sbert_sae", *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600, env=env)
    # torchrun's summary of a failed child names its signal only: the child's own last lines
    # (an abort's message) come before it.
    assert result.returncode == 0, "\n".join(line for line in result.stderr.splitlines() if "it/s]" not in line)[-8000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert json.loads((tmp_path / "two" / "training_args.json").read_text())["num_processes"] == 2
    assert abs(two["heldout_fvu"] - one["heldout_fvu"]) / one["heldout_fvu"] < 0.02
    assert result.stdout.count("results:") == 1  # only the main process reports and writes
    if launcher.endswith("tensorboard"):
        assert list((tmp_path / "two" / "logs").rglob("events.out.tfevents.*"))


_REPORT_AFTER_THE_COMMAND = """
import os, sys
import torch.distributed as dist
from sbert_sae.cli import main

code = main()  # `sbert-sae ARGS`, as the program runs it
tasks = "/proc/self/task"
workers = sum(open(f"{tasks}/{t}/comm").read().strip() == "pt_gloo_runloop" for t in os.listdir(tasks))
print(f"rank {os.environ['RANK']}: group open {dist.is_initialized()}, gloo worker threads {workers}", file=sys.stderr)
sys.exit(code)
"""


def test_two_process_training_closes_its_process_group_before_python_exits(wiki_small, tmp_path, accelerate_launch_two):
    """Each process of a run over 2 CPU processes (gloo) closes its process group, and so joins
    the group's worker threads, before Python shuts down.

    Left open, a worker thread that has yet to let go of a finished collective's tensor (the
    firing counts each step sums over the processes) takes the GIL as Python shuts down, and
    the process aborts: 'terminate called without an active exception', SIGABRT (seen once in
    CI under load, in test_accelerate_launch_two_processes_matches_one[--multi_gpu])."""
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("counts the processes' threads through /proc")
    program = tmp_path / "sbert_sae_then_report.py"
    program.write_text(_REPORT_AFTER_THE_COMMAND)
    launch = accelerate_launch_two("--multi_gpu")
    args = ["train", "--dataset", str(wiki_small), *SMALL, "--epochs", "1", "--out", str(tmp_path / "two")]
    result = subprocess.run([*launch, str(program), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, "\n".join(line for line in result.stderr.splitlines() if "it/s]" not in line)[-8000:]
    reports = sorted(line for line in result.stderr.splitlines() if "gloo worker threads" in line)
    assert reports == ["rank 0: group open False, gloo worker threads 0", "rank 1: group open False, gloo worker threads 0"]


def test_a_two_process_per_domain_run_warns_of_its_domains_once(wiki_small, tmp_path, accelerate_launch_two):
    """The checks before training run on every process of a launched run, and each process said
    their warnings: a domain too small to train, one whose texts are all one text, one with too
    few held-out texts, each printed once per process. The main process alone says them now."""
    from datasets import Dataset, load_from_disk

    texts = load_from_disk(str(wiki_small)).select(range(60))["text"]
    rows = [{"text": t, "field": "real"} for t in texts] + [{"text": "No description available.", "field": "boiler"}] * 6 + [{"text": texts[0], "field": "tiny"}]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "data"))
    args = ["train", "--dataset", str(tmp_path / "data"), "--domain-column", "field", "--per-domain", "--out", str(tmp_path / "two")]
    args += ["--n-latents", "64", "-k", "8", "--epochs", "1", "--batch-size", "32", "-q", "--report-to", "none"]
    result = subprocess.run([*accelerate_launch_two("--cpu"), "-m", "sbert_sae", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, "\n".join(line for line in result.stderr.splitlines() if "it/s]" not in line)[-8000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING sbert_sae.pipeline")]
    assert sum("'tiny' has only 1 texts: skipped" in w for w in warnings) == 1, warnings
    assert sum("domain 'boiler' (column 'field') are the same text" in w for w in warnings) == 1, warnings
    assert sum("domain 'real' has 60 texts: its held-out figures will rest on" in w for w in warnings) == 1, warnings


def test_cpu_launcher_arguments_are_read_from_the_parent_command_line(tmp_path):
    from sbert_sae.launch import launcher_arguments, requested_processes, started_alone_by_cpu_launcher

    assert started_alone_by_cpu_launcher({"ACCELERATE_USE_CPU": "True", "MASTER_PORT": "29500"})
    assert not started_alone_by_cpu_launcher({"ACCELERATE_USE_CPU": "True", "MASTER_PORT": "29500", "WORLD_SIZE": "2"})
    assert not started_alone_by_cpu_launcher({"ACCELERATE_USE_CPU": "False", "MASTER_PORT": "29500"})
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "launch", "--cpu", "--num_processes", "3", "-m", "sbert_sae", "train"])
    try:
        assert launcher_arguments(child.pid) is None  # "launch" only counts after an accelerate program
    finally:
        child.kill()
    assert requested_processes(["--cpu", "--num_processes", "3", "-m", "sbert_sae", "train", "--out", "x"]) == (3, 1)
    assert requested_processes(["--cpu", "--num_processes", "4", "--num_machines", "2", "script.py"]) == (4, 2)
    assert requested_processes(["--cpu", "--config_file", str(tmp_path / "none.yaml"), "script.py"]) == (1, 1)
    config = tmp_path / "accelerate.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\nnum_machines: 1\nuse_cpu: true\n")
    assert requested_processes(["--config_file", str(config), "script.py"]) == (2, 1)


def test_trainer_refuses_nan_embeddings_naming_the_rows(tmp_path):
    from sbert_sae import InputError, SparseAutoencoderConfig
    from sbert_sae.trainer import TrainingArguments, train

    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    x[7, 3] = np.nan
    x[21, 0] = np.inf
    row_ids = np.arange(100, 150)
    with pytest.raises(InputError, match=r"rows \[107, 121\] contain NaN or inf"):
        train(SparseAutoencoderConfig(d_in=8, n_latents=16, k=2), TrainingArguments(epochs=1, report_to="none", show_progress=False), x, np.arange(50), np.arange(0), tmp_path, row_ids=row_ids)
    with pytest.raises(Exception, match="d_in=16"):
        train(SparseAutoencoderConfig(d_in=16, n_latents=16, k=2), TrainingArguments(epochs=1, report_to="none", show_progress=False), x, np.arange(50), np.arange(0), tmp_path)


def test_trainer_refuses_nan_in_a_heldout_row_before_training(tmp_path):
    # Only the training rows were checked: a NaN in a held-out row trained the whole run, then
    # its evaluation failed with "values contain NaN or inf", naming no row.
    from sbert_sae import InputError, SparseAutoencoderConfig
    from sbert_sae.trainer import TrainingArguments, train

    x = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    x[55, 2] = np.nan
    with pytest.raises(InputError, match=r"rows \[155\] contain NaN or inf"):
        train(SparseAutoencoderConfig(d_in=8, n_latents=16, k=2), TrainingArguments(epochs=1, report_to="none", show_progress=False), x, np.arange(50), np.arange(50, 60), tmp_path, row_ids=np.arange(100, 160))
    assert not (tmp_path / "train_log.jsonl").exists()


def test_embeddings_too_short_for_the_learning_rate_are_refused_where_read_as_they_are(tmp_path):
    # With normalize="none", Adam's steps of about lr overshoot short vectors: embeddings of
    # norm 1e-3 trained to a held-out FVU of 2,273 (unit vectors: 0.78) without a word.
    from sbert_sae import InputError, SparseAutoencoderConfig
    from sbert_sae.trainer import TrainingArguments, train

    x = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    x *= 1e-3 / np.linalg.norm(x, axis=1, keepdims=True)
    args = TrainingArguments(epochs=1, batch_size=16, report_to="none", show_progress=False, checkpoint_every=0)
    with pytest.raises(InputError, match=r"median norm is 0\.001: .*normalize='none'.* at lr=0\.003.*normalize='l2'"):
        train(SparseAutoencoderConfig(d_in=8, n_latents=16, k=2, normalize="none"), args, x, np.arange(50), np.arange(50, 60), tmp_path / "none")
    # Read at unit length, or at a learning rate small enough for them, they train.
    train(SparseAutoencoderConfig(d_in=8, n_latents=16, k=2), args, x, np.arange(50), np.arange(50, 60), tmp_path / "l2")
    small_lr = TrainingArguments(epochs=1, batch_size=16, lr=1e-5, report_to="none", show_progress=False, checkpoint_every=0)
    train(SparseAutoencoderConfig(d_in=8, n_latents=16, k=2, normalize="none"), small_lr, x, np.arange(50), np.arange(50, 60), tmp_path / "small-lr")


def test_unit_length_embeddings_read_as_they_are_are_not_refused_at_a_high_learning_rate(tmp_path):
    # The shortest norm was 30 x lr however large lr: at lr 0.05, unit vectors with
    # normalize='none' were refused and told to use normalize='l2', which reads the very same
    # unit vectors and is not checked. Unit length is always long enough; shorter is not.
    from sbert_sae import InputError, SparseAutoencoderConfig
    from sbert_sae.trainer import TrainingArguments, train

    x = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    args = TrainingArguments(epochs=1, batch_size=16, lr=0.05, report_to="none", show_progress=False, checkpoint_every=0)
    config = SparseAutoencoderConfig(d_in=8, n_latents=16, k=2, normalize="none")
    train(config, args, x, np.arange(50), np.arange(50, 60), tmp_path / "unit")  # trained, not refused
    train(config, args, x * np.float32(1 - 1e-6), np.arange(50), np.arange(50, 60), tmp_path / "rounded")  # unit but for rounding
    with pytest.raises(InputError, match=r"median norm is 0\.5: .* at least 0\.99 \(30 x lr, at most about unit length\)"):
        train(config, args, x / 2, np.arange(50), np.arange(50, 60), tmp_path / "half")


def test_an_epochs_last_batch_of_a_few_rows_is_left_out_and_the_quick_starts_is_kept(tmp_path):
    # Adam took a full step on an epoch's last few rows: 8,197 rows at batch 4,096 made a
    # 5-row step every epoch (held-out FVU 0.4268 against 0.4017 without it).
    from sbert_sae import SparseAutoencoderConfig
    from sbert_sae.trainer import TrainingArguments, batches_per_epoch, train

    assert batches_per_epoch(8197, 4096) == 2 and batches_per_epoch(8192, 4096) == 2
    assert batches_per_epoch(9491, 256) == 38  # the quick start: 37 full batches and 19 rows, as before
    assert batches_per_epoch(8448, 4096) == 3 and batches_per_epoch(8447, 4096) == 2  # the cut: 1/16 of a batch
    assert batches_per_epoch(100, 4096) == 1  # fewer rows than a batch: one batch of all
    x = np.random.default_rng(0).normal(size=(75, 8)).astype(np.float32)
    args = TrainingArguments(epochs=3, batch_size=32, report_to="none", show_progress=False, checkpoint_every=0, log_every=1)
    result = train(SparseAutoencoderConfig(d_in=8, n_latents=16, k=2), args, x, np.arange(65), np.arange(65, 75), tmp_path)
    assert result.steps == 6  # 65 rows: two batches of 32 an epoch; the 1-row rest is left out
    assert [r["epoch"] for r in result.history] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]


def test_a_run_checkpointed_before_short_last_batches_were_left_out_resumes_as_it_began(tmp_path, monkeypatch, training_crashes_at_step):
    # Checkpoints keep no count of steps per epoch: one written when an epoch's 1-row rest was
    # still a step (65 rows at batch 32: 3 steps an epoch, 9 in all) was resumed with 2 an
    # epoch, its step 4 read as epoch 2's, and the run ended at step 6 on another schedule.
    import math

    from sbert_sae import SparseAutoencoderConfig, trainer

    x = np.random.default_rng(0).normal(size=(75, 8)).astype(np.float32)
    args = trainer.TrainingArguments(epochs=3, batch_size=32, report_to="none", show_progress=False, checkpoint_every=2, checkpoint_min_seconds=0)

    def run(out, resume=False):
        return trainer.train(SparseAutoencoderConfig(d_in=8, n_latents=16, k=2), args, x, np.arange(65), np.arange(65, 75), out, resume=resume)

    today = trainer.batches_per_epoch
    monkeypatch.setattr(trainer, "batches_per_epoch", lambda n, b: math.ceil(n / b))  # the earlier versions' count
    whole = run(tmp_path / "whole")
    with training_crashes_at_step(5), pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "old")
    monkeypatch.setattr(trainer, "batches_per_epoch", today)
    resumed = run(tmp_path / "old", resume=True)
    assert whole.steps == resumed.steps == 9
    assert [r["epoch"] for r in resumed.history] == [2.0, 3.0]
    for name, tensor in whole.sae.state_dict().items():
        assert torch.equal(tensor, resumed.sae.state_dict()[name]), name
    # A run started today takes today's steps.
    assert run(tmp_path / "new").steps == 6


def test_a_folder_in_use_is_refused(tmp_path):
    from sbert_sae import OutputDirError
    from sbert_sae.utils import run_lock

    with run_lock(tmp_path):
        with pytest.raises(OutputDirError, match="in use by another run"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released after the run
        pass
    (tmp_path / ".lock").write_text("999999999")  # left by a killed run: taken over
    with run_lock(tmp_path):
        pass
    (tmp_path / ".lock").write_text(f"999999999@{socket.gethostname()}")
    with run_lock(tmp_path) as lock:
        assert lock.read_text() == f"{os.getpid()}@{socket.gethostname()}"
    # A run on another machine sharing the folder: its pid means nothing here, so it was
    # judged dead and its lock taken over, two runs then writing one folder.
    (tmp_path / ".lock").write_text("999999999@another-node")
    with pytest.raises(OutputDirError, match=r"in use by another run \(pid 999999999 on another-node; .* delete .*\.lock"):
        with run_lock(tmp_path):
            pass
    assert (tmp_path / ".lock").read_text() == "999999999@another-node"


def test_embed_and_info_commands(wiki_small, trained, capsys):
    assert run_cli("embed", "--dataset", wiki_small, "-q") == 0
    out = capsys.readouterr().out
    assert "240 embeddings of dim 384 in" in out
    assert run_cli("info", trained) == 0
    out = capsys.readouterr().out
    assert '"model_type": "sbert_sae"' in out and '"heldout_fvu"' in out


def test_streaming_from_the_memory_map_trains_the_same_model(tmp_path):
    """Rows gathered batch by batch from the on-disk cache give the model that rows held in memory give."""
    from sbert_sae import SparseAutoencoderConfig
    from sbert_sae.trainer import TrainingArguments, train

    x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    np.save(tmp_path / "emb.npy", x)
    mapped = np.load(tmp_path / "emb.npy", mmap_mode="r")
    args = TrainingArguments(epochs=3, batch_size=32, report_to="none", show_progress=False, checkpoint_every=0)
    models = []
    for resident in (True, False):
        config = SparseAutoencoderConfig(d_in=16, n_latents=64, k=4)
        result = train(config, args, mapped, np.arange(20, 300), np.arange(20), tmp_path / str(resident), resident=resident)
        models.append(result.sae.state_dict())
    for name in models[0]:
        assert torch.equal(models[0][name], models[1][name]), name


def _train_plain_and_graphed(tmp_path, monkeypatch, graphed_setup=None):
    """The same small run (AuxK exercised: a short dead threshold) through the plain loop and
    through `GraphedSteps`; `graphed_setup` patches the latter before it trains."""
    import sbert_sae.trainer as trainer
    from sbert_sae import SparseAutoencoderConfig
    from sbert_sae.trainer import TrainingArguments, train

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(300, 16)) * rng.uniform(0.1, 3, size=16)).astype(np.float32)
    args = TrainingArguments(epochs=4, batch_size=32, report_to="none", show_progress=False, checkpoint_every=0, log_every=3, grad_clip=0.05)
    results = []
    for graphed in (False, True):
        monkeypatch.setattr(trainer, "_use_graphed_steps", lambda *a, graphed=graphed: graphed)
        if graphed and graphed_setup is not None:
            graphed_setup()
        config = SparseAutoencoderConfig(d_in=16, n_latents=64, k=4, dead_threshold=64)
        results.append(train(config, args, x, np.arange(20, 300), np.arange(20), tmp_path / str(graphed)))
    return results


def _assert_same_training(plain, graphed_run):
    for name, tensor in plain.sae.state_dict().items():
        torch.testing.assert_close(tensor, graphed_run.sae.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)
    assert len(plain.history) == len(graphed_run.history) > 10
    for a, b in zip(plain.history, graphed_run.history):
        assert a.keys() == b.keys()
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


def test_graphed_step_body_trains_the_model_the_plain_loop_trains(tmp_path, monkeypatch):
    """On a GPU full batches replay a captured graph of `GraphedSteps.body`; run eagerly here
    (no capture on a CPU), that body trains the plain loop's model: gradients, projection,
    clipping, AuxK over padded dead ids, firing statistics and logs alike (equal up to the
    order in which AuxK's top-k returns its columns, hence rounding)."""
    plain, graphed_run = _train_plain_and_graphed(tmp_path, monkeypatch)
    assert any(r["auxk_loss"] > 0 for r in plain.history), "no feature died: AuxK was not exercised"
    assert all(p.grad is None for p in graphed_run.sae.parameters())  # the persistent gradients are freed
    _assert_same_training(plain, graphed_run)


def test_replayed_steps_read_the_buffers_they_were_captured_with(tmp_path, monkeypatch):
    """What a CUDA graph does, played on a CPU: a capture records the body on its input and
    dead-id buffers, and each replay reruns it on whatever those buffers hold then, writing into
    the outputs the capture returned. With one graph per (AuxK width, batch length) the run
    trains the plain loop's model, full batches and each epoch's shorter last one alike."""
    import sbert_sae.trainer as trainer
    from sbert_sae.trainer import GraphedSteps

    class Replay:
        def __init__(self, steps, x, dead, batch_rows, out):
            self.run = lambda: steps.body(x, dead, batch_rows)
            self.out = out

        def replay(self):
            for name, value in self.run().items():
                self.out[name].copy_(value)

    captured = []

    def capture(self, x, dead, batch_rows):
        out = self.body(x, dead, batch_rows, record=False)  # what capture records; it counts nothing
        captured.append((0 if dead is None else len(dead), len(x)))
        return Replay(self, x, dead, batch_rows, out), out

    def replayed():
        monkeypatch.setattr(trainer, "GraphedSteps", lambda *a, **kw: GraphedSteps(*a, **{**kw, "capture": True}))
        monkeypatch.setattr(GraphedSteps, "_capture", capture)

    plain, graphed_run = _train_plain_and_graphed(tmp_path, monkeypatch, replayed)
    # 280 rows in batches of 32: eight full ones and a last one of 24, each with and without AuxK.
    assert sorted(captured) == [(0, 24), (0, 32), (64, 24), (64, 32)]
    _assert_same_training(plain, graphed_run)


def test_the_decoder_steps_at_decoder_lr_scale_times_the_learning_rate(tmp_path, monkeypatch):
    import sbert_sae.trainer as trainer
    from sbert_sae import SparseAutoencoderConfig
    from sbert_sae.trainer import TrainingArguments, train

    seen = []
    real_step = torch.optim.Adam.step

    def step(self, *a, **kw):
        seen.append([(group["lr"], list(group["params"])) for group in self.param_groups])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    x = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    args = TrainingArguments(epochs=2, batch_size=50, lr=1e-3, decoder_lr_scale=5.0, lr_schedule="cosine", warmup_fraction=0.25, report_to="none", show_progress=False, checkpoint_every=0)
    sae = train(SparseAutoencoderConfig(d_in=16, n_latents=32, k=4), args, x, np.arange(200), np.arange(0), tmp_path).sae
    assert len(seen) == 8
    for step_index, groups in enumerate(seen):
        rate = trainer.learning_rate(step_index, 8, args)
        for lr, params in groups:
            decoder = any(p is sae.W_dec for p in params)
            assert lr == pytest.approx(rate * (5.0 if decoder else 1.0))
        named = sorted(name for name, p in sae.named_parameters() for _, params in groups if any(p is q for q in params))
        assert named == sorted(name for name, _ in sae.named_parameters())  # each parameter in one group
    assert [any(p is sae.W_dec for p in params) for _, params in seen[0]] == [False, True]


def test_auxk_width_is_a_power_of_two_that_holds_the_dead():
    from sbert_sae.trainer import auxk_width

    assert auxk_width(0, 6144) == 0
    assert auxk_width(1, 6144) == 256
    assert auxk_width(257, 6144) == 512
    assert auxk_width(4096, 6144) == 4096
    assert auxk_width(4097, 6144) == 6144
    assert all(auxk_width(n, 1000) >= n for n in range(1001))


def test_learning_rate_schedules():
    from sbert_sae import ConfigError
    from sbert_sae.trainer import TrainingArguments, learning_rate

    total = 100
    wsd = TrainingArguments(lr=1.0, lr_schedule="wsd", warmup_fraction=0.1, decay_fraction=0.2)
    rates = [learning_rate(s, total, wsd) for s in range(total)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == 1.0  # warm-up over 10 steps
    assert all(r == 1.0 for r in rates[10:80])  # stable
    assert rates[80] == 1.0 and rates[90] == pytest.approx(0.5) and rates[99] == pytest.approx(0.05)  # linear to 0
    cosine = TrainingArguments(lr=1.0, lr_schedule="cosine", warmup_fraction=0.0)
    assert learning_rate(0, total, cosine) == 1.0 and learning_rate(50, total, cosine) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="decay_fraction"):
        TrainingArguments(lr_schedule="wsd", warmup_fraction=0.5, decay_fraction=0.6).validate()


def test_a_failed_graph_capture_falls_back_to_the_eager_step(tmp_path, monkeypatch, caplog):
    """Where a torch or driver version cannot capture the step, training goes on eagerly,
    from the step whose capture failed, to the model the plain loop trains."""
    import sbert_sae.trainer as trainer
    from sbert_sae import SparseAutoencoderConfig
    from sbert_sae.trainer import GraphedSteps, TrainingArguments, train

    x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    args = TrainingArguments(epochs=2, batch_size=32, report_to="none", show_progress=False, checkpoint_every=0)
    made = []

    def graphed_steps(*a, **kw):
        steps = GraphedSteps(*a, **{**kw, "capture": True})
        made.append(steps)
        return steps

    def refuse(self, x, dead, batch_rows):
        raise RuntimeError("operation not permitted when stream is capturing")

    runs = []
    for graphed in (False, True):
        monkeypatch.setattr(trainer, "_use_graphed_steps", lambda *a, graphed=graphed: graphed)
        monkeypatch.setattr(trainer, "GraphedSteps", graphed_steps)
        monkeypatch.setattr(GraphedSteps, "_capture", refuse)
        config = SparseAutoencoderConfig(d_in=16, n_latents=64, k=4)
        with caplog.at_level("WARNING", logger="sbert_sae.trainer"):
            runs.append(train(config, args, x, np.arange(20, 300), np.arange(20), tmp_path / str(graphed)))
    assert len(made) == 1 and made[0].capture is False
    assert "training goes on without graphs" in caplog.text
    for name, tensor in runs[0].sae.state_dict().items():
        torch.testing.assert_close(tensor, runs[1].sae.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)


def test_heldout_fvu_of_a_single_heldout_text_is_finite_and_matches_the_log(wiki_small, tmp_path):
    # A small domain gets one held-out text; it has no variance around its own mean, so its
    # FVU is normalised by its squared norm, as the training log's held-out FVU is (it was 1e30).
    out = tmp_path / "one-heldout"
    assert run_cli("train", "--dataset", wiki_small, "--out", out, "--domain-column", "topic", "--domain", "Mathematics", "--heldout-fraction", "0.01", *SMALL) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_heldout"] == 1
    assert 0 < metrics["heldout_fvu"] < 10
    assert metrics["heldout_fvu"] == pytest.approx(metrics["heldout_normalized_mse"], rel=1e-5)
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert metrics["heldout_fvu"] == pytest.approx([r for r in logged if "heldout_fvu" in r][-1]["heldout_fvu"], rel=1e-4)


def test_a_run_without_heldout_texts_reports_its_training_figures_not_nan(wiki_small, tmp_path, capsys):
    out = tmp_path / "no-heldout"
    assert run_cli("train", "--dataset", wiki_small, "--out", out, "--domain-column", "topic", "--domain", "Mathematics", "--heldout-fraction", "0", *SMALL) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("[Mathematics]"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_heldout"] == 0 and 0 < metrics["train_fvu"] < 1
    assert "no held-out texts (--heldout-fraction 0)" in line and f"training FVU {metrics['train_fvu']:.4f}" in line and "nan" not in line


def test_per_domain_gives_domains_whose_names_slugify_alike_their_own_folders(wiki_small, tmp_path, capsys):
    # "Arts" and "arts!" both slugify to "arts", and a non-Latin name slugifies to nothing: each
    # used to be sent into one shared folder, and the run stopped, saying its own lock was another run's.
    from datasets import load_from_disk

    renamed = {"Arts": "Arts", "Mathematics": "arts!", "Biology and health sciences": "Наука"}
    ds = load_from_disk(str(wiki_small))
    ds = ds.add_column("field", [renamed[t] for t in ds["topic"]])
    ds.save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "domains"
    assert run_cli("train", "--dataset", tmp_path / "data", "--out", out, "--domain-column", "field", "--per-domain", *SMALL) == 0
    table = json.loads((out / "domains.json").read_text())
    assert sorted(row["domain"] for row in table) == sorted(renamed.values())
    folders = [row["folder"] for row in table]
    assert len(set(folders)) == 3
    for row in table:
        assert json.loads((out / row["folder"] / "training_args.json").read_text())["domain"] == row["domain"]
        assert row["n_train"] + row["n_heldout"] == 80
    assert f"one folder per domain under {out}/" in capsys.readouterr().out


def test_per_domain_marks_a_domain_too_small_to_compare_and_lists_one_skipped(wiki_small, tmp_path, caplog):
    # A 12-text domain (a few held-out texts) was trained and listed in domains.md like the others,
    # without a word, though its held-out figures rested on a handful of texts; a
    # 2-text domain was skipped with a log line and was missing from domains.md altogether.
    from datasets import load_from_disk

    ds = load_from_disk(str(wiki_small))
    field = [t if i >= 14 or t != "Mathematics" else ("tiny" if i < 12 else "two") for i, t in enumerate(ds["topic"])]
    ds.add_column("field", field).save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "domains"
    with caplog.at_level("INFO", logger="sbert_sae.pipeline"):
        assert run_cli("train", "--dataset", tmp_path / "data", "--out", out, "--domain-column", "field", "--per-domain", "--heldout-fraction", "0.4", *SMALL) == 0
    table = {row["domain"]: row for row in json.loads((out / "domains.json").read_text())}
    assert sorted(table) == ["Arts", "Biology and health sciences", "Mathematics", "tiny", "two"]
    tiny = table["tiny"]
    assert tiny["n_train"] + tiny["n_heldout"] == 12 and 0 < tiny["n_heldout"] < 20
    assert f"held-out figures from {tiny['n_heldout']} text(s) only" in tiny["note"]
    assert all(table[d]["note"] is None for d in ("Arts", "Biology and health sciences", "Mathematics"))
    assert table["two"]["folder"] is None and table["two"]["note"] == "skipped: 2 text(s), an SAE needs at least 3"
    assert f"domain 'tiny' has 12 texts: its held-out figures will rest on {tiny['n_heldout']} of them (under 20)" in caplog.text
    assert "domain 'Arts' has" not in caplog.text
    # The log gave the training texts as the domain's texts: "training tiny: 6 texts (6 held out)" for 12.
    assert f"training tiny: 12 texts, {tiny['n_heldout']} of them held out -> " in caplog.text
    md = (out / "domains.md").read_text().splitlines()
    assert md[0].endswith("| note |")
    assert next(line for line in md if line.startswith("| tiny | tiny |")).endswith(f"| {tiny['note']} |")
    assert "| two | - | - |" in "\n".join(md)


def test_domains_md_keeps_its_columns_for_a_domain_named_with_a_bar(tmp_path):
    # A domain named "database|sql" (a value of a user's section column) ended its cell at the
    # "|", so its row of domains.md had a column more than the header and every figure shifted.
    import re

    from sbert_sae.pipeline import RunResult, write_domain_table

    results = [RunResult(name, tmp_path / folder, {"n_train": 40, "n_heldout": 30, "heldout_fvu": 0.5}) for name, folder in (("database|sql", "database-sql"), ("games", "games"))]
    write_domain_table(tmp_path, results, skipped=[("a|b", 2), ("two\nlines", 1)])
    lines = (tmp_path / "domains.md").read_text().splitlines()
    cells = [re.split(r"(?<!\\)\|", line) for line in lines]
    assert len({len(row) for row in cells}) == 1, lines
    assert cells[2][1].strip() == "database\\|sql" and cells[2][5].strip() == "0.5000"
    assert cells[4][1].strip() == "a\\|b"
    # a line break in a name ended the row there
    assert cells[5][1].strip() == "two lines" and len(lines) == 6


def test_a_run_with_a_prompt_reports_to_tensorboard(wiki_small, tmp_path):
    # base_model_kwargs (a dict) went into TensorBoard's hyper-parameters, which refuse dicts:
    # every run with --prompt/--prompt-name/--truncate-dim and the default --report-to crashed
    # after embedding with "ValueError: value should be one of int, float, str, bool, or torch.Tensor".
    pytest.importorskip("tensorboard")  # in the test extras: runs in CI
    out = tmp_path / "prompted"
    small = [a for a in SMALL if a not in ("--report-to", "none")]
    assert run_cli("train", "--dataset", wiki_small, "--out", out, "--prompt", "passage: ", "--report-to", "tensorboard", "--max-rows", "120", *small) == 0
    assert SparseAutoencoder.from_pretrained(out).config.base_model_kwargs == {"prompt": "passage: "}
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_a_resumed_run_goes_on_reporting_to_tensorboard(tmp_path, training_crashes_at_step):
    # The trackers were started only by a run from step 0: a resumed run logged its steps to
    # none, and TensorBoard's curves ended where the run had been interrupted.
    pytest.importorskip("tensorboard")  # in the test extras: runs in CI
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sbert_sae import SparseAutoencoderConfig
    from sbert_sae.trainer import TrainingArguments, train

    data = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    args = TrainingArguments(epochs=2, batch_size=32, report_to="tensorboard", show_progress=False, checkpoint_every=5, checkpoint_min_seconds=0, log_every=1)

    def run():
        return train(SparseAutoencoderConfig(d_in=16, n_latents=64, k=4), args, data, np.arange(20, 300), np.arange(20), tmp_path, resume=True)

    with training_crashes_at_step(8), pytest.raises(RuntimeError, match="simulated crash"):
        run()
    assert run().steps == 18
    steps = set()
    for events in (tmp_path / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "train/fvu" in accumulator.Tags()["scalars"]:
            steps |= {event.step for event in accumulator.Scalars("train/fvu")}
    assert steps == set(range(1, 19))


def test_a_corpus_or_domain_too_small_to_train_is_refused_not_skipped_silently(wiki_small, tmp_path, capsys):
    # A 2-text corpus (or a --domain of 2 texts) used to log "domain 'all' has only 2 texts:
    # skipped" and exit 0 with nothing written; it is now refused, and an earlier run in --out is kept.
    from datasets import load_from_disk

    ds = load_from_disk(str(wiki_small))
    ds.select(range(2)).save_to_disk(str(tmp_path / "two"))
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    capsys.readouterr()
    assert run_cli("train", "--dataset", tmp_path / "two", "--out", out, "--overwrite", *SMALL) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to train" in err[0] and "text column 'text': 2 usable text(s)" in err[0], err
    assert (out / "metrics.json").read_text() == "{}"
    ds.add_column("field", ["tiny"] * 2 + ["big"] * (len(ds) - 2)).save_to_disk(str(tmp_path / "fields"))
    capsys.readouterr()
    assert run_cli("train", "--dataset", tmp_path / "fields", "--out", tmp_path / "tiny", "--domain-column", "field", "--domain", "tiny", *SMALL) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "domains of column 'field': 'tiny' has 2" in err[0], err
    assert not (tmp_path / "tiny" / "model.safetensors").exists()
    # A column of distinct long values as the domain column: named briefly, not text by text.
    assert run_cli("train", "--dataset", tmp_path / "fields", "--out", tmp_path / "tiny", "--domain-column", "text", "--per-domain", *SMALL) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(and 235 more)" in err[0] and len(err[0]) < 600, err


def test_a_text_column_holding_one_text_is_refused(wiki_small, tmp_path, capsys):
    # A constant column chosen as the text (every row "en") trained an SAE whose features were
    # all dead and reported a perfect held-out FVU of 0.0; it is now refused before embedding.
    from datasets import load_from_disk

    ds = load_from_disk(str(wiki_small)).select(range(20))
    ds.add_column("lang", ["en"] * 20).save_to_disk(str(tmp_path / "data"))
    capsys.readouterr()
    assert run_cli("train", "--dataset", tmp_path / "data", "--text-column", "lang", "--out", tmp_path / "run", *SMALL) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "all 20 usable texts of column 'lang' are the same text ('en')" in err[0], err
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_domain_named_all_is_recorded_as_that_domain(wiki_small, tmp_path):
    # The whole corpus' group is called "all", and a domain itself named "all" was recorded
    # in training_args.json as no domain (null).
    from datasets import load_from_disk

    ds = load_from_disk(str(wiki_small)).select(range(40))
    ds.add_column("field", ["all"] * 20 + ["some"] * 20).save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "run"
    assert run_cli("train", "--dataset", tmp_path / "data", "--domain-column", "field", "--domain", "all", "--out", out, *SMALL) == 0
    assert json.loads((out / "training_args.json").read_text())["domain"] == "all"


def test_metrics_do_not_depend_on_the_batch_size_and_a_wide_sae_takes_fewer_texts_a_batch(trained, wiki_small, monkeypatch):
    """The metrics are the same to the bit whatever the batch size (per-text figures summed
    in float64 in a fixed grouping; summed per batch in float32 they moved in the 7th digit),
    and a batch holds at most `ENCODE_BATCH_ELEMENTS` pre-activations, as when encoding."""
    from sbert_sae import activations
    from sbert_sae.evaluation import _blocks, feature_fire_counts, neighbour_overlap, reconstruction_metrics
    from sbert_sae.pipeline import DataArguments, load_and_embed

    sae = SparseAutoencoder.from_pretrained(trained).eval()
    _, cache = load_and_embed(DataArguments(dataset=str(wiki_small)), show_progress=False)
    emb, positions = cache.embeddings, np.arange(len(cache.embeddings))
    whole = reconstruction_metrics(sae, emb, positions, batch_size=len(positions))
    for batch_size in (100, 37, 8):
        assert reconstruction_metrics(sae, emb, positions, batch_size=batch_size) == whole, batch_size
        assert np.array_equal(feature_fire_counts(sae, emb, positions, batch_size=batch_size), feature_fire_counts(sae, emb, positions, batch_size=len(positions)))
        assert neighbour_overlap(sae, emb, positions, batch_size=batch_size) == neighbour_overlap(sae, emb, positions, batch_size=len(positions))
    monkeypatch.setattr(activations, "ENCODE_BATCH_ELEMENTS", 50 * sae.config.n_latents)  # room for 50 texts' pre-activations
    batches = []
    monkeypatch.setattr(sae, "pre_activations", lambda x, own=sae.pre_activations: batches.append(len(x)) or own(x))
    assert reconstruction_metrics(sae, emb, positions) == whole
    assert max(batches) <= 50 and min(batches) >= 40 and sum(batches) == len(positions)  # equal batches, none of a few texts
    assert all(len(rows) <= 50 for rows, *_ in _blocks(sae, emb, positions, 50))


def test_fp16_on_a_cpu_is_said_to_train_in_fp32(caplog):
    # accelerate gives fp16 on a CPU neither autocast nor a loss scaler, silently: the run
    # trained in fp32 while its settings said fp16.
    import torch

    from sbert_sae.trainer import resolve_mixed_precision

    with caplog.at_level("WARNING", logger="sbert_sae.trainer"):
        resolve_mixed_precision("bf16", torch.device("cpu"))
        resolve_mixed_precision("no", torch.device("cpu"))
        assert caplog.text == ""
        resolve_mixed_precision("fp16", torch.device("cpu"))
    assert "--mixed-precision fp16 has no effect on a CPU: training runs in fp32" in caplog.text


def test_a_domain_holds_out_the_same_texts_alone_with_the_others_and_in_the_whole_corpus(wiki_small, tmp_path):
    # --per-domain gives each domain's SAE a seed of its own (its own initial decoder), and the
    # held-out texts were drawn with it too: the Mathematics texts held out by --per-domain were
    # not those of --domain Mathematics, nor the Mathematics texts the all-domains run held out,
    # so the SAEs' held-out figures were measured on different texts.
    from datasets import load_from_disk

    common = ["--dataset", wiki_small, "--domain-column", "topic", *SMALL, "--epochs", "1", "--seed", "3"]
    assert run_cli("train", "--out", tmp_path / "per", "--per-domain", *common) == 0
    assert run_cli("train", "--out", tmp_path / "alone", "--domain", "Mathematics", *common) == 0
    assert run_cli("train", "--out", tmp_path / "whole", *common) == 0

    def heldout(folder):
        split = json.loads((folder / "split.json").read_text())
        assert split["seed"] == 3
        return set(split["heldout_row_ids"])

    maths = {i for i, topic in enumerate(load_from_disk(str(wiki_small))["topic"]) if topic == "Mathematics"}
    assert heldout(tmp_path / "per" / "mathematics") == heldout(tmp_path / "alone") == heldout(tmp_path / "whole") & maths
    assert heldout(tmp_path / "alone")


def test_per_domain_with_one_domain_left_names_its_table(wiki_small, tmp_path, capsys):
    # domains.md is written for a --per-domain run of one domain too (the others skipped as too
    # small are listed in it), but the run named it only when two or more domains were trained.
    from datasets import load_from_disk

    ds = load_from_disk(str(wiki_small))
    ds.add_column("field", ["few" if i < 2 else "many" for i in range(len(ds))]).save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "domains"
    assert run_cli("train", "--dataset", tmp_path / "data", "--out", out, "--domain-column", "field", "--per-domain", *SMALL, "--epochs", "1") == 0
    assert f"domain comparison: {out / 'domains.md'}" in capsys.readouterr().out
    assert "| few | - |" in (out / "domains.md").read_text()


def test_a_run_on_a_relative_dataset_path_is_searched_from_another_folder(wiki_small, tmp_path, monkeypatch, capsys):
    # training_args.json recorded the dataset as typed ("corpus.parquet"): label, search, push
    # --activations and the explorer, run from any other folder, said "dataset 'corpus.parquet'
    # not found". A local dataset is now recorded by its absolute path.
    from datasets import load_from_disk

    (tmp_path / "work").mkdir()
    (tmp_path / "elsewhere").mkdir()
    load_from_disk(str(wiki_small)).select(range(30)).to_parquet(str(tmp_path / "work" / "corpus.parquet"))
    monkeypatch.chdir(tmp_path / "work")
    assert run_cli("train", "--dataset", "corpus.parquet", "--out", "run", *SMALL, "--epochs", "1") == 0
    recorded = json.loads((tmp_path / "work" / "run" / "training_args.json").read_text())["data"]["dataset"]
    assert recorded == str(tmp_path / "work" / "corpus.parquet")
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert run_cli("search", tmp_path / "work" / "run", "mathematics", "--top", "2") == 0
    assert "  1. " in capsys.readouterr().out


def test_a_symlinked_dataset_folder_is_recorded_by_the_run_and_its_cache_alike(wiki_small, tmp_path, capsys):
    # training_args.json recorded a local dataset by its absolute path, the embedding cache's
    # meta.json (what `cache list` shows) by the path with its links resolved: one run's dataset
    # was named two ways. Both now record the path as given, made absolute (links kept).
    from datasets import load_from_disk

    load_from_disk(str(wiki_small)).select(range(30)).save_to_disk(str(tmp_path / "real" / "corpus"))
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    given = tmp_path / "link" / "corpus"
    cache_dir = tmp_path / "cache"  # a cache of its own: its meta.json is this run's
    assert run_cli("train", "--dataset", given, "--out", tmp_path / "run", "--cache-dir", cache_dir, *SMALL, "--epochs", "1") == 0
    assert json.loads((tmp_path / "run" / "training_args.json").read_text())["data"]["dataset"] == str(given)
    capsys.readouterr()
    assert run_cli("cache", "list", "--json", "--cache-dir", cache_dir) == 0
    [entry] = [e for e in json.loads(capsys.readouterr().out)["entries"] if e["kind"] == "embeddings"]
    assert entry["details"]["source"]["dataset"] == str(given)


def test_a_domain_whose_texts_are_all_one_text_is_skipped_or_refused(wiki_small, tmp_path, capsys):
    # A domain of one boilerplate text was trained: every feature dead, yet a perfect held-out
    # FVU of 0.0 and cosine 1.0, the best row of domains.md (a corpus of one text is refused).
    from datasets import Dataset, load_from_disk

    texts = load_from_disk(str(wiki_small)).select(range(40))["text"]
    rows = [{"text": t, "field": "real"} for t in texts] + [{"text": "No description available.", "field": "boiler"}] * 12
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "domains"
    assert run_cli("train", "--dataset", tmp_path / "data", "--out", out, "--domain-column", "field", "--per-domain", *SMALL, "--epochs", "1") == 0
    table = {row["domain"]: row for row in json.loads((out / "domains.json").read_text())}
    assert table["boiler"]["folder"] is None and table["boiler"]["note"] == "skipped: its 12 texts are all the same text"
    assert table["real"]["n_train"] + table["real"]["n_heldout"] == 40
    assert not (out / "boiler").exists()
    capsys.readouterr()
    assert run_cli("train", "--dataset", tmp_path / "data", "--out", tmp_path / "boiler", "--domain-column", "field", "--domain", "boiler", *SMALL) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "all 12 texts of domain 'boiler' (column 'field') are the same text ('No description available.')" in err[0], err
    assert not (tmp_path / "boiler" / "model.safetensors").exists()


def test_domains_md_shows_a_figure_that_could_not_be_measured_as_a_dash(tmp_path):
    # A domain of under 11 texts has no neighbour overlap@10 (NaN): domains.json held null, and
    # domains.md "nan" beside the "-" of the figures of a skipped domain.
    from sbert_sae.pipeline import RunResult, write_domain_table

    write_domain_table(tmp_path, [RunResult("few", tmp_path / "few", {"n_train": 4, "n_heldout": 1, "heldout_fvu": 0.5, "neighbour_overlap_at_10": float("nan")})])
    row = (tmp_path / "domains.md").read_text().splitlines()[2]
    assert "nan" not in row and row.startswith("| few | few | 4 | 1 | 0.5000 | - |"), row
    assert json.loads((tmp_path / "domains.json").read_text())[0]["neighbour_overlap_at_10"] is None


def test_many_small_domains_are_warned_about_in_one_line(wiki_small, tmp_path, caplog):
    # 200 small domains gave 200 warnings of too few held-out texts (and a column of many
    # one-text values a line for each skipped domain) before anything was trained.
    from datasets import load_from_disk

    ds = load_from_disk(str(wiki_small)).select(range(36))
    field = [f"s{i // 4}" for i in range(24)] + [f"t{i // 2}" for i in range(12)]  # 6 domains of 4 texts, 6 of 2
    ds.add_column("field", field).save_to_disk(str(tmp_path / "data"))
    with caplog.at_level("WARNING", logger="sbert_sae.pipeline"):
        assert run_cli("train", "--dataset", tmp_path / "data", "--out", tmp_path / "domains", "--domain-column", "field", "--per-domain", *SMALL, "--epochs", "1") == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "sbert_sae.pipeline"]
    assert [w for w in warnings if "skipped" in w] == ["6 domains have under 3 texts and are skipped: 't0' (2), 't1' (2), 't2' (2), 't3' (2), 't4' (2) and 1 more"]
    few = [w for w in warnings if "held-out" in w]
    assert len(few) == 1 and few[0].startswith("6 domains have under 20 held-out texts") and "'s1' (1 of 4)" in few[0] and few[0].endswith(" and 1 more"), warnings
    assert len(json.loads((tmp_path / "domains" / "domains.json").read_text())) == 12


def test_heldout_fvu_of_held_out_copies_of_one_text_is_finite_and_matches_the_log():
    # Held-out texts that are all one text (a corpus of many duplicates) have no variance about
    # their mean but rounding's: metrics.json gave a held-out FVU of 7.9e12 and the training log
    # 6.4e12 (cosine 0.9996). Their error is now normalised by their squared norm, as one text's.
    from sbert_sae import SparseAutoencoderConfig
    from sbert_sae.evaluation import reconstruction_metrics
    from sbert_sae.trainer import heldout_fvu

    torch.manual_seed(0)
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=32, n_latents=64, k=4)).eval()
    one = torch.nn.functional.normalize(torch.randn(1, 32), dim=1)
    embeddings = np.concatenate([torch.nn.functional.normalize(torch.randn(20, 32), dim=1).numpy(), one.repeat(6, 1).numpy()]).astype(np.float32)
    copies = np.arange(20, 26)
    metrics = reconstruction_metrics(sae, embeddings, copies)
    assert metrics["fvu"] == pytest.approx(metrics["normalized_mse"], rel=1e-6) and metrics["fvu"] < 10
    assert heldout_fvu(sae, torch.from_numpy(embeddings[copies])) == pytest.approx(metrics["fvu"], rel=1e-4)
    # distinct texts keep their variance as the denominator
    distinct = reconstruction_metrics(sae, embeddings, np.arange(20))
    assert distinct["fvu"] > distinct["normalized_mse"] * 1.01
    assert heldout_fvu(sae, torch.from_numpy(embeddings[:20])) == pytest.approx(distinct["fvu"], rel=1e-4)


def _seen_in_training(texts: list, heldout: list[int], rows: list[int]) -> int:
    """Held-out rows whose text is also the text of a training row (one of `rows` not held out)."""
    held = set(heldout)
    training = {texts[i] for i in rows if i not in held}
    return sum(texts[i] in training for i in heldout)


def test_heldout_texts_that_are_also_training_texts_are_counted_and_warned_about(wiki_small, tmp_path, caplog, capsys):
    # The split draws rows, not texts: a corpus' duplicates (boilerplate, reposts) fell on both
    # sides, and the held-out figures of a much-duplicated corpus were measured partly on
    # texts the SAE was trained on, without a word.
    from datasets import Dataset, load_from_disk

    from sbert_sae.hub import _metrics_table

    rows = load_from_disk(str(wiki_small)).to_list()
    rows += rows[:60]  # 60 texts twice
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "dup"
    with caplog.at_level("WARNING", logger="sbert_sae.pipeline"):
        assert run_cli("train", "--dataset", tmp_path / "data", "--out", out, *SMALL, "--epochs", "1", "--heldout-fraction", "0.2") == 0
    split = json.loads((out / "split.json").read_text())
    seen = _seen_in_training([r["text"] for r in rows], split["heldout_row_ids"], list(range(len(rows))))
    assert seen > 0.05 * split["n_heldout"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout_seen_in_training"] == seen / split["n_heldout"]
    assert "duplicates" in metrics["descriptions"]["heldout_seen_in_training"]
    assert f"{seen} of the {split['n_heldout']} held-out texts ({100 * seen / split['n_heldout']:.1f}%) are also training texts" in caplog.text
    assert "deduplicate the corpus" in caplog.text
    assert f"| `heldout_seen_in_training` | {seen / split['n_heldout']:#.4g} | {split['n_heldout']} held-out texts |" in _metrics_table(metrics)
    assert f"held-out texts, {seen} of them also training texts, " in capsys.readouterr().out  # the summary line


def test_a_domain_counts_its_heldout_texts_seen_among_its_own_training_texts_only(wiki_small, tmp_path, caplog):
    # A domain's SAE is trained on its own domain's texts: a held-out text that another domain
    # also holds was never trained on by it; one its own domain repeats was.
    from datasets import Dataset, load_from_disk

    ds = load_from_disk(str(wiki_small))
    maths = [r for r in ds.to_list() if r["topic"] == "Mathematics"]
    arts = [r for r in ds.to_list() if r["topic"] == "Arts"]
    rows = maths + [{**r, "topic": "copies"} for r in maths] + arts + arts[:40]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "domains"
    with caplog.at_level("WARNING", logger="sbert_sae.pipeline"):
        assert run_cli("train", "--dataset", tmp_path / "data", "--out", out, "--domain-column", "topic", "--per-domain", *SMALL, "--epochs", "1", "--heldout-fraction", "0.25") == 0
    texts = [r["text"] for r in rows]
    table = {row["domain"]: row for row in json.loads((out / "domains.json").read_text())}
    for domain in ("Mathematics", "copies", "Arts"):
        folder = out / table[domain]["folder"]
        split = json.loads((folder / "split.json").read_text())
        own = [i for i, r in enumerate(rows) if r["topic"] == domain]
        seen = _seen_in_training(texts, split["heldout_row_ids"], own)
        assert json.loads((folder / "metrics.json").read_text())["heldout_seen_in_training"] == seen / split["n_heldout"], domain
        if domain == "Arts":
            assert seen > 0.05 * split["n_heldout"]
            assert f"domain 'Arts': {seen} of its {split['n_heldout']} held-out texts" in caplog.text
            assert "also its training texts (duplicates)" in table[domain]["note"]
        else:
            assert seen == 0  # every one of its texts is also another domain's
            assert f"domain {domain!r}:" not in caplog.text
            assert "duplicates" not in (table[domain]["note"] or "")


def test_a_train_result_shows_in_a_line(tmp_path):
    # A notebook cell ending in train(...) printed the dataclass' repr: every record of the
    # learning curve and the SAE's module tree.
    from sbert_sae import SparseAutoencoderConfig
    from sbert_sae.trainer import TrainingArguments, train

    x = np.random.default_rng(0).normal(size=(80, 8)).astype(np.float32)
    args = TrainingArguments(epochs=3, batch_size=16, report_to="none", show_progress=False, checkpoint_every=0, log_every=1)
    result = train(SparseAutoencoderConfig(d_in=8, n_latents=16, k=2), args, x, np.arange(70), np.arange(70, 80), tmp_path)
    shown = repr(result)
    assert "\n" not in shown and len(result.history) > 10 and len(shown) < 300, shown
    assert shown.startswith("TrainResult(SparseAutoencoder(") and f"{result.steps} steps" in shown and f"holds {len(result.history)} records" in shown
    last_fvu = [r["heldout_fvu"] for r in result.history if "heldout_fvu" in r][-1]
    assert f"last heldout_fvu={last_fvu:.4f}" in shown
