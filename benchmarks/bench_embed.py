"""Embedding throughput: sbert-sae's TextEncoder against `SentenceTransformer.encode`, same run.

Both embed the same texts with the same model on the same device, warm (one untimed
pass first). Printed: texts/s of each, the ratio to warm fp32 `encode`, the cosine of
each method's vectors to fp32 `encode`'s, the tokenizer alone (the ceiling on a GPU) and
peak memory. Runs on any device:

    python benchmarks/bench_embed.py --dataset data/wiki                 # GPU if there is one
    python benchmarks/bench_embed.py --dataset data/wiki --device cpu --max-texts 1000
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sbert_sae.base_model import DEFAULT_MODEL, load_sentence_transformer  # noqa: E402
from sbert_sae.data import find_text_rows, load_text_dataset  # noqa: E402
from sbert_sae.text_encoder import EncodeSettings, TextEncoder  # noqa: E402
from sbert_sae.utils import usable_cores  # noqa: E402

from measure import peak_gpu_gb, peak_rss_gb, reset_peak, sync, write_results  # noqa: E402


def timed(fn, device, repeats: int):
    """Best of `repeats` warm runs (seconds) and the last result."""
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times), out


def cgroup_cpu_max() -> str | None:
    """The container's CPU quota ("quota period" in microseconds, or "max"), where cgroup v2 tells it."""
    try:
        return Path("/sys/fs/cgroup/cpu.max").read_text().strip()
    except OSError:
        return None


def cosine_to(reference: np.ndarray, vectors: np.ndarray) -> tuple[float, float]:
    a = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    b = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cos = (a * b).sum(1)
    return float(cos.min()), float(cos.mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="data/wiki")
    p.add_argument("--text-column", default="text")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default=None)
    p.add_argument("--max-texts", type=int, default=None)
    p.add_argument("--where", action="append", default=[], help="COLUMN=VALUE: keep only such rows (repeatable)")
    p.add_argument("--encode-batch", type=int, default=None, help="encode's batch size (default: 32 on a CPU; 128 and 512 tried on a GPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="fp16:4:65536,fp16:8:65536,fp16:4:131072,fp16:8:32768,bf16:4:65536,fp32:4:65536", help="precision:workers:max_batch_tokens, comma separated (GPU)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ds = load_text_dataset(args.dataset)
    for condition in args.where:
        column, value = condition.split("=", 1)
        ds = ds.filter(lambda v, value=value: v == value, input_columns=[column])
    rows = find_text_rows(ds, args.text_column)
    ids = rows.row_ids if args.max_texts is None else rows.row_ids[: args.max_texts]
    texts = ds.select(ids)[args.text_column]
    model = load_sentence_transformer(args.model, device=str(device)).float()
    n_tokens = sum(len(e.ids) for e in model.tokenizer.backend_tokenizer.encode_batch(texts[:2000])) / min(2000, len(texts))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{len(texts)} texts, ~{n_tokens:.0f} tokens each (first 2000), model {args.model}, device {name}, torch {torch.__version__}", flush=True)
    results = {"texts": len(texts), "device": name, "mean_tokens": n_tokens, "rows": []}

    def report(label: str, seconds: float, vectors: np.ndarray | None, reference: np.ndarray | None, base: float | None):
        rate = len(texts) / seconds
        row = {"method": label, "seconds": round(seconds, 3), "texts_per_second": round(rate)}
        if base:
            row["speedup_vs_encode_fp32"] = round(rate / base, 2)
        if vectors is not None and reference is not None:
            row["cosine_min"], row["cosine_mean"] = (round(c, 6) for c in cosine_to(reference, vectors))
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        return rate

    # Baseline: SentenceTransformer.encode in fp32, warm.
    encode_batches = [args.encode_batch] if args.encode_batch else ([128, 512] if device.type == "cuda" else [32])
    best_base, reference = None, None
    for bs in encode_batches:
        model.encode(texts[: min(len(texts), 2 * bs)], batch_size=bs)  # warm-up
        seconds, vectors = timed(lambda bs=bs: model.encode(texts, batch_size=bs, convert_to_numpy=True), device, args.repeats)
        rate = report(f"SentenceTransformer.encode fp32 batch {bs}", seconds, None, None, None)
        if best_base is None or rate > best_base:
            best_base, reference = rate, vectors
    results["baseline_texts_per_second"] = round(best_base)
    if device.type == "cuda":
        half = copy.deepcopy(model).half()
        half.encode(texts[:1024], batch_size=512)
        seconds, vectors = timed(lambda: half.encode(texts, batch_size=512, convert_to_numpy=True), device, args.repeats)
        report("SentenceTransformer.encode fp16 batch 512", seconds, vectors, reference, best_base)
        del half

    # The tokenizer alone: what a GPU pipeline cannot beat unless tokenising overlaps the model.
    # Once in one call (the Rust tokenizer's own threads, when its parallelism is on), and in
    # as many Python threads as usable cores, each on a slice (the tokenizer releases the GIL):
    # the two differ when the tokenizer's own parallelism is off or the cores are throttled.
    backend = model.tokenizer.backend_tokenizer
    fast = getattr(backend, "encode_batch_fast", backend.encode_batch)
    cores = usable_cores(at_most=1024)
    seconds, _ = timed(lambda: fast(texts), torch.device("cpu"), args.repeats)
    cpu = {"os_cpu_count": os.cpu_count(), "usable_cores": cores, "cgroup_cpu_max": cgroup_cpu_max(), "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM")}
    print(json.dumps({"method": "Rust tokenizer alone, one call", "seconds": round(seconds, 3), "texts_per_second": round(len(texts) / seconds), **cpu}), flush=True)
    slices = [texts[i::cores] for i in range(cores)]
    with ThreadPoolExecutor(cores) as pool:
        seconds, _ = timed(lambda: list(pool.map(fast, slices)), torch.device("cpu"), args.repeats)
    print(json.dumps({"method": f"Rust tokenizer alone, {cores} threads", "seconds": round(seconds, 3), "texts_per_second": round(len(texts) / seconds)}), flush=True)

    variants = args.variants.split(",") if device.type == "cuda" else ["fp32:2:2048", "fp32:2:8192"]
    for spec in variants:
        precision, workers, budget = spec.split(":")
        reset_peak(device)
        encoder = TextEncoder(model, EncodeSettings(precision=precision, workers=int(workers), max_batch_tokens=int(budget)))
        encoder.encode(texts[:4096])  # warm-up (and the tokenizer check)
        seconds, vectors = timed(lambda encoder=encoder: encoder.encode(texts), device, args.repeats)
        report(f"sbert-sae TextEncoder {precision}, {workers} tokenizer threads, {budget} tokens/batch", seconds, vectors, reference, best_base)
        if device.type == "cuda":
            results["rows"][-1]["peak_gpu_gb"] = peak_gpu_gb(device)
        del encoder
    best = max((r for r in results["rows"] if r["method"].startswith("sbert-sae")), key=lambda r: r["texts_per_second"])
    results["best"] = best
    results["peak_rss_gb"] = peak_rss_gb()
    print(f"best: {best['method']}: {best['texts_per_second']} texts/s = {best['speedup_vs_encode_fp32']}x warm fp32 encode ({round(best_base)} texts/s); cosine to fp32 encode min {best.get('cosine_min')}; peak RSS {results['peak_rss_gb']} GB", flush=True)
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
