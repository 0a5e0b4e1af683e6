"""The text encoder's producer side on the CPU: tokenising, sorting by length and padding
(`TextEncoder._batches`, what its worker threads run ahead of the model) against the Rust
tokenizer alone on the same texts, same run. On a GPU the model waits on this work, and its
Python part holds the GIL, so it is serialised across the worker threads: the ratio is what
the producer costs beyond tokenising.

    RAYON_NUM_THREADS=1 python benchmarks/bench_tokenize.py --dataset data/wiki
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sbert_sae.base_model import DEFAULT_MODEL, load_sentence_transformer  # noqa: E402
from sbert_sae.data import column_values, find_text_rows, load_text_dataset  # noqa: E402
from sbert_sae.text_encoder import EncodeSettings, TextEncoder  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="data/wiki")
    p.add_argument("--text-column", default="text")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-batch-tokens", type=int, default=65536, help="the GPU's default batch")
    args = p.parse_args(argv)

    ds = load_text_dataset(args.dataset)
    texts = column_values(ds, args.text_column, find_text_rows(ds, args.text_column).row_ids)
    model = load_sentence_transformer(args.model, device="cpu")
    encoder = TextEncoder(model, EncodeSettings(max_batch_tokens=args.max_batch_tokens))
    if encoder._fast_tokenizer(texts) is None:
        raise SystemExit("the model's tokenizer does not take the fast path")
    backend = encoder._backend
    stripped = [t.strip() for t in texts]
    times = {"rust_tokenizer": [], "producer": []}
    for _ in range(args.repeats):  # interleaved, best of each
        start = time.perf_counter()
        backend.encode_batch(stripped, add_special_tokens=True)
        times["rust_tokenizer"].append(time.perf_counter() - start)
        start = time.perf_counter()
        encoder._batches(texts)
        times["producer"].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    print(json.dumps({
        "texts": len(texts), "rust_tokenizer_seconds": round(best["rust_tokenizer"], 3), "producer_seconds": round(best["producer"], 3),
        "python_seconds": round(best["producer"] - best["rust_tokenizer"], 3), "producer_vs_tokenizer": round(best["producer"] / best["rust_tokenizer"], 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
