"""The SAE and its trainer against the recipe written out in plain torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sbert_sae import SparseAutoencoder, SparseAutoencoderConfig


def _nmse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The paper's normalised MSE: MSE(x_hat, x) / MSE(mean(x), x)."""
    return ((x_hat - x) ** 2).mean() / ((x - x.mean(0)) ** 2).mean()


def _reference_loss(params: dict, x: torch.Tensor, k: int, k_aux: int, auxk_coef: float, dead: torch.Tensor):
    """ReLU(TopK_k(W_enc (x - b_pre) + b_enc)), decoded with W_dec and b_pre; AuxK decodes (no
    bias) the top-k_aux pre-activations of the dead features, rectified with a straight-through
    gradient, against the detached residual."""
    x = F.normalize(x, dim=1)
    pre = (x - params["b_pre"]) @ params["W_enc"].T + params["b_enc"]
    values, indices = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, indices, F.relu(values))
    x_hat = z @ params["W_dec"] + params["b_pre"]
    loss = _nmse(x_hat, x)
    if dead.any():
        aux_values, aux_indices = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, int(dead.sum())), dim=1)
        aux_values = aux_values + (F.relu(aux_values) - aux_values).detach()
        residual = (x - x_hat).detach()
        loss = loss + auxk_coef * _nmse(torch.zeros_like(pre).scatter(1, aux_indices, aux_values) @ params["W_dec"], residual)
    return loss, (z > 0).any(0)


def test_forward_and_gradients_equal_the_recipe_in_plain_torch():
    torch.manual_seed(0)
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=16, n_latents=64, k=4, k_aux=8, auxk_coef=0.25))
    x = torch.randn(32, 16) + 0.3
    sae.init_b_pre_from_data(x)
    with torch.no_grad():
        sae.b_enc.normal_()
    for n_dead in (0, 3, 20):  # none, fewer than k_aux, more
        dead = torch.zeros(64, dtype=torch.bool)
        dead[torch.randperm(64, generator=torch.Generator().manual_seed(n_dead))[:n_dead]] = True
        sae.zero_grad()
        out = sae(x, dead_mask=dead)
        out.loss.backward()
        params = {name: p.detach().clone().requires_grad_() for name, p in sae.named_parameters()}
        expected, _ = _reference_loss(params, x, 4, 8, 0.25, dead)
        expected.backward()
        torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-5, atol=1e-6)
        for name, p in sae.named_parameters():
            torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-4, atol=1e-6, msg=f"{name}, {n_dead} dead")


def test_the_trainer_takes_the_steps_of_the_recipe_in_plain_torch(tmp_path):
    """`train` (one process, fp32) against the loop written out: median b_pre, shuffled epochs,
    warm-up and cosine decay, the decoder's own rate, AuxK on features silent for
    `dead_threshold` samples, the gradient along each decoder row removed, clipping, Adam,
    decoder rows back to unit norm."""
    from sbert_sae.trainer import DEAD_CHECK_EVERY, TrainingArguments, train

    rng = np.random.default_rng(0)
    data = (rng.normal(size=(300, 16)) * rng.uniform(0.1, 3, size=16) + 0.5).astype(np.float32)
    train_rows = np.arange(20, 300)
    args = TrainingArguments(epochs=4, batch_size=32, lr=3e-3, decoder_lr_scale=10.0, warmup_fraction=0.1, grad_clip=0.05, seed=3, report_to="none", show_progress=False, checkpoint_every=0)
    config = SparseAutoencoderConfig(d_in=16, n_latents=64, k=4, dead_threshold=64)
    result = train(config, args, data, train_rows, np.arange(20), tmp_path)
    assert any(r["auxk_loss"] > 0 for r in result.history), "no feature died: AuxK was not exercised"

    torch.manual_seed(args.seed)
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=16, n_latents=64, k=4))  # the recipe's initialisation (test_model)
    x_train = torch.from_numpy(data[train_rows])
    params = {name: p.detach().clone() for name, p in sae.named_parameters()}
    params["b_pre"] = F.normalize(x_train, dim=1).median(dim=0).values
    for p in params.values():
        p.requires_grad_()
    adam = torch.optim.Adam([{"params": [params["W_enc"], params["b_enc"], params["b_pre"]]}, {"params": [params["W_dec"]]}], lr=args.lr, betas=args.adam_betas)
    steps_per_epoch = math.ceil(len(train_rows) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = int(args.warmup_fraction * total)
    silent = torch.zeros(64, dtype=torch.long)
    dead = torch.zeros(64, dtype=torch.bool)
    for step in range(total):
        epoch, i = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        x = x_train[order[i * args.batch_size : (i + 1) * args.batch_size]]
        if step % DEAD_CHECK_EVERY == 0:
            dead = silent >= config.dead_threshold
        rate = args.lr * (step + 1) / warmup if step < warmup else args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        adam.param_groups[0]["lr"], adam.param_groups[1]["lr"] = rate, rate * args.decoder_lr_scale
        adam.zero_grad()
        loss, fired = _reference_loss(params, x, 4, 8, config.auxk_coef, dead)
        loss.backward()
        with torch.no_grad():
            W = params["W_dec"]
            W.grad -= (W.grad * W).sum(1, keepdim=True) * W
            torch.nn.utils.clip_grad_norm_(list(params.values()), args.grad_clip)
            adam.step()
            W /= W.norm(dim=1, keepdim=True)
        silent += len(x)
        silent[fired] = 0
    for name, p in result.sae.named_parameters():
        torch.testing.assert_close(p.detach(), params[name].detach(), rtol=1e-4, atol=1e-5, msg=name)


def test_a_run_resumed_while_features_are_dead_ends_bitwise_equal(tmp_path, training_crashes_at_step):
    """Resumed from a checkpoint taken between two dead-feature checks, with AuxK at work, the
    run continues as it would have: counters, dead ids, Adam's moments, data order and rate."""
    from sbert_sae.trainer import TrainingArguments, train

    rng = np.random.default_rng(0)
    data = (rng.normal(size=(300, 16)) * rng.uniform(0.1, 3, size=16)).astype(np.float32)
    args = TrainingArguments(epochs=4, batch_size=32, seed=5, report_to="none", show_progress=False, checkpoint_every=5, checkpoint_min_seconds=0, log_every=1)

    def run(out):
        config = SparseAutoencoderConfig(d_in=16, n_latents=64, k=4, dead_threshold=64)
        return train(config, args, data, np.arange(20, 300), np.arange(20), out, resume=True)

    whole = run(tmp_path / "whole")
    with training_crashes_at_step(23), pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "broken")
    resumed = run(tmp_path / "broken")
    assert resumed.history[0]["step"] == 21  # from the checkpoint of step 20, dead ids of step 16
    assert any(r["auxk_loss"] > 0 for r in whole.history if r["step"] > 20), "AuxK not at work after the checkpoint"
    for name, tensor in whole.sae.state_dict().items():
        assert torch.equal(tensor, resumed.sae.state_dict()[name]), name
    assert resumed.history == whole.history[20:]
