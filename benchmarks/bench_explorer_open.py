"""How long the explorer takes to open on a large corpus, and to show its first pages.

A corpus of `--rows` texts (the texts of `--texts`, repeated with a row number) is made
into a dataset, and the explorer of an SAE is opened on it as `sbert-sae explore SAE
--dataset CORPUS` opens it: the SAE and its labels, the app, then the corpus in the
background (dataset, memory-mapped embedding cache, search index), then a feature page
(its strongest texts, found from the encoder row without encoding the corpus), a text
inspection and a search; the corpus' full codes (for histograms and co-occurrence) are
computed in the background and timed separately.

Before any of that, features are found by a word of their labels (the Features tab's Find),
`--find-after` seconds after the app is built (0: at once, as the quickest user would):
the first Find waits for the label search the app makes ready in the background (the base
model loaded, the labels' and 1024 reference words' vectors embedded, or read from the
cache, and the match cut-offs), the next embeds only its query. Without `--texts` the
explorer has no corpus (as for an SAE whose dataset cannot be opened here) and only the
opening and the Finds are timed; `--keep FOLDER`, given twice, times a cold then a warm
cache (the label vectors kept there by the first run).

With `--random-embeddings` the corpus' embedding cache is filled with random unit vectors
instead of embedding the texts (which takes hours on a CPU): nothing timed here reads the
vectors' values, only their number and shape, so the timings stand; the texts the pages
show are then not the SAE's real top texts.

    python benchmarks/bench_explorer_open.py runs/wiki6k --texts data/large/corpus.parquet \
        --rows 400000 --random-embeddings --out benchmarks/results/explorer_open.json
    python benchmarks/bench_explorer_open.py runs/wiki --keep /tmp/explorer-find   # no corpus, cold cache
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import peak_rss_gb, write_results  # noqa: E402


def make_corpus(texts_file: str, rows: int, folder: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = pq.read_table(texts_file, columns=["text"]).column("text").to_pylist()
    repeated = [f"{texts[i % len(texts)]} ({i})" for i in range(rows)]
    path = folder / "corpus.parquet"
    pq.write_table(pa.table({"text": repeated}), path)
    return path


def fill_cache_with_random_vectors(dataset_path: Path, model: str, dim: int, cache_dir: Path) -> Path:
    """The cache folder `embed_dataset` would write for this dataset, holding random unit vectors."""
    from sbert_sae.data import find_text_rows, load_text_dataset
    from sbert_sae.embeddings import cache_key, dataset_fingerprint
    from sbert_sae.utils import write_json

    ds = load_text_dataset(str(dataset_path))
    rows = find_text_rows(ds, "text")
    folder = cache_dir / "embeddings" / cache_key(model, None, dataset_fingerprint(ds), "text", {})
    folder.mkdir(parents=True, exist_ok=True)
    n = len(rows.row_ids)
    vectors = np.lib.format.open_memmap(folder / "embeddings.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    rng = np.random.default_rng(0)
    for start in range(0, n, 65536):
        block = rng.standard_normal((min(65536, n - start), dim), dtype=np.float32)
        vectors[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    vectors.flush()
    np.save(folder / "row_ids.npy", rows.row_ids)
    write_json(folder / "meta.json", {"model": model, "revision": None, "dataset_fingerprint": dataset_fingerprint(ds), "text_column": "text",
                                      "encode_kwargs": {}, "precision": "fp32", "processes": 1, "n_rows": n, "n_dataset_rows": len(ds),
                                      "dim": dim, "skipped": rows.skipped, "skipped_examples": rows.examples, "random_vectors": True})
    write_json(folder / "complete.json", {"n_rows": n})
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sae", help="a labelled SAE run folder")
    p.add_argument("--texts", default=None, help="a parquet file with a text column to build the corpus from (none: open without a corpus)")
    p.add_argument("--find", default="music", help="the word typed into the first Find (default: %(default)s)")
    p.add_argument("--find-after", type=float, default=0.0, help="seconds between the app built and the first Find (default: at once)")
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--random-embeddings", action="store_true", help="fill the embedding cache with random unit vectors (see above)")
    p.add_argument("--keep", default=None, help="build the corpus and cache in this folder and keep them (default: a temporary folder)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import os

    work = Path(args.keep or tempfile.mkdtemp(prefix="sbert-sae-explorer-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    args.work = work
    cache_dir = work / "cache"
    os.environ["SBERT_SAE_CACHE"] = str(cache_dir)  # before sbert_sae reads it

    from sbert_sae import SparseAutoencoder
    from sbert_sae.explorer import build_app
    from sbert_sae.explorer_data import Explorer

    corpus, prepare = None, 0.0
    if args.texts:
        t = time.perf_counter()
        corpus = make_corpus(args.texts, args.rows, work)
        sae = SparseAutoencoder.from_pretrained(args.sae)
        if args.random_embeddings:
            fill_cache_with_random_vectors(corpus, sae.config.base_model, sae.config.d_in, cache_dir)
        prepare = time.perf_counter() - t
        print(f"corpus of {args.rows} texts and its embedding cache made in {prepare:.1f}s (not part of opening)")
    kept = sorted(p.name for p in (cache_dir / "label-vectors").glob("*.npy"))
    print(f"cache {cache_dir}: {len(kept)} label-vectors files kept from an earlier run")

    times = {}
    t0 = time.perf_counter()
    explorer = Explorer.open(args.sae, dataset=str(corpus) if corpus else None, cache_dir=str(cache_dir), device="cpu")
    times["open_sae_and_labels"] = time.perf_counter() - t0
    t = time.perf_counter()
    build_app(explorer)
    times["build_app"] = time.perf_counter() - t
    times["app_ready"] = time.perf_counter() - t0
    time.sleep(args.find_after)
    # In a worker thread, as Gradio runs an event's handler: on this machine the same
    # embedding takes 2-4 times as long in the main thread as in any other.
    with ThreadPoolExecutor(1) as handler:
        t = time.perf_counter()
        found = handler.submit(explorer.search_features, args.find).result()
        times[f"first_find_{args.find_after:g}s_after_app"] = time.perf_counter() - t
        t = time.perf_counter()
        handler.submit(explorer.search_features, "the history of ancient rome").result()
        times["next_find"] = time.perf_counter() - t
    print(f"Find {args.find!r}: {len(found)} features, the first {found[0]['label']!r} ({found[0]['match']})" if found else f"Find {args.find!r}: nothing")
    if corpus is None:
        report(args, times, prepare)
        return
    t = time.perf_counter()
    explorer.start_corpus()
    c = explorer.corpus()
    times["corpus_open_in_background"] = time.perf_counter() - t
    counts = explorer.fire_counts()
    feature = int(np.argmax(counts[0])) if counts is not None else 0
    t = time.perf_counter()
    page = explorer.feature(feature)
    top = explorer.top_texts(feature, n=10)
    times["first_feature_page"] = time.perf_counter() - t
    t = time.perf_counter()
    explorer.inspect("The history of the Roman Empire and its emperors.")
    times["text_inspection"] = time.perf_counter() - t
    t = time.perf_counter()
    explorer.search_index().search("the history of the roman empire", k=10)
    times["first_search"] = time.perf_counter() - t
    t = time.perf_counter()
    explorer.search_index().search("music of india", up={feature: 0.5}, k=10)
    times["next_steered_search"] = time.perf_counter() - t
    t = time.perf_counter()
    c.activations(timeout=None)
    times["full_codes_in_background"] = time.perf_counter() - t

    print(f"corpus: {len(c.row_ids)} texts ({'random' if args.random_embeddings else 'real'} embeddings); feature #{feature} {page.get('label')!r}, {len(top)} top texts")
    report(args, times, prepare)


def report(args, times: dict, prepare: float) -> None:
    for name, seconds in times.items():
        print(f"{name:>28}: {seconds:7.2f} s")
    print(f"peak RSS {peak_rss_gb()} GB")
    write_results(args.out, {"sae": args.sae, "rows": args.rows if args.texts else 0, "random_embeddings": args.random_embeddings, "seconds": times,
                             "prepare_seconds": prepare, "peak_rss_gb": peak_rss_gb()})
    import threading

    for thread in threading.enumerate():  # let the explorer's background work end before the interpreter does
        if thread is not threading.current_thread() and thread.daemon:
            thread.join(timeout=60)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
