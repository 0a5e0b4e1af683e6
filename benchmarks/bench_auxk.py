"""Does AuxK revive dead features? The default run trained with and without it, same data and seed.

    python benchmarks/bench_auxk.py --dataset data/wiki
"""

from __future__ import annotations

import argparse

from sbert_sae import SparseAutoencoderConfig
from sbert_sae.data import split_heldout
from sbert_sae.evaluation import feature_fire_counts, reconstruction_metrics
from sbert_sae.pipeline import DataArguments, load_and_embed
from sbert_sae.trainer import TrainingArguments, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="data/wiki")
    parser.add_argument("--n-latents", type=int, default=6144)
    parser.add_argument("-k", type=int, default=32)
    args = parser.parse_args()
    _, cache = load_and_embed(DataArguments(dataset=args.dataset), show_progress=False)
    train_rows, held_rows = split_heldout(cache.row_ids, 0.05, 0)
    train_pos, held_pos = cache.positions(train_rows), cache.positions(held_rows)
    for coef in (1 / 32, 0.0):
        config = SparseAutoencoderConfig(d_in=cache.dim, n_latents=args.n_latents, k=args.k, auxk_coef=coef)
        result = train(config, TrainingArguments(report_to="none", show_progress=False, checkpoint_every=0), cache.embeddings, train_pos, held_pos, "/tmp/sbert-sae-bench-auxk")
        counts = feature_fire_counts(result.sae, cache.embeddings, train_pos)
        fvu = reconstruction_metrics(result.sae, cache.embeddings, held_pos)["fvu"]
        worst = max(h.get("epoch_dead_fraction", 0.0) for h in result.history)
        print(f"auxk_coef={coef:.5f}: dead after training {(counts == 0).mean():.4%}, worst epoch {worst:.4%}, held-out FVU {fvu:.4f}", flush=True)


if __name__ == "__main__":
    main()
