"""CPU seconds of each labelling stage, counted in the thread that runs it, for SAEs of several
widths on one corpus: what grows with the number of features.

`feature_labels.json`'s "wall_seconds" ("seconds" in files from before "thread_cpu_seconds"
was recorded beside them) are wall-clock laps, and the stages overlap: the base model embeds
one block's candidates and labels in a worker thread while the main thread runs KeyBERT and
the label choice on the next. On a few shared cores each stage's lap then holds the other
thread's work too, more so the more blocks there are (none overlap with a single block), and
the laps look as if they grew faster than the features. Here torch runs on one thread, so that
`time.thread_time` of a call is that call's own compute, whatever runs beside it.

    python benchmarks/bench_label_stage_cpu.py runs/n1024 runs/n4096 --dataset data/wiki --max-rows 3000
"""

from __future__ import annotations

import argparse
import json
import threading
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="SAE run folders (trained on --dataset)")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--max-rows", type=int)
    args = parser.parse_args()

    import keybert
    import numpy as np
    import torch

    from sbert_sae import SparseAutoencoder, labels
    from sbert_sae.activations import corpus_codes
    from sbert_sae.base_model import load_sentence_transformer
    from sbert_sae.pipeline import DataArguments, load_sae_corpus

    torch.set_num_threads(1)
    cpu: dict[str, float] = {}
    calls: dict[str, int] = {}

    def count(owner, name: str, key: str | None = None) -> None:
        fn = getattr(owner, name)

        def counted(*a, **k):
            stage = key or name
            if name == "_embed":
                stage = "_embed (main thread)" if threading.current_thread() is threading.main_thread() else "_embed (worker)"
            tick = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                cpu[stage] = cpu.get(stage, 0.0) + time.thread_time() - tick
                calls[stage] = calls.get(stage, 0) + 1

        setattr(owner, name, counted)

    for name in ("prepare_labelling", "document_terms", "lexical_candidates", "_draft_labels", "_finish_labels", "score_labels", "_separate_duplicates", "_embed"):
        count(labels, name)
    count(keybert.KeyBERT, "extract_keywords", "keybert")
    model = None
    for run in args.runs:
        cpu.clear()
        calls.clear()
        sae = SparseAutoencoder.from_pretrained(run)
        model = model or load_sentence_transformer(sae.config.base_model, device="cpu")
        _, ds, cache = load_sae_corpus(sae, run, DataArguments(dataset=args.dataset, max_rows=args.max_rows, device="cpu"), show_progress=False)
        texts = ds.select_columns(["text"]).select(cache.row_ids)["text"]
        codes = corpus_codes(sae, cache.embeddings, cache.path)
        tick = time.perf_counter()
        result = labels.label_features(sae, texts, np.asarray(cache.embeddings, dtype=np.float32), model, show_progress=False, codes=codes)
        labelled = result.summary["n_labelled"]
        print(
            json.dumps(
                {
                    "n_latents": sae.config.n_latents,
                    "n_texts": len(texts),
                    "n_labelled": labelled,
                    "wall_s": round(time.perf_counter() - tick, 1),
                    "cpu_s": {k: round(v, 2) for k, v in sorted(cpu.items())},
                    "cpu_ms_per_labelled_feature": {k: round(1000 * v / max(1, labelled), 2) for k, v in sorted(cpu.items())},
                    "calls": dict(sorted(calls.items())),
                    "laps_s": result.summary.get("wall_seconds", result.summary.get("seconds")),
                    "recorded_thread_cpu_s": result.summary.get("thread_cpu_seconds"),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
