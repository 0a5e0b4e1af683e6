"""Train a top-k SAE on cached embeddings with Accelerate.

One loop, readable top to bottom: shuffled epochs over the training rows, learning-rate
warm-up and decay, the decoder constraints around each Adam step, AuxK on dead
features, gradient clipping, mixed precision where the device has it, checkpoints that
a killed run resumes from, and metrics to a progress bar, a JSON-lines log and
Accelerate's trackers. On one GPU, full batches replay the step's gradient work from a
captured CUDA graph (`GraphedSteps`). Under `accelerate launch` every process reads the same cached
embeddings and takes its share of each global batch; each process' loss is weighted by its
share of the batch's rows and the gradients are averaged, so the run follows one process with
the same global batch size: closely, not bitwise, since each process normalises its error by
the variance of its own rows (the FVU), not of the whole batch.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .configuration_sbert_sae import SparseAutoencoderConfig
from .errors import ConfigError, InputError, OutputDirError, ResumeError, SbertSaeError, SettingsChangedError
from .modeling_sbert_sae import SparseAutoencoder
from .utils import append_jsonl, atomic_write, follow_umask, fsync_directory, fsync_folder, is_disk_full, pause_point, read_json, write_json

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "linear", "cosine", "wsd")
# Which features are dead is read on the host every this many steps (reading it every step
# would stall the GPU): AuxK reaches a feature at most this many steps after it dies, and
# its top-k runs over the dead features' columns only.
DEAD_CHECK_EVERY = 16
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
# Settings that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = {"log_every", "checkpoint_every", "checkpoint_min_seconds", "keep_checkpoints", "report_to", "show_progress", "eval_max_rows", "cuda_graphs"}


@dataclass
class TrainingArguments:
    """How to train (saved with the run as `training_args.json`)."""

    epochs: int = 20
    """Passes over the training rows."""
    batch_size: int = 256
    """Global batch size: split across processes under `accelerate launch`. An epoch's last,
    shorter batch is left out when under 1/16 of this (`SHORT_LAST_BATCH`)."""
    lr: float = 3e-3
    """Peak Adam learning rate."""
    lr_schedule: str = "cosine"
    """Decay after warm-up: constant, linear (to 0), cosine (to 0) or wsd (warm-up, stable,
    decay: constant, then linear to 0 over the last `decay_fraction` of the steps)."""
    decoder_lr_scale: float = 10.0
    """The decoder's learning rate, as a multiple of `lr`. Adam moves every weight by about
    the learning rate whatever its size: the decoder's rows have unit norm while the encoder's
    start at norm `encoder_init_scale` (0.1), so at one rate the decoder's directions would
    turn ten times more slowly, for their length, than the encoder's."""
    warmup_fraction: float = 0.05
    """Share of the steps spent warming the learning rate up from 0."""
    decay_fraction: float = 0.2
    """Share of the steps of the wsd schedule's final decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's beta1, beta2."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this (0 disables)."""
    seed: int = 0
    """Seeds the initial weights and the order of every epoch."""
    mixed_precision: str = "auto"
    """auto (bf16 on a GPU that has it, else fp32), no, bf16 or fp16."""
    checkpoint_every: int = 500
    """Steps between checkpoints (0: only at the end)."""
    checkpoint_min_seconds: float = 60.0
    """Skip a checkpoint when the last one is younger than this (a GPU runs 500 steps in
    seconds); 0 writes every `checkpoint_every` steps."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    log_every: int = 10
    """Steps between log records."""
    eval_max_rows: int = 8192
    """Held-out rows scored at the end of every epoch (for the learning curve)."""
    report_to: str = "auto"
    """Accelerate trackers: auto (tensorboard/trackio when installed), none, or a comma list."""
    show_progress: bool = True
    """Show a progress bar."""
    cuda_graphs: bool = True
    """On one GPU, with the training rows resident and bf16 or fp32, replay each batch's
    forward, backward and gradient work as a captured CUDA graph (one per AuxK width and
    batch length): the host's Python then no longer paces the GPU. Same arithmetic as the
    eager step."""

    def validate(self) -> None:
        def positive(name: str, value, allow_zero: bool = False) -> None:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0 or (value == 0 and not allow_zero):
                raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

        positive("epochs", self.epochs)
        positive("batch_size", self.batch_size)
        positive("lr", self.lr)
        positive("decoder_lr_scale", self.decoder_lr_scale)
        positive("grad_clip", self.grad_clip, allow_zero=True)
        positive("checkpoint_every", self.checkpoint_every, allow_zero=True)
        positive("checkpoint_min_seconds", self.checkpoint_min_seconds, allow_zero=True)
        positive("log_every", self.log_every)
        positive("keep_checkpoints", self.keep_checkpoints)
        positive("eval_max_rows", self.eval_max_rows)
        if not isinstance(self.epochs, int) or not isinstance(self.batch_size, int):
            raise ConfigError(f"epochs and batch_size must be integers, got {self.epochs!r} and {self.batch_size!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}")
        if not 0 <= self.decay_fraction <= 1 - self.warmup_fraction:
            raise ConfigError(f"decay_fraction must be in [0, 1 - warmup_fraction], got {self.decay_fraction!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if not all(0 <= b < 1 for b in self.adam_betas) or len(self.adam_betas) != 2:
            raise ConfigError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:  # numpy's range
            raise ConfigError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.report_to not in ("auto", "none"):
            from accelerate.utils import LoggerType

            known = sorted(t.value for t in LoggerType)
            unknown = [t for t in (t.strip() for t in str(self.report_to).split(",")) if t not in known]
            if unknown:
                raise ConfigError(f"report_to names unknown trackers {unknown}: use auto, none, or a comma list of {known}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SHORT_LAST_BATCH = 1 / 16
"""An epoch's last batch of fewer rows than this share of `batch_size` is left out of that epoch
(the next epoch's shuffle leaves out other rows, so over a few epochs every row is trained on;
with one epoch, those few rows are not).
Adam moves every weight about as far on a few rows as on a full batch, and their noisy gradient
stays in its moments: 8,197 rows (two batches of 4,096 and one of 5) ended at held-out FVU 0.4268
with the 5-row step and 0.4017 without it; at batch 1,024, 0.3760 and 0.3597 (3 seeds each,
benchmarks/README.md). Scaling the short step's learning rate by its rows did worse (0.4374: the
moments keep its gradient); adding the rows to the batch before did as well (0.4021) but makes
one more batch length (another CUDA graph). The quick start's last batch, 19 of 256 rows
(7.4%), is kept."""


def batches_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimiser steps per epoch over `n_train` rows: full batches, and the rest as one shorter
    batch unless it is under `SHORT_LAST_BATCH` of a batch."""
    full, rest = divmod(n_train, batch_size)
    if full and rest < SHORT_LAST_BATCH * batch_size:
        return full
    return full + (rest > 0)


