"""Training throughput: sbert-sae's whole trainer against a naive top-k step and SAELens, same run.

For each SAE size, on the same embeddings resident on the device, with the same batch size:
- a naive loop of the paper's top-k step (encoder, top-k, dense decoder, normalised MSE,
  Adam; no AuxK, no decoder constraints, no metrics): the bar measured on an H100 before;
- sbert-sae's `trainer.train` (data feed, AuxK, decoder normalisation and gradient
  projection, learning-rate schedule, firing statistics, per-epoch held-out FVU, logs);
- SAELens' `TopKTrainingSAE` trained by its own `SAETrainer` (benchmarks/saelens_baseline.py),
  when `sae_lens` can be imported.
Printed per size: samples/s, the ratios, held-out FVU of each trained SAE, its dead features
(the share that never fires over one pass of the training rows) and peak memory.
`--precision-check` also trains one SAE in fp32 and in bf16 autocast and compares held-out FVU.

    python benchmarks/bench_train_speed.py --dataset data/large/corpus.parquet --model PATH
    python benchmarks/bench_train_speed.py --dataset data/wiki --sizes 1536:16 --batch-size 1024 --epochs 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sbert_sae.configuration_sbert_sae import SparseAutoencoderConfig  # noqa: E402
from sbert_sae.evaluation import feature_fire_counts  # noqa: E402
from sbert_sae.trainer import TrainingArguments, heldout_fvu, train  # noqa: E402

from measure import peak_gpu_gb, reset_peak, sync, write_results  # noqa: E402


def rounded(figures: dict) -> dict:
    return {key: round(v, 4) if isinstance(v, float) else v for key, v in figures.items()}


def naive_rate(x: torch.Tensor, n: int, k: int, batch: int, steps: int = 60, warmup: int = 10) -> float:
    """Samples/s of the plain top-k step (bf16 autocast on a GPU), as measured before on an H100."""
    device, d = x.device, x.shape[1]
    W_enc = torch.nn.Parameter(torch.randn(n, d, device=device) / d**0.5)
    W_dec = torch.nn.Parameter(W_enc.detach().clone())
    b_enc = torch.nn.Parameter(torch.zeros(n, device=device))
    b_pre = torch.nn.Parameter(x[:1000].median(0).values.clone())
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_pre], lr=1e-4)
    use_bf16 = device.type == "cuda"

    def step(xb):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            pre = (xb - b_pre) @ W_enc.T + b_enc
            vals, idx = pre.topk(k, dim=-1)
            z = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
            x_hat = z @ W_dec + b_pre
            loss = (x_hat.float() - xb).pow(2).sum() / (xb - xb.mean(0)).pow(2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    g = torch.Generator(device=device).manual_seed(0)
    batches = [x[torch.randint(len(x), (batch,), device=device, generator=g)] for _ in range(8)]
    for i in range(warmup):
        step(batches[i % 8])
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[i % 8])
    sync(device)
    return steps * batch / (time.perf_counter() - t0)


def ours(
    embeddings: np.ndarray, train_pos, held_pos, n: int, k: int, batch: int, epochs: int, lr: float, precision: str, device: str,
    schedule: str = "cosine", cuda_graphs: bool = True, sae_settings: dict | None = None, training_settings: dict | None = None,
) -> dict:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # each run picks its own mixed precision
    config = SparseAutoencoderConfig(d_in=embeddings.shape[1], n_latents=n, k=k, **(sae_settings or {}))
    args = TrainingArguments(
        epochs=epochs, batch_size=batch, lr=lr, lr_schedule=schedule, report_to="none", show_progress=False, checkpoint_every=0,
        log_every=50, mixed_precision=precision, cuda_graphs=cuda_graphs, eval_max_rows=len(held_pos), **(training_settings or {}),
    )
    with tempfile.TemporaryDirectory() as out:
        result = train(config, args, embeddings, train_pos, held_pos, out, device=device)
    held = torch.from_numpy(np.ascontiguousarray(embeddings[held_pos])).to(result.sae.device)
    curve = [r["heldout_fvu"] for r in result.history if "heldout_fvu" in r]  # after each epoch, all held-out rows
    return {
        "samples_per_second": result.samples_per_second, "seconds": result.seconds, "heldout_fvu": heldout_fvu(result.sae, held),
        "dead_fraction": float((feature_fire_counts(result.sae, embeddings, train_pos) == 0).mean()),
        "steps": result.steps, "lr": lr, "decoder_lr_scale": args.decoder_lr_scale, "lr_schedule": schedule, "cuda_graphs": cuda_graphs and torch.device(device).type == "cuda", "heldout_fvu_per_epoch": [round(v, 4) for v in curve],
    }


def seconds_to_reach(run: dict, target: float) -> float | None:
    """Training seconds until the run's held-out FVU (measured after each epoch) first reaches
    `target`, at its average rate (None when it never does)."""
    curve = run["heldout_fvu_per_epoch"]
    for epoch, value in enumerate(curve, start=1):
        if value <= target:
            return run["seconds"] * epoch / len(curve)
    return None


def load_embeddings(args) -> np.ndarray:
    if args.embeddings:
        return np.load(args.embeddings, mmap_mode="r")
    from sbert_sae.data import load_text_dataset
    from sbert_sae.embeddings import embed_dataset

    ds = load_text_dataset(args.dataset)
    return embed_dataset(ds, args.text_column, args.model, cache_dir=args.cache_dir).embeddings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="data/wiki")
    p.add_argument("--text-column", default="text")
    p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    p.add_argument("--embeddings", default=None, help="a (rows, dim) .npy instead of --dataset")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--rows", type=int, default=None, help="train and hold out on this many rows, drawn at random (seed 0) from the embeddings (default: all)")
    p.add_argument("--device", default=None)
    p.add_argument("--sizes", default="6144:32,24576:64,98304:64", help="n_latents:k, comma separated")
    p.add_argument("--batch-size", type=int, default=16384)
    p.add_argument("--epochs", type=int, default=None, help="default: enough for ~4M samples")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of both trainers")
    p.add_argument("--our-lr", type=float, default=None, help="sbert-sae's own learning rate (default: --lr)")
    p.add_argument("--our-decoder-lr-scale", type=float, default=None, help="sbert-sae's decoder learning rate as a multiple of its lr (default: the trainer's)")
    p.add_argument("--our-schedule", default="cosine", help="sbert-sae's learning-rate schedule")
    p.add_argument("--eager", action="store_true", help="also train sbert-sae without CUDA graphs (GPU)")
    p.add_argument("--our-auxk-coef", type=float, default=None, help="sbert-sae's AuxK weight (default: the config's, 1/32; SAELens uses 1)")
    p.add_argument("--our-encoder-init-scale", type=float, default=None, help="norm of sbert-sae's encoder rows at initialisation (default: the config's, 0.1)")
    p.add_argument("--our-k-aux", type=int, default=None, help="sbert-sae's AuxK width (default: 2k; SAELens uses d_in / 2)")
    p.add_argument("--heldout", type=int, default=None, help="held-out rows (default: 10,000, or a tenth of the rows when fewer than 100,000)")
    p.add_argument("--no-saelens", action="store_true")
    p.add_argument("--precision-check", default=None, help="n:k:batch:epochs of an SAE trained in fp32 and bf16 (GPU)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    embeddings = load_embeddings(args)
    if args.rows is not None and args.rows < len(embeddings):
        embeddings = np.ascontiguousarray(embeddings[np.sort(np.random.default_rng(0).permutation(len(embeddings))[: args.rows])])
    rng = np.random.default_rng(0)
    order = rng.permutation(len(embeddings))
    if args.heldout is None:
        args.heldout = min(10_000, len(embeddings) // 10)
    if not 0 < args.heldout <= len(embeddings) - 2 * args.batch_size:
        p.error(f"--heldout {args.heldout} leaves too few of the {len(embeddings)} rows to train on (at least 2 batches of {args.batch_size})")
    held_pos, train_pos = np.sort(order[: args.heldout]), np.sort(order[args.heldout :])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{len(train_pos)} training / {len(held_pos)} held-out rows, dim {embeddings.shape[1]}, batch {args.batch_size}, device {name}, torch {torch.__version__}", flush=True)
    x_train = torch.from_numpy(np.ascontiguousarray(embeddings[train_pos], dtype=np.float32)).to(device)
    x_held = torch.from_numpy(np.ascontiguousarray(embeddings[held_pos], dtype=np.float32)).to(device)

    saelens = None
    if not args.no_saelens:
        try:
            from saelens_baseline import train_saelens_topk

            saelens = train_saelens_topk
        except ImportError as err:
            print(f"SAELens not measured: {err}", flush=True)

    sae_settings = {key: value for key, value in (("auxk_coef", args.our_auxk_coef), ("k_aux", args.our_k_aux), ("encoder_init_scale", args.our_encoder_init_scale)) if value is not None}
    training_settings = {} if args.our_decoder_lr_scale is None else {"decoder_lr_scale": args.our_decoder_lr_scale}
    results = {"device": name, "rows": len(train_pos), "batch_size": args.batch_size, "sae_settings": sae_settings, "training_settings": training_settings, "sizes": []}
    # Warm-up: CUDA context, cuBLAS handles and kernels, outside any timing.
    ours(embeddings, train_pos[: 4 * args.batch_size], held_pos, 1024, 16, args.batch_size, 1, args.lr, "auto", str(device))
    for spec in args.sizes.split(","):
        n, k = (int(v) for v in spec.split(":"))
        epochs = args.epochs or max(2, round(4_000_000 / len(train_pos)))
        row = {"n_latents": n, "k": k, "epochs": epochs}
        reset_peak(device)
        row["naive_step_samples_per_second"] = round(naive_rate(x_train, n, k, args.batch_size))
        reset_peak(device)
        our_lr = args.our_lr or args.lr
        mine = ours(embeddings, train_pos, held_pos, n, k, args.batch_size, epochs, our_lr, "auto", str(device), args.our_schedule, sae_settings=sae_settings, training_settings=training_settings)
        row["sbert_sae"] = rounded(mine)
        row["sbert_sae"]["peak_gpu_gb"] = peak_gpu_gb(device)
        row["sbert_sae_vs_naive"] = round(mine["samples_per_second"] / row["naive_step_samples_per_second"], 2)
        if args.eager and device.type == "cuda":
            reset_peak(device)
            eager = ours(embeddings, train_pos, held_pos, n, k, args.batch_size, epochs, our_lr, "auto", str(device), args.our_schedule, cuda_graphs=False, sae_settings=sae_settings, training_settings=training_settings)
            row["sbert_sae_eager"] = rounded(eager)
            row["sbert_sae_eager"]["peak_gpu_gb"] = peak_gpu_gb(device)
            row["cuda_graphs_speedup"] = round(mine["samples_per_second"] / eager["samples_per_second"], 2)
        if saelens is not None:
            reset_peak(device)
            try:
                theirs = saelens(x_train, x_held, n, k, args.batch_size, epochs, args.lr)
                row["saelens"] = rounded(theirs)
                row["saelens"]["peak_gpu_gb"] = peak_gpu_gb(device)
                row["sbert_sae_vs_saelens"] = round(mine["samples_per_second"] / theirs["samples_per_second"], 2)
                # At equal held-out FVU: SAELens' training time against ours until our held-out
                # FVU first reaches SAELens' final one.
                reach = seconds_to_reach(mine, theirs["heldout_fvu"])
                row["sbert_sae_seconds_to_saelens_fvu"] = None if reach is None else round(reach, 3)
                row["sbert_sae_vs_saelens_at_equal_fvu"] = None if reach is None else round(theirs["seconds"] / reach, 2)
            except Exception as err:  # noqa: BLE001 - the baseline failing must not hide our figures
                row["saelens"] = {"error": f"{type(err).__name__}: {err}"}
        results["sizes"].append(row)
        print(json.dumps(row), flush=True)

    if args.precision_check:
        n, k, batch, epochs = (int(v) for v in args.precision_check.split(":"))
        check = {"n_latents": n, "k": k, "batch_size": batch, "epochs": epochs}
        for precision in ("no", "bf16"):
            got = ours(embeddings, train_pos, held_pos, n, k, batch, epochs, args.lr, precision, str(device))
            check["fp32" if precision == "no" else "bf16"] = rounded(got)
        check["heldout_fvu_relative_difference"] = round(check["bf16"]["heldout_fvu"] / check["fp32"]["heldout_fvu"] - 1, 4)
        results["precision_check"] = check
        print(json.dumps({"precision_check": check}), flush=True)
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
