"""Held-out FVU with an epoch's last batch of a few rows trained on ("keep", as before) or left
out ("drop", `trainer.SHORT_LAST_BATCH`), on cached all-MiniLM-L6-v2 embeddings of the offline
Wikipedia corpus.

    python benchmarks/bench_last_batch.py --configs 4096:8197,1024:8197,256:8965

Each config is `batch_size:training_rows`, chosen so that the last batch holds 5 rows. The
same 1,000 rows (drawn with seed 1234) are held out for every run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from sbert_sae import SparseAutoencoderConfig  # noqa: E402
from sbert_sae import trainer as T  # noqa: E402
from sbert_sae.pipeline import DataArguments, load_and_embed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(ROOT / "data" / "wiki"))
    parser.add_argument("--configs", default="4096:8197,1024:8197,256:8965", help="batch_size:training_rows pairs")
    parser.add_argument("--modes", default="keep,drop")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n", type=int, default=3072)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--heldout", type=int, default=1000)
    parser.add_argument("--out", default="/tmp/bench_last_batch")
    args = parser.parse_args()

    if not Path(args.dataset).exists():
        from build_wiki_dataset import build

        build(args.dataset)
    _, cache = load_and_embed(DataArguments(dataset=args.dataset), show_progress=False)
    emb = cache.embeddings
    perm = np.random.default_rng(1234).permutation(len(emb))
    held, pool = np.sort(perm[: args.heldout]), perm[args.heldout :]
    print(f"{len(emb)} rows, {args.heldout} held out, n={args.n} k={args.k} epochs={args.epochs}", flush=True)
    dropping = T.batches_per_epoch
    for spec in args.configs.split(","):
        batch_size, n_train = map(int, spec.split(":"))
        train_pos = np.sort(pool[:n_train])
        results: dict[str, list[float]] = {}
        for mode in args.modes.split(","):
            T.batches_per_epoch = dropping if mode == "drop" else (lambda n, b: math.ceil(n / b))
            for seed in map(int, args.seeds.split(",")):
                targs = T.TrainingArguments(epochs=args.epochs, batch_size=batch_size, seed=seed, report_to="none", show_progress=False, checkpoint_every=0)
                t0 = time.time()
                result = T.train(SparseAutoencoderConfig(d_in=emb.shape[1], n_latents=args.n, k=args.k), targs, emb, train_pos, held, f"{args.out}/{mode}-{batch_size}-{seed}")
                fvu = T.heldout_fvu(result.sae, torch.from_numpy(np.ascontiguousarray(emb[held])))
                results.setdefault(mode, []).append(fvu)
                print(f"batch {batch_size}, {n_train} rows, {mode} seed {seed}: held-out FVU {fvu:.4f} ({result.steps} steps, {time.time() - t0:.0f}s)", flush=True)
        T.batches_per_epoch = dropping
        for mode, values in results.items():
            print(f"batch {batch_size}, {n_train} rows, {mode}: mean {np.mean(values):.4f} [{', '.join(f'{v:.4f}' for v in values)}]", flush=True)


if __name__ == "__main__":
    main()