def learning_rate(step: int, total_steps: int, args: TrainingArguments) -> float:
    """Learning rate at optimiser step `step` (0-based): linear warm-up, then the schedule's decay."""
    warmup = int(args.warmup_fraction * total_steps)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if args.lr_schedule == "constant":
        return args.lr
    if args.lr_schedule == "wsd":
        decay = int(args.decay_fraction * total_steps)
        return args.lr * min(1.0, (total_steps - step) / decay) if decay else args.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    if args.lr_schedule == "linear":
        return args.lr * max(0.0, 1.0 - progress)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def optimizer_groups(sae: SparseAutoencoder, args: TrainingArguments) -> list[dict]:
    """Adam's parameter groups: the decoder's learning rate is `decoder_lr_scale` times the rest's."""
    decoder = [sae.W_dec]
    rest = [p for p in sae.parameters() if p is not sae.W_dec]
    return [{"params": rest, "lr_scale": 1.0}, {"params": decoder, "lr_scale": float(args.decoder_lr_scale)}]


def resolve_mixed_precision(choice: str, device: torch.device) -> str:
    if choice == "fp16" and device.type == "cpu":
        # accelerate takes it without a word and gives it neither autocast nor loss scaling.
        logger.warning("--mixed-precision fp16 has no effect on a CPU: training runs in fp32 (bf16 is the half precision a CPU runs)")
    if choice != "auto":
        return choice
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def check_finite_rows(embeddings: np.ndarray, positions: np.ndarray, row_ids: np.ndarray | None = None, chunk: int = 65536) -> None:
    """Refuse NaN/inf in the rows that will be trained on or scored, naming the dataset rows."""
    for start in range(0, len(positions), chunk):
        block = np.asarray(embeddings[positions[start : start + chunk]])
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            where = positions[start : start + chunk][bad][:5]
            names = row_ids[where].tolist() if row_ids is not None else where.tolist()
            raise InputError(f"embeddings of rows {names} contain NaN or inf")


SHORTEST_NORM_IN_LRS = 30
"""Where the SAE reads embeddings as they are (`normalize="none"`), their median norm must be at
least this many learning rates (or about unit length, 0.99, where that is less): Adam moves
every weight, the biases too, by about the learning rate a step whatever the embeddings' scale,
and overshoots shorter vectors. Held-out FVU at lr
3e-3 (600 wiki texts, n=256, k=8, 3 epochs) by median norm: 0.3 and up (to 1e6) 0.78, as unit
vectors; 0.1 0.83; 0.03 0.95; 0.01 2.8; 1e-3 2,273; 1e-4 250,293. At lr 3e-4, 0.01 trained and
1e-3 did not (7.6)."""


def check_input_scale(sample: torch.Tensor, config: SparseAutoencoderConfig, args: TrainingArguments) -> None:
    """Refuse embeddings too short for the learning rate where the SAE reads them as they are
    (`sample`: training rows)."""
    if config.normalize != "none":
        return
    norm = float(sample.float().norm(dim=1).median())
    # At most unit length: normalize='l2' trains unit vectors at any lr unchecked, so vectors as
    # long are not refused for being read as they are (nor told to use 'l2', which changes nothing).
    # (0.99: unit vectors' float32 norms fall either side of 1, and their median may too.)
    needed = min(SHORTEST_NORM_IN_LRS * args.lr, 0.99)
    if norm < needed:
        raise InputError(
            f"the embeddings' median norm is {norm:.3g}: too short to train on as they are (normalize='none') at lr={args.lr:g}, "
            f"since Adam moves each weight by about lr a step; they need a median norm of at least {needed:.3g} ({SHORTEST_NORM_IN_LRS} x lr, at most about unit length). "
            "Use normalize='l2' (--normalize l2), scale the embeddings up, or lower the learning rate"
        )


