"""The whole pipeline at paper scale, stage by stage: embed, train, label every feature, families.

Runs what a user runs (`sbert-sae train`, `label`, `families`, through the same library
calls) on a corpus from a fresh embedding cache, and prints each stage's wall time, its
rate, peak memory (GPU and process), the SAE's quality, and extrapolations from the
measured rates to the paper's 420k abstracts and to 10M texts. With several
`--max-texts` values it prints how each stage's cost grows with the corpus.

    python examples/build_large_corpus.py data/large
    python benchmarks/bench_pipeline.py --dataset data/large/corpus.parquet --n 9216 -k 64 --epochs 50
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sbert_sae.families import FamilyArguments, run_families  # noqa: E402
from sbert_sae.labels import LabelArguments, label_stage_seconds  # noqa: E402
from sbert_sae.pipeline import DataArguments, SaeArguments, load_and_embed, run_labelling, run_training  # noqa: E402
from sbert_sae.trainer import TrainingArguments  # noqa: E402
from sbert_sae.utils import read_json  # noqa: E402

from measure import peak_gpu_gb, peak_rss_gb, reset_peak, sync, write_results  # noqa: E402


def run_once(args, max_texts: int | None, work: Path) -> dict:
    cache_dir = work / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    out = work / "run"
    data = DataArguments(dataset=args.dataset, text_column=args.text_column, model=args.model, cache_dir=str(cache_dir), max_rows=max_texts, device=args.device)
    stages = {}

    def stage(name, fn, count=None, unit=None):
        sync()
        reset_peak()
        t0 = time.perf_counter()
        value = fn()
        sync()
        seconds = time.perf_counter() - t0
        record = {"seconds": round(seconds, 2), "peak_gpu_gb": peak_gpu_gb(), "peak_rss_gb": peak_rss_gb()}
        if count:
            record[f"{unit}_per_second"] = round(count / seconds, 1)
        stages[name] = record
        print(json.dumps({"texts": max_texts, "stage": name, **record}), flush=True)
        return value

    _, cache = stage("embed", lambda: load_and_embed(data, show_progress=False))
    n_texts = len(cache.row_ids)
    sae_args = SaeArguments(n_latents=args.n, k=args.k)
    train_args = TrainingArguments(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, report_to="none", show_progress=False, log_every=50)
    stages["embed"]["texts_per_second"] = round(n_texts / stages["embed"]["seconds"], 1)
    stage("train", lambda: run_training(data, sae_args, train_args, out, overwrite=True))
    n_train = int(n_texts * (1 - data.heldout_fraction))
    stages["train"]["samples_per_second"] = round(n_train * args.epochs / stages["train"]["seconds"])
    label_summary = stage("label", lambda: run_labelling(out, data, LabelArguments(), show_progress=False))
    # Per labelling stage: wall-clock seconds (stages overlap across two threads) and the CPU
    # seconds of the thread that ran each (see labels.label_stage_seconds).
    stages["label"]["parts"] = label_stage_seconds(label_summary) if isinstance(label_summary, dict) else None
    stages["label"]["features_per_second"] = round(args.n / stages["label"]["seconds"], 1)
    families = stage("families", lambda: run_families(out, data, FamilyArguments(), show_progress=False))
    stages["families"]["inside_compute_families"] = families.summary.get("seconds")
    stages["families"]["parts"] = families.summary.get("seconds_parts")
    print(json.dumps({"label_parts": stages["label"]["parts"], "families_compute_seconds": stages["families"]["inside_compute_families"], "families_parts": stages["families"]["parts"]}), flush=True)
    metrics = read_json(out / "metrics.json")
    total = sum(s["seconds"] for s in stages.values())
    result = {
        "texts": n_texts,
        "n_latents": args.n,
        "k": args.k,
        "epochs": args.epochs,
        "stages": stages,
        "total_seconds": round(total, 1),
        "heldout_fvu": metrics.get("heldout_fvu") or metrics.get("fvu"),
        "label_auroc_mean": metrics.get("label_auroc_mean"),
        "families": len(families.families),
    }
    print(json.dumps({"summary": result}), flush=True)
    return result


def extrapolate(result: dict, texts: int) -> dict:
    """Stage times for `texts` texts at the measured rates: embedding, training and encoding
    grow linearly with the texts; labelling is taken as linear too (its per-feature work is
    capped, its corpus passes are linear), an upper bound for its fixed part."""
    scale = texts / result["texts"]
    times = {name: round(stage["seconds"] * scale, 1) for name, stage in result["stages"].items()}
    return {"texts": texts, "stage_seconds": times, "total_seconds": round(sum(times.values()), 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="data/large/corpus.parquet")
    p.add_argument("--text-column", default="text")
    p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    p.add_argument("--device", default=None)
    p.add_argument("--max-texts", default="", help="comma-separated corpus sizes (default: all texts)")
    p.add_argument("--n", type=int, default=9216)
    p.add_argument("-k", type=int, default=64)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    print(f"pipeline on {device}, torch {torch.__version__}, n={args.n} k={args.k}, {args.epochs} epochs, batch {args.batch_size}", flush=True)
    sizes = [int(v) for v in args.max_texts.split(",") if v] or [None]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        for size in sizes:
            results.append(run_once(args, size, work))
    largest = max(results, key=lambda r: r["texts"])
    report = {"device": device, "runs": results, "extrapolated": [extrapolate(largest, 420_000), extrapolate(largest, 10_000_000)]}
    for line in report["extrapolated"]:
        print(json.dumps({"extrapolated": line}), flush=True)
    write_results(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
