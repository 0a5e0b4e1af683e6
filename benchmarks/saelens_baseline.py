"""SAELens baseline: train SAELens' own top-k SAE on an in-memory embeddings tensor.

Measures training throughput (samples/s) and held-out FVU of
``sae_lens.TopKTrainingSAE`` trained by ``sae_lens.training.sae_trainer.SAETrainer.fit``
(SAELens' own loop: Adam, grad-norm clip 1.0, lr scheduler, dead-latent tracking,
AuxK loss, bf16 autocast when ``autocast=True``), fed with shuffled batches drawn
from the tensor on its own device. No LanguageModelSAETrainingRunner / ActivationsStore.

SAELens defaults are kept: ``rescale_acts_by_decoder_norm=True`` (top-k on
pre-activations scaled by decoder row norms; the decoder is not renormalised per
step), ``decoder_init_norm=0.1``, W_enc = W_dec.T at init, b_dec = 0,
``apply_b_dec_to_input=True``, AuxK coefficient 1 with k_aux = d_in // 2, a latent is
dead after ``dead_feature_window`` (1000) steps without firing, constant lr.

GPU machine (no internet): carry ``.whl`` and run first
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target /tmp/site .whl/saelens/*.whl && export PYTHONPATH=/tmp/site
sae_lens imports ``wandb`` at module level but only calls it when logging to wandb
(off here); when wandb is not installed a bare placeholder module stands in for it
during the import only, so its 20 MB wheel need not travel.

CPU smoke test:  python benchmarks/saelens_baseline.py
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import sys
import time
import types

import torch


def _import_sae_lens():
    stub = importlib.util.find_spec("wandb") is None
    if stub:
        mod = types.ModuleType("wandb")
        mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        sys.modules["wandb"] = mod
    try:
        import sae_lens
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer
    finally:
        if stub:  # others in this process still see wandb as absent
            sys.modules.pop("wandb", None)
    return sae_lens.__version__, TopKTrainingSAE, TopKTrainingSAEConfig, SAETrainerConfig, SAETrainer


def _batches(x: torch.Tensor, batch_size: int, epochs: int, gen: torch.Generator):
    steps = x.shape[0] // batch_size  # drop the last partial batch
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], device=x.device, generator=gen)
        for i in range(steps):
            yield x[perm[i * batch_size : (i + 1) * batch_size]]


@torch.no_grad()
def _fvu(sae, x: torch.Tensor, chunk: int = 8192) -> float:
    sae.eval()
    mean = x.double().mean(0)
    err = tot = 0.0
    for xb in x.split(chunk):
        err += (sae(xb).double() - xb.double()).pow(2).sum().item()
        tot += (xb.double() - mean).pow(2).sum().item()
    return err / tot


@torch.no_grad()
def _dead_fraction(sae, x: torch.Tensor, chunk: int = 8192) -> float:
    """Share of features that never fire over one pass of `x`."""
    sae.eval()
    fired = None
    for xb in x.split(chunk):
        batch_fired = (sae.encode(xb) > 0).any(dim=0)
        fired = batch_fired if fired is None else fired | batch_fired
    return float((~fired).float().mean())


def train_saelens_topk(
    train: torch.Tensor,
    heldout: torch.Tensor,
    n_latents: int,
    k: int,
    batch_size: int,
    epochs: int,
    lr: float,
    seed: int = 0,
    autocast: bool | None = None,
    warmup_steps: int = 5,
    dead_feature_window: int = 1000,
) -> dict:
    """Train SAELens' TopKTrainingSAE with SAETrainer; time only ``fit()``.

    ``autocast`` (default: on for CUDA) is SAELens' bf16 autocast. Warm-up runs
    ``warmup_steps`` trainer steps on a throwaway SAE of the same shape first.
    """
    version, SAE, SAECfg, TrainerCfg, Trainer = _import_sae_lens()
    dev = train.device
    cuda = dev.type == "cuda"
    autocast = cuda if autocast is None else autocast
    steps = epochs * (train.shape[0] // batch_size)

    def make(total_steps: int, passes: int):
        sae = SAE(SAECfg(d_in=train.shape[1], d_sae=n_latents, k=k, device=str(dev)))
        cfg = TrainerCfg(
            total_training_samples=total_steps * batch_size,
            train_batch_size_samples=batch_size,
            lr=lr,
            lr_end=lr / 10,  # as LanguageModelSAERunnerConfig; unused by "constant"
            device=str(dev),
            autocast=autocast,
            dead_feature_window=dead_feature_window,
        )
        gen = torch.Generator(device=dev).manual_seed(seed)
        return Trainer(cfg=cfg, sae=sae, data_provider=_batches(train, batch_size, passes, gen))

    warm = make(warmup_steps, passes=warmup_steps)  # enough batches even when one pass holds fewer than warmup_steps
    for _ in range(warmup_steps):
        warm.step(next(warm.data_provider))
    del warm
    if cuda:
        torch.cuda.synchronize(dev)

    torch.manual_seed(seed)
    trainer = make(steps, passes=epochs)
    t0 = time.perf_counter()
    sae = trainer.fit()
    if cuda:
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    return {
        "samples_per_second": steps * batch_size / seconds,
        "seconds": seconds,
        "heldout_fvu": _fvu(sae, heldout),
        "dead_fraction": _dead_fraction(sae, train),
        "sae_lens_version": version,
        "steps": trainer.n_training_steps,
        "autocast_bf16": autocast,
    }


def _toy_data(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Sparse combinations of random unit directions plus noise."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(4 * d, d, generator=g), dim=1)
    codes = torch.rand(n, 4 * d, generator=g) * (torch.rand(n, 4 * d, generator=g) < 0.02)
    return codes @ atoms + 0.01 * torch.randn(n, d, generator=g)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help=".npy float matrix (default: toy data)")
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--latents", type=int, default=512)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--heldout-frac", type=float, default=0.1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    if a.data is None:
        x = _toy_data(a.n, a.d)
    else:  # .npy only: nothing is unpickled
        import numpy as np

        x = torch.from_numpy(np.load(a.data, allow_pickle=False))
    x = x.float().to(a.device)
    n_held = int(len(x) * a.heldout_frac)
    res = train_saelens_topk(
        x[n_held:], x[:n_held], a.latents, a.k, a.batch_size, a.epochs, a.lr
    )
    print(json.dumps(res, indent=2))
