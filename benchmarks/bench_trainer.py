"""Held-out quality of sbert-sae's trainer against a plain loop of the paper's recipe.

Both train the same SparseAutoencoder on the same cached MiniLM embeddings of the offline
Wikipedia corpus, with the same 10% held out. The plain loop is the paper's recipe as
published (Adam at a constant learning rate, shuffled batches, grad clip 1.0, unit-norm
decoder with the parallel gradient removed, AuxK), tuned fairly: a grid of learning rate
and batch size, and for each its best epoch count chosen on the held-out set itself (an
oracle early stop, which favours the reference). sbert-sae's trainer runs with its
defaults (warm-up + cosine decay; or over a grid given on the command line).

    python benchmarks/bench_trainer.py --out benchmarks/results/trainer.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from sbert_sae import SparseAutoencoder, SparseAutoencoderConfig  # noqa: E402
from sbert_sae.data import split_heldout  # noqa: E402
from sbert_sae.pipeline import DataArguments, load_and_embed  # noqa: E402
from sbert_sae.trainer import TrainingArguments, heldout_fvu, train  # noqa: E402


def plain_reference_loop(x_train, x_held, n, k, lr, batch_size, eval_epochs, seed=0):
    """The paper's loop, written out plainly; returns {epoch: held-out FVU}."""
    torch.manual_seed(seed)
    # The paper's initialisation (encoder = decoder transposed, rows of unit norm), not
    # sbert-sae's smaller encoder: the reference must not inherit the library's defaults.
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=x_train.shape[1], n_latents=n, k=k, encoder_init_scale=1.0))
    sae.init_b_pre_from_data(x_train[torch.randperm(len(x_train))[:10_000]])
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(n, dtype=torch.long)
    threshold = len(x_train)  # dead after one epoch without firing
    scores = {}
    for epoch in range(1, max(eval_epochs) + 1):
        for batch in torch.randperm(len(x_train)).split(batch_size):
            out = sae(x_train[batch], dead_mask=since_fired >= threshold, check_finite=False)
            out.loss.backward()
            sae.remove_gradient_parallel_to_decoder()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            sae.set_decoder_norm_to_unit()
            fired = torch.zeros(n, dtype=torch.bool)
            fired[out.latent_indices[out.latent_values > 0]] = True
            since_fired += len(batch)
            since_fired[fired] = 0
        if epoch in eval_epochs:
            scores[epoch] = heldout_fvu(sae, x_held)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(ROOT / "data" / "wiki"))
    parser.add_argument("--sizes", default="3072:32,6144:64", help="n:k pairs")
    parser.add_argument("--ref-lrs", default="1e-3,3e-3")
    parser.add_argument("--ref-batches", default="256,1024")
    parser.add_argument("--ref-epochs", default="5,10,20,30")
    defaults = TrainingArguments()
    parser.add_argument("--our-lrs", default=str(defaults.lr), help="default: sbert-sae's default only")
    parser.add_argument("--our-epochs", default=str(defaults.epochs))
    parser.add_argument("--our-batches", default=str(defaults.batch_size))
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    if not Path(args.dataset).exists():
        from build_wiki_dataset import build

        build(args.dataset)
    _, cache = load_and_embed(DataArguments(dataset=args.dataset))
    train_rows, held_rows = split_heldout(cache.row_ids, 0.10, seed=0)
    train_pos, held_pos = cache.positions(train_rows), cache.positions(held_rows)
    x_train = torch.from_numpy(np.array(cache.embeddings[train_pos]))
    x_held = torch.from_numpy(np.array(cache.embeddings[held_pos]))
    print(f"{len(train_pos)} training / {len(held_pos)} held-out texts, dim {cache.dim}, {torch.get_num_threads()} threads", flush=True)

    results = {"n_train": len(train_pos), "n_heldout": len(held_pos), "sizes": []}
    eval_epochs = sorted(int(e) for e in args.ref_epochs.split(","))
    for pair in args.sizes.split(","):
        n, k = (int(v) for v in pair.split(":"))
        entry = {"n_latents": n, "k": k, "reference": [], "sbert_sae": []}
        for lr in (float(v) for v in args.ref_lrs.split(",")):
            for bs in (int(v) for v in args.ref_batches.split(",")):
                t0 = time.perf_counter()
                scores = plain_reference_loop(x_train, x_held, n, k, lr, bs, eval_epochs)
                best = min(scores, key=scores.get)
                row = {"lr": lr, "batch_size": bs, "heldout_fvu_by_epoch": scores, "best_epoch": best, "heldout_fvu": scores[best], "seconds": time.perf_counter() - t0}
                entry["reference"].append(row)
                print(f"n={n} k={k} reference lr={lr:g} batch={bs}: " + ", ".join(f"ep{e} {v:.4f}" for e, v in scores.items()), flush=True)
        for lr, bs, epochs in itertools.product(
            (float(v) for v in args.our_lrs.split(",")),
            [int(v) for v in args.our_batches.split(",")],
            [int(v) for v in args.our_epochs.split(",")],
        ):
            t0 = time.perf_counter()
            targs = TrainingArguments(epochs=epochs, lr=lr, batch_size=bs, checkpoint_every=0, show_progress=False, report_to="none", eval_max_rows=1)
            config = SparseAutoencoderConfig(d_in=cache.dim, n_latents=n, k=k)
            res = train(config, targs, cache.embeddings, train_pos, held_pos, Path("/tmp/bench-trainer-run"), resident=True)
            fvu = heldout_fvu(res.sae, x_held)
            entry["sbert_sae"].append({"lr": lr, "batch_size": bs, "epochs": epochs, "heldout_fvu": fvu, "seconds": time.perf_counter() - t0})
            print(f"n={n} k={k} sbert-sae lr={lr:g} batch={bs} epochs={epochs}: {fvu:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
        best_ref = min(entry["reference"], key=lambda r: r["heldout_fvu"])
        best_ours = min(entry["sbert_sae"], key=lambda r: r["heldout_fvu"])
        entry["best_reference"], entry["best_sbert_sae"] = best_ref, best_ours
        print(
            f"n={n} k={k}: best reference {best_ref['heldout_fvu']:.4f} (lr {best_ref['lr']:g}, batch {best_ref['batch_size']}, epoch {best_ref['best_epoch']}); "
            f"best sbert-sae {best_ours['heldout_fvu']:.4f} (lr {best_ours['lr']:g}, batch {best_ours['batch_size']}, {best_ours['epochs']} epochs)",
            flush=True,
        )
        results["sizes"].append(entry)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