class EmbeddingFeed:
    """Batches of training embeddings, resident on the device or gathered from a memory map."""

    def __init__(self, source: np.ndarray, positions: np.ndarray, device: torch.device, resident: bool | None = None):
        self.source = source
        self.positions = np.asarray(positions, dtype=np.int64)
        self.device = device
        nbytes = len(self.positions) * source.shape[1] * 4
        if resident is None:
            resident = nbytes <= _free_memory(device) // 2
        self.resident = resident
        self.data = None
        if resident:
            block = np.ascontiguousarray(source[self.positions], dtype=np.float32)
            self.data = torch.from_numpy(block).to(device)

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def index_device(self) -> torch.device:
        """Where batch indices live: on the device with resident rows (no copy per step)."""
        return self.data.device if self.data is not None else torch.device("cpu")

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        if self.data is not None:
            return self.data[index.to(self.data.device)]
        rows = self.positions[index.cpu().numpy()]
        order = np.argsort(rows)  # read the memory map in file order
        block = torch.from_numpy(np.ascontiguousarray(self.source[rows[order]], dtype=np.float32))
        out = torch.empty_like(block)
        out[torch.from_numpy(order)] = block
        return out.to(self.device, non_blocking=True)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(self), generator=g)[:n]
        return self.batch(index)


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


# ---------------------------------------------------------------- checkpoints
def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    for pid, values in state["state"].items():
        for key, value in values.items():
            tensors[f"state.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a half-written one is a hidden temp folder, never listed)."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(out_dir: Path, sae: SparseAutoencoder, optimizer, state: dict, tensors: dict[str, torch.Tensor], keep: int) -> Path:
    """Write a checkpoint into a hidden temp folder, flush it to the disk, then rename it into
    place: a run killed (or out of disk) mid-write leaves the previous checkpoints as they were.
    A failed write raises `OutputDirError` saying which checkpoint is intact."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    root = out_dir / "checkpoints"
    final = root / f"step-{state['global_step']:09d}"
    tmp = root / f".tmp-{final.name}"
    previous = [p for p in list_checkpoints(out_dir) if p != final]
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}, tmp / "model.safetensors")
        pause_point("checkpoint", state["global_step"])
        opt_tensors, groups = _optimizer_tensors(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors", metadata={"groups": json.dumps(groups)})
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, tmp / "trainer.safetensors")
        follow_umask(*(tmp / f"{name}.safetensors" for name in ("model", "optimizer", "trainer")))
        write_json(tmp / "state.json", state)  # written last: its presence marks a complete checkpoint
        fsync_folder(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_directory(root)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space the half-written one took
        kept = (
            f"the previous checkpoint {previous[-1].name} is intact"
            if previous
            else "no earlier checkpoint exists, so --resume will start from the beginning"
        )
        if is_disk_full(err):
            raise OutputDirError(f"disk full while writing checkpoint {final}: {kept}; free space and rerun with --resume") from err
        raise OutputDirError(f"cannot write checkpoint {final} ({err}): {kept}; rerun with --resume once it can be written") from err
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = load_file(path / "model.safetensors")
    with safe_open(str(path / "optimizer.safetensors"), framework="pt") as f:
        groups = json.loads(f.metadata()["groups"])
        opt = {k: f.get_tensor(k) for k in f.keys()}
    trainer_tensors = load_file(path / "trainer.safetensors")
    return model, opt, groups, trainer_tensors, read_json(path / "state.json")


def _read_checkpoint(path: Path, signature: dict, n_latents: int, out_dir: Path):
    """The checkpoint at `path`, read and checked: ResumeError when it belongs to a run with
    other settings; any other exception when it is damaged."""
    model_state, opt_state, groups, trainer_tensors, state = load_checkpoint(path)
    if state["signature"] != signature:
        changes = _diff(state["signature"], signature)
        raise SettingsChangedError(f"cannot resume {out_dir}: the run's settings changed ({{changes}}); use --overwrite to start again", changes)
    for name in ("samples_since_fired", "epoch_fires"):
        if trainer_tensors[name].shape != (n_latents,):
            raise ValueError(f"{name} has shape {tuple(trainer_tensors[name].shape)}")
    scaler_state = state.get("grad_scaler")
    if scaler_state is not None:
        scale, tracker = scaler_state["scale"], scaler_state["_growth_tracker"]
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0 and isinstance(tracker, int) and tracker >= 0):
            raise ValueError(f"grad_scaler holds scale {scale!r}, growth tracker {tracker!r}")
    return model_state, opt_state, groups, trainer_tensors, state


def _restore_checkpoint(path: Path, sae: SparseAutoencoder, optimizer, signature: dict, out_dir: Path, scaler=None) -> tuple[dict, dict]:
    """Load the checkpoint at `path` into `sae`, `optimizer` and the fp16 gradient `scaler`
    (None: no loss scaling); its state and trainer tensors. ResumeError when it belongs to a
    run with other settings."""
    model_state, opt_state, groups, trainer_tensors, state = _read_checkpoint(path, signature, sae.config.n_latents, out_dir)
    sae.load_state_dict(model_state)
    _load_optimizer(optimizer, opt_state, groups)
    if scaler is not None and "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])
    elif scaler is not None:
        # A checkpoint written before the scaler's state was saved: the run goes on, but not
        # as the uninterrupted one would (its first steps may be skipped until the scale fits).
        logger.warning("checkpoint %s holds no fp16 loss scale: the loss scale starts again at %g", path, scaler.get_scale())
    return state, trainer_tensors


def _unreadable_checkpoints(out_dir: Path, count: int) -> ResumeError:
    return ResumeError(f"cannot resume {out_dir}: none of its {count} checkpoints can be read; use --overwrite to start again")


def check_resume(
    out_dir: str | Path,
    config: SparseAutoencoderConfig,
    args: TrainingArguments,
    data_id: str,
    n_train: int,
    *,
    d_in_of_checkpoint: bool = False,
) -> Path | None:
    """Refuse now what `train(config, args, ..., out_dir, data_id=data_id, resume=True)` on
    `n_train` training rows would refuse once its data is ready: a newest readable checkpoint
    of a run with other settings, or checkpoints none of which can be read. Returns the
    checkpoint the run would continue from (None: it starts from the beginning).

    `d_in_of_checkpoint`: the data is not embedded yet, so its width is not known: the
    checkpoint's is taken, `data_id` naming the model and settings that decide it."""
    out_dir = Path(out_dir)
    checkpoints = list_checkpoints(out_dir)
    config = _run_config(config, n_train)
    for path in reversed(checkpoints):
        try:
            if d_in_of_checkpoint:
                from safetensors import safe_open

                with safe_open(str(path / "model.safetensors"), framework="pt") as f:
                    config.d_in = int(f.get_slice("b_pre").get_shape()[0])
            _read_checkpoint(path, run_signature(config, args, data_id), config.n_latents, out_dir)
            return path
        except SbertSaeError:
            raise
        except Exception:  # noqa: BLE001 - damaged: train() tries the one before it, and so does this
            continue
    if checkpoints:
        raise _unreadable_checkpoints(out_dir, len(checkpoints))
    return None


def check_finished_run(
    out_dir: str | Path,
    config: SparseAutoencoderConfig,
    args: TrainingArguments,
    data_id: str,
    n_train: int,
    *,
    d_in_of_run: bool = False,
) -> None:
    """Refuse (ResumeError) to keep the finished run in `out_dir` as the result of training
    `config` with `args` on `data_id`'s `n_train` rows unless it was trained with exactly
    these (its `training_args.json` records the run's signature). `d_in_of_run`: the data is
    not embedded yet, so the run's own width is taken."""
    out_dir = Path(out_dir)
    config = _run_config(config, n_train)
    try:
        saved = read_json(out_dir / "training_args.json").get("run_signature")
        if d_in_of_run:
            config.d_in = int(read_json(out_dir / "config.json")["d_in"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        saved = None
    if not isinstance(saved, dict):
        raise ResumeError(f"{out_dir} holds a finished run whose settings are not recorded (made by an older sbert-sae, or damaged): use --overwrite to train it again")
    current = json.loads(json.dumps(run_signature(config, args, data_id)))
    if saved != current:
        raise SettingsChangedError(f"cannot keep the finished run in {out_dir}: the run's settings changed ({{changes}}); use --overwrite to train it again", _diff(saved, current))


def _run_config(config: SparseAutoencoderConfig, n_train: int) -> SparseAutoencoderConfig:
    """A copy of `config` as `train` runs it on `n_train` rows: an unset dead_threshold is one epoch."""
    config = copy.deepcopy(config)
    if config.dead_threshold is None:
        config.dead_threshold = n_train
    return config


def _truncate_log(log_path: Path, step: int) -> None:
    """Keep the learning curve's records up to `step` (where a resumed run continues) and drop
    a last line cut by a kill: the resumed run's log then reads as one run's."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    atomic_write(log_path, lambda tmp: Path(tmp).write_text("".join(kept), encoding="utf-8"))


def run_signature(config: SparseAutoencoderConfig, args: TrainingArguments, data_id: str) -> dict:
    """What must not change between an interrupted run and its resumption."""
    cfg = {k: v for k, v in config.to_diff_dict().items() if k not in ("transformers_version", "architectures", "dtype")}
    targs = {k: v for k, v in args.to_dict().items() if k not in RESUMABLE_CHANGES}
    return {"config": cfg, "training_args": json.loads(json.dumps(targs)), "data": data_id}


def data_identity(cache_key: str, train_positions: np.ndarray) -> str:
    return cache_key + ":" + hashlib.sha256(np.asarray(train_positions, dtype=np.int64).tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------- steps
@dataclass
class FiringStats:
    """What the trainer tracks on the device across steps (updated in place: a captured graph
    writes into these very tensors)."""

    samples_since_fired: torch.Tensor
    epoch_fires: torch.Tensor
    running_fvu: torch.Tensor
    running_l0: torch.Tensor

    @torch.no_grad()
    def record(self, out, batch_rows: int, local_rows: int, reduce=None, counted: bool = True) -> None:
        """Count the features `out` fired (not when `counted` is False: a borrowed row) into
        the firing statistics; `reduce` sums a tensor over the processes."""
        fired = torch.zeros_like(self.epoch_fires)
        active = (out.latent_values > 0) & counted
        fired.scatter_add_(0, out.latent_indices.flatten(), active.flatten().long())
        if reduce is not None:
            fired = reduce(fired)
        self.samples_since_fired += batch_rows
        self.samples_since_fired.masked_fill_(fired > 0, 0)
        self.epoch_fires += fired
        self.running_fvu += out.fvu.detach().float()
        self.running_l0 += active.sum() / max(1, local_rows)


def auxk_width(n_dead: int, n_latents: int, smallest: int = 256) -> int:
    """Length of the padded dead-feature list of a captured step: a power of two (so that few
    graphs are captured as the dead count moves), 0 when none is dead."""
    if n_dead == 0:
        return 0
    return min(n_latents, max(smallest, 1 << (n_dead - 1).bit_length()))


class GraphedSteps:
    """The gradient work of a training step (forward, backward, gradient projection, clipping,
    firing statistics), replayed from a CUDA graph for full batches.

    The gradients land in persistent `.grad` tensors that the optimiser reads (it steps
    eagerly: one fused kernel). One graph is captured per AuxK width (`auxk_width` of the dead
    count) and batch length (full batches, and an epoch's last, shorter one, whose length is
    the same every epoch), all in one memory pool. With `capture=False` (any device) the same
    body runs eagerly: what the tests compare with the plain loop.
    """

    def __init__(self, sae: SparseAutoencoder, stats: FiringStats, autocast_dtype: torch.dtype | None, grad_clip: float, capture: bool = True):
        self.sae, self.stats = sae, stats
        self.autocast_dtype = autocast_dtype
        self.grad_clip = grad_clip
        self.capture = capture
        self.params = list(sae.parameters())
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.inputs: dict[int, torch.Tensor] = {}  # a graph's input rows, by batch length
        self.graphs: dict[tuple[int, int], tuple] = {}  # by (AuxK width, batch length)
        self.pool = None  # the graphs' shared memory pool, made at the first capture
        self.dead_buffers: dict[int, torch.Tensor] = {}
        self.width = 0

    def set_dead(self, dead_features: torch.Tensor) -> None:
        """The dead features' ids (read on the host every few steps), padded with -1 to their
        `auxk_width`, in that width's buffer (which its graph reads)."""
        width = auxk_width(len(dead_features), self.sae.config.n_latents)
        if width and width not in self.dead_buffers:
            self.dead_buffers[width] = torch.empty(width, dtype=torch.long, device=dead_features.device)
        if width:
            buffer = self.dead_buffers[width]
            buffer.fill_(-1)
            buffer[: len(dead_features)] = dead_features
        self.width = width

    def body(self, x: torch.Tensor, dead: torch.Tensor | None, batch_rows: int, record: bool = True):
        """One step's gradient work; its output (loss, fvu, ...) for the log."""
        sae = self.sae
        with torch.autocast(x.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None, cache_enabled=False):
            # The class' forward, not the instance's: Accelerate wraps the latter in its own
            # autocast and an fp32 conversion of the outputs.
            out = type(sae).forward(sae, x, dead_features=dead, check_finite=False)
        grads = torch.autograd.grad(out.loss, self.params)
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                p.grad.copy_(g)
        sae.remove_gradient_parallel_to_decoder()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if record:
            self.stats.record(out, batch_rows, len(x))
        # Detached: an output that kept its autograd graph alive would tie the next step's
        # gradients to the stream this one ran on (a captured step runs on a side stream).
        return type(out)(**{name: value.detach() for name, value in out.items()})

    def run(self, data: torch.Tensor, index: torch.Tensor, batch_rows: int):
        """The step on rows `data[index]`, replayed from the graph of its AuxK width and length."""
        dead = self.dead_buffers[self.width] if self.width else None
        if not self.capture:
            return self.body(data[index], dead, batch_rows)
        rows = len(index)
        if rows not in self.inputs:
            self.inputs[rows] = torch.empty(rows, data.shape[1], dtype=data.dtype, device=data.device)
        x = self.inputs[rows]
        torch.index_select(data, 0, index, out=x)
        key = (self.width, rows)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(x, dead, batch_rows)
            except RuntimeError as err:
                # A capture records kernels without running them: nothing was trained or
                # counted, so the run goes on eagerly from this very step.
                logger.warning("capturing the training step as a CUDA graph failed (%s): training goes on without graphs", err)
                self.capture = False
                return self.body(x, dead, batch_rows)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def release(self) -> None:
        """Free the graphs, their memory pool and the gradients (a trained model keeps none)."""
        self.graphs.clear()
        self.inputs.clear()
        self.pool = None
        for p in self.params:
            p.grad = None

    def _capture(self, x: torch.Tensor, dead: torch.Tensor | None, batch_rows: int):
        # Lazy initialisations (cuBLAS workspaces, autograd) happen on a side stream first, as
        # capture requires; these runs record nothing and their gradients are overwritten.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.body(x, dead, batch_rows, record=False)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.body(x, dead, batch_rows)
        logger.debug("captured the training step for AuxK width %d, %d rows", 0 if dead is None else len(dead), len(x))
        return graph, out


def _use_graphed_steps(args: TrainingArguments, device: torch.device, world: int, resident: bool, precision: str) -> bool:
    """Captured steps need one process (no gradient all-reduce between the graph and the
    optimiser), rows on the GPU, and no fp16 loss scaling (which reads the scale on the host)."""
    return args.cuda_graphs and device.type == "cuda" and world == 1 and resident and precision in ("no", "bf16")


# ---------------------------------------------------------------------- train
@dataclass
class TrainResult:
    """What `train` returns: the trained `sae` (not saved: `sae.save_pretrained(folder)`), the
    optimiser `steps` taken, the training's wall-clock `seconds` and `samples_per_second`, the
    share of features that did not fire over the last epoch (`epoch_dead_fraction`) and the
    learning curve (`history`: the records this call added to `train_log.jsonl`)."""

    sae: SparseAutoencoder
    steps: int
    seconds: float
    samples_per_second: float
    epoch_dead_fraction: float
    history: list[dict] = field(default_factory=list)
    signature: dict = field(default_factory=dict)  # run_signature: what a resumption must not change

    def __repr__(self) -> str:
        # The dataclass' own listed the whole learning curve and the SAE's module tree: a notebook
        # cell ending in train(...) printed a record for every logged step.
        scored = [r["heldout_fvu"] for r in self.history if isinstance(r.get("heldout_fvu"), (int, float))]
        fvu = f", last heldout_fvu={scored[-1]:.4f}" if scored else ""
        return (
            f"TrainResult({self.sae!r}, {self.steps} steps in {self.seconds:.1f}s, {self.samples_per_second:,.0f} samples/s, "
            f"epoch_dead_fraction={self.epoch_dead_fraction:.4f}{fvu}; .history holds {len(self.history)} records)"
        )


def _trackers(args: TrainingArguments) -> list[str]:
    if args.report_to == "none":
        return []
    if args.report_to != "auto":
        return [t.strip() for t in args.report_to.split(",") if t.strip()]
    import importlib.util

    return [name for name in ("tensorboard", "trackio") if importlib.util.find_spec(name) is not None]


def make_accelerator(args: TrainingArguments, out_dir: str | Path, device: str | None = None):
    """An `Accelerator` for `args`: the device (or the best one), mixed precision, trackers."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from .base_model import check_device

    probe = torch.device(check_device(device)) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Accelerate keeps one state per process and refuses an Accelerator with another mixed
    # precision or device than the first ("AcceleratorState has already been initialized"):
    # a second run in one process (a notebook, a sweep, the tests) starts its own. The
    # processes' setup (PartialState: ranks, backend) is kept.
    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        mixed_precision=resolve_mixed_precision(args.mixed_precision, probe),
        cpu=probe.type == "cpu",
        log_with=_trackers(args) or None,
        project_dir=str(Path(out_dir) / "logs"),
    )


def train(
    config: SparseAutoencoderConfig,
    args: TrainingArguments,
    embeddings: np.ndarray,
    train_positions: np.ndarray,
    heldout_positions: np.ndarray,
    out_dir: str | Path,
    *,
    data_id: str = "",
    row_ids: np.ndarray | None = None,
    resume: bool = False,
    accelerator=None,
    device: str | None = None,
    resident: bool | None = None,
    log_file: str | Path | None = None,
) -> TrainResult:
    """Train an SAE on `embeddings[train_positions]`; checkpoints and logs go to `out_dir`.

    Args:
        config: the SAE's hyper-parameters; `d_in` must equal the embeddings' dimension.
        embeddings: (n_rows, d_in) array, typically a read-only memory map.
        train_positions, heldout_positions: row positions in `embeddings` (disjoint).
        data_id: identifies the data, so `resume` refuses a run on other data.
        resume: continue from the newest complete checkpoint in `out_dir/checkpoints`.
        accelerator: an `accelerate.Accelerator`; one is made when None.
        resident: keep the training rows on the device (None: when they fit).
        log_file: where the learning curve is written (None: `out_dir/train_log.jsonl`).
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    args.validate()
    out_dir = Path(out_dir)
    if embeddings.ndim != 2 or embeddings.shape[1] != config.d_in:
        raise ConfigError(f"embeddings are {embeddings.shape[1] if embeddings.ndim == 2 else embeddings.shape}-d but the SAE config has d_in={config.d_in}")
    if len(train_positions) < 2:
        raise InputError(f"need at least 2 training rows, got {len(train_positions)}")
    if config.dead_threshold is None:
        config.dead_threshold = len(train_positions)  # one epoch without firing

    if accelerator is None:
        accelerator = make_accelerator(args, out_dir, device)
    dev = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)

    check_finite_rows(embeddings, train_positions, row_ids)
    # The held-out rows too: unchecked, a NaN among them let the whole run train, then failed
    # its evaluation with "values contain NaN or inf", naming no row.
    check_finite_rows(embeddings, heldout_positions, row_ids)
    feed = EmbeddingFeed(embeddings, train_positions, dev, resident=resident)
    heldout_feed = EmbeddingFeed(embeddings, heldout_positions[: args.eval_max_rows], dev, resident=True) if len(heldout_positions) else None

    n_train = len(feed)
    steps_per_epoch = batches_per_epoch(n_train, args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    signature = run_signature(config, args, data_id)

    sample = feed.sample(10_000, args.seed)
    check_input_scale(sample, config, args)
    set_seed(args.seed)
    sae = SparseAutoencoder(config).to(dev)
    sae.init_b_pre_from_data(sample)
    optimizer = torch.optim.Adam(optimizer_groups(sae, args), lr=args.lr, betas=tuple(args.adam_betas), fused=dev.type == "cuda")
    samples_since_fired = torch.zeros(config.n_latents, dtype=torch.long, device=dev)
    epoch_fires = torch.zeros(config.n_latents, dtype=torch.long, device=dev)
    start_step = 0
    dead_features = torch.zeros(0, dtype=torch.long, device=dev)

    # fp16 on an accelerator scales the loss (GradScaler); the scale and its growth count are
    # part of the run's state, so checkpoints carry them (None: bf16, fp32, or fp16 on a CPU).
    scaler = accelerator.scaler if accelerator.scaler is not None and accelerator.scaler.is_enabled() else None
    log_path = Path(log_file) if log_file is not None else out_dir / "train_log.jsonl"
    if main:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    checkpoints = list_checkpoints(out_dir) if resume else []
    restored = None
    for path in reversed(checkpoints):
        try:
            restored = _restore_checkpoint(path, sae, optimizer, signature, out_dir, scaler)
            break
        except SbertSaeError:
            raise
        except Exception as err:  # noqa: BLE001 - a damaged checkpoint, whatever its damage: try the one before
            if main:
                logger.warning("checkpoint %s cannot be read (%s: %s): trying the one before it", path, type(err).__name__, err)
    if checkpoints and restored is None:
        raise _unreadable_checkpoints(out_dir, len(checkpoints))
    if restored is not None:
        state, trainer_tensors = restored
        samples_since_fired = trainer_tensors["samples_since_fired"].to(dev)
        epoch_fires = trainer_tensors["epoch_fires"].to(dev)
        start_step = int(state["global_step"])
        dead_features = trainer_tensors.get("dead_features", dead_features).to(dev)
        every_batch = math.ceil(n_train / args.batch_size)
        if state.get("total_steps") != total_steps and state.get("total_steps") == every_batch * args.epochs:
            # Checkpointed before an epoch's short last batch was left out (SHORT_LAST_BATCH):
            # with today's steps per epoch its steps would fall in other epochs and the schedule
            # end early, a run that is neither the old one nor a new one. It ends as it began.
            steps_per_epoch, total_steps = every_batch, every_batch * args.epochs
        if main:
            logger.info("resuming from %s (step %d of %d)", path, start_step, total_steps)
    elif resume and main:
        logger.info("no checkpoint in %s: starting from the beginning", out_dir)
    if resume and main:
        _truncate_log(log_path, start_step)

    model, optimizer = accelerator.prepare(sae, optimizer)
    unwrapped: SparseAutoencoder = accelerator.unwrap_model(model)
    stats = FiringStats(samples_since_fired, epoch_fires, torch.zeros((), device=dev), torch.zeros((), device=dev))
    precision = accelerator.mixed_precision
    graphed = None
    if _use_graphed_steps(args, dev, world, feed.data is not None, precision):
        autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        graphed = GraphedSteps(unwrapped, stats, autocast_dtype, args.grad_clip, capture=dev.type == "cuda")
        graphed.set_dead(dead_features)
    if accelerator.log_with:
        # Also when resuming: without trackers accelerator.log writes nothing, and the resumed
        # part of the learning curve went nowhere.
        accelerator.init_trackers("sbert-sae", config=tracker_config(args, config))

    history: list[dict] = []
    bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step", disable=not (args.show_progress and main))
    t0 = time.perf_counter()
    samples_done = 0
    step = start_step
    last_dead_epoch = float("nan")
    # Running sums (in `stats`) stay on the device: reading them forces a sync, so only at log time.
    running_steps = 0
    model.train()
    order_epoch, order = -1, None
    last_checkpoint = time.monotonic()
    # Nothing in a step reads a device value on the host: the GPU runs steps back to back.
    while step < total_steps:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order = torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
            order = order.to(feed.index_device)
            order_epoch = epoch
        start = step_in_epoch * args.batch_size
        global_batch = order[start : start + args.batch_size]
        batch_rows = len(global_batch)
        local = global_batch[rank::world]

        if step % DEAD_CHECK_EVERY == 0:
            dead_features = (samples_since_fired >= config.dead_threshold).nonzero().flatten()
            if graphed is not None:
                graphed.set_dead(dead_features)
        lr = learning_rate(step, total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        if graphed is not None:
            out = graphed.run(feed.data, local, batch_rows)
            optimizer.step()
        else:
            # A batch shorter than the processes (an epoch's last) leaves some process no
            # rows: it still takes part in the gradient all-reduce, on one borrowed row whose
            # loss weighs nothing and whose firings are not counted.
            x = feed.batch(local if len(local) else global_batch[:1])
            with accelerator.autocast():
                out = model(x, dead_features=dead_features, check_finite=False)
            if world > 1:
                # Gradients are averaged over the processes: weighted by each one's share of
                # the rows, the average is the global batch's, as one process would take it,
                # also when the rows do not divide evenly.
                accelerator.backward(out.loss * (world * len(local) / batch_rows))
            else:
                accelerator.backward(out.loss)
            unwrapped.remove_gradient_parallel_to_decoder()
            if args.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats.record(out, batch_rows, len(local), reduce=(lambda t: accelerator.reduce(t, reduction="sum")) if world > 1 else None, counted=len(local) > 0)
        unwrapped.set_decoder_norm_to_unit()
        running_steps += 1
        samples_done += batch_rows
        step += 1

        end_of_epoch = step % steps_per_epoch == 0
        if step % args.log_every == 0 or end_of_epoch or step == total_steps:
            record = {
                "step": step,
                "epoch": step / steps_per_epoch,
                "lr": lr,
                "fvu": float(stats.running_fvu) / running_steps,
                "l0": float(stats.running_l0) / running_steps,
                "auxk_loss": float(out.auxk_loss.detach()),
                "dead_fraction": float((samples_since_fired >= config.dead_threshold).float().mean()),
            }
            stats.running_fvu.zero_()
            stats.running_l0.zero_()
            running_steps = 0
            if end_of_epoch:
                last_dead_epoch = float((epoch_fires == 0).float().mean())
                record["epoch_dead_fraction"] = last_dead_epoch
                epoch_fires.zero_()
                if heldout_feed is not None:
                    record["heldout_fvu"] = heldout_fvu(unwrapped, heldout_feed.data)
            history.append(record)
            if main:
                append_jsonl(log_path, record)
                bar.set_postfix(fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}", dead=f"{record['dead_fraction']:.1%}", lr=f"{lr:.1e}")
            if accelerator.log_with:
                accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
        bar.update(1)

        if args.checkpoint_every and step % args.checkpoint_every == 0 and step < total_steps and main:
            # Only the main process writes, from its own copy of the (identical) state; the
            # others need not wait for it, so it may skip one when the last is recent.
            if time.monotonic() - last_checkpoint >= args.checkpoint_min_seconds:
                checkpoint_state = {"global_step": step, "epoch": epoch, "signature": signature, "total_steps": total_steps}
                if scaler is not None:
                    checkpoint_state["grad_scaler"] = scaler.state_dict()  # five numbers: JSON, as the rest of state.json
                save_checkpoint(
                    out_dir,
                    unwrapped,
                    optimizer,
                    checkpoint_state,
                    {"samples_since_fired": samples_since_fired, "epoch_fires": epoch_fires, "dead_features": dead_features},
                    args.keep_checkpoints,
                )
                last_checkpoint = time.monotonic()
        pause_point("step", step)
    bar.close()
    seconds = time.perf_counter() - t0
    if graphed is not None:
        graphed.release()
    if accelerator.log_with:
        # Not accelerator.end_training(): it also destroys the process group, and the
        # processes still meet after training (the held-out metrics, a --per-domain run's next
        # domain): a run of several processes with a tracker failed there.
        for tracker in accelerator.trackers:
            tracker.finish()
    unwrapped.eval()
    return TrainResult(
        sae=unwrapped,
        steps=step,
        seconds=seconds,
        samples_per_second=samples_done / max(seconds, 1e-9),
        epoch_dead_fraction=last_dead_epoch,
        history=history,
        signature=json.loads(json.dumps(signature)),
    )


def tracker_config(args: TrainingArguments, config) -> dict:
    """The run's settings for the trackers' hyper-parameter tables, each an int, float, str or
    bool: TensorBoard refuses any other value (a prompt or truncate_dim puts a dict,
    `base_model_kwargs`, into the SAE's config), so other values go in as JSON text."""
    import json

    out = {k: str(v) for k, v in args.to_dict().items()}
    for key, value in config.to_diff_dict().items():
        out[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value, sort_keys=True, default=str)
    return out


@torch.no_grad()
def heldout_fvu(sae: SparseAutoencoder, x: torch.Tensor, batch_size: int = 4096) -> float:
    """Pooled FVU of `sae` over all rows of `x` (sum of squared errors over total variance)."""
    from .evaluation import fvu_denominator

    was_training = sae.training
    sae.eval()
    inputs, reconstructions = [], []
    for start in range(0, len(x), batch_size):
        prepared = sae.prepare_input(x[start : start + batch_size], check_finite=False)
        reconstructions.append(sae._decode_topk(*sae._topk(sae.pre_activations(prepared), sae.config.k)))
        inputs.append(prepared)
    sae.train(was_training)
    x, x_hat = torch.cat(inputs).float(), torch.cat(reconstructions).float()
    # Rows that are all one text are normalised by their squared norm, as in metrics.json.
    total = fvu_denominator((x - x.mean(dim=0, keepdim=True)).pow(2).sum(), x.pow(2).sum())
    return float((x - x_hat).pow(2).sum() / total.clamp_min(torch.finfo(torch.float32).tiny))


def _diff(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """Every `(key, old value, new value)` that differs, nested keys dotted ("training_args.seed")."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.extend(_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            changes.append((f"{prefix}{key}", a, b))
    return changes
