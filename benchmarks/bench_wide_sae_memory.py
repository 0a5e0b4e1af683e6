"""Peak memory of the two steps whose memory grew with the SAE's width, as they were and as
they are, each measured in a fresh process (peak RSS only grows), in one run:

- encode: `encode_corpus` of the whole corpus, 8192 texts at a time (as it was) against at
  most `ENCODE_BATCH_ELEMENTS` pre-activations at a time (as it is);
- candidates: labelling's lexical candidates for every feature at once, with the hard
  negatives' product (as it was), against `lexical_candidates` (as it is);
- families: `compute_families` and the block plot of the code at `--before-ref` (int64
  counts, the float64 normalised matrix) against this checkout's;
- evaluate: `evaluate` (metrics.json's figures) of the code at `--before-ref` (4096 texts a
  batch, float32 sums) against this checkout's.

The code "as it was" of the last two is that commit's `sbert_sae`, taken out with `git
archive` into a temporary folder. Each step must give the same result (evaluate: the same
to the printed precision; the largest relative difference is printed); the script says.

    python benchmarks/bench_wide_sae_memory.py runs/wide --dataset data/wiki
    python benchmarks/bench_wide_sae_memory.py runs/wide --dataset data/wiki --steps families,evaluate

(`runs/wide`: an SAE trained on that dataset, e.g. `sbert-sae train --dataset data/wiki
--n-latents 49152 -k 64 --epochs 2 --batch-size 4096 --out runs/wide`.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BEFORE_REF = "17730b0"
"""The last commit before the families' and the metrics' memory changes."""


def peak_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def measure_code(run: str, dataset: str, step: str, version: str) -> dict:
    """The families or evaluate step with whichever `sbert_sae` is first on the path."""
    import numpy as np

    from sbert_sae import SparseAutoencoder
    from sbert_sae.pipeline import DataArguments, load_sae_corpus

    sae = SparseAutoencoder.from_pretrained(run).eval()
    _, _, cache = load_sae_corpus(sae, run, DataArguments(dataset=dataset, device="cpu"), show_progress=False)
    if step == "families":
        from sbert_sae.activations import corpus_codes
        from sbert_sae.families import (
            compute_families,
            families_document,
            plot_cooccurrence_blocks,
        )

        acts = corpus_codes(sae, cache.embeddings, cache.path)
        before, tick = peak_mb(), time.perf_counter()
        result = compute_families(acts, device="cpu")
        with tempfile.TemporaryDirectory() as tmp:
            plot_cooccurrence_blocks(result, Path(tmp) / "blocks.png")
        doc = families_document(result)
        doc["summary"] = {k: v for k, v in doc["summary"].items() if not k.startswith("seconds")}
        out = {"result_digest": hashlib.sha256(json.dumps([doc["families"], doc["summary"]]).encode()).hexdigest()[:16], "counts_dtype": str(result.cooccurrence.dtype)}
    else:
        from sbert_sae.evaluation import evaluate

        split = json.loads((Path(run) / "split.json").read_text())
        held = np.asarray(cache.positions(np.asarray(split["heldout_row_ids"])))
        train = np.setdiff1d(np.arange(len(cache.embeddings)), held)
        before, tick = peak_mb(), time.perf_counter()
        metrics, counts = evaluate(sae, cache.embeddings, train, held)
        out = {"metrics": metrics, "result_digest": hashlib.sha256(counts.tobytes()).hexdigest()[:16]}
    return {
        "step": step,
        "code": version,
        "n_latents": sae.config.n_latents,
        "n_texts": len(cache.embeddings),
        "seconds": round(time.perf_counter() - tick, 2),
        "peak_rss_mb_before_step": before,
        "step_adds_mb": peak_mb() - before,
        **out,
    }


def measure(run: str, dataset: str, step: str, version: str) -> dict:
    if step in ("families", "evaluate"):
        return measure_code(run, dataset, step, version)
    import numpy as np

    from sbert_sae import SparseAutoencoder, activations
    from sbert_sae.labels import (
        LabelArguments,
        _row_matrix,
        document_terms,
        lexical_candidates,
        prepare_labelling,
    )
    from sbert_sae.pipeline import DataArguments, load_and_embed

    sae = SparseAutoencoder.from_pretrained(run)
    ds, cache = load_and_embed(DataArguments(dataset=dataset, model=sae.config.base_model), show_progress=False)
    texts, emb = ds.select_columns(["text"]).select(cache.row_ids)["text"], np.asarray(cache.embeddings, dtype=np.float32)
    if step == "encode":
        if version == "before":
            activations.ENCODE_BATCH_ELEMENTS = 1 << 62  # no cap: 8192 rows a batch
        before, tick = peak_mb(), time.perf_counter()
        codes = activations.encode_corpus(sae, emb)
        digest = hashlib.sha256(codes.values.tobytes() + codes.indices.tobytes()).hexdigest()[:16]
    else:
        ctx = prepare_labelling(sae, texts, emb, LabelArguments())
        doc_terms, _ = document_terms(ctx.texts, (1, 3), 3)
        n_feat, n_texts, args = ctx.n_features, len(texts), ctx.args
        idf = np.log(n_texts / np.maximum(np.asarray(doc_terms.sum(axis=0)).ravel(), 1)).astype(np.float32)
        neg_weights = _row_matrix(ctx.hard_train, [np.full(len(h), 1.0 / max(1, len(h)), dtype=np.float32) for h in ctx.hard_train], n_feat, n_texts)
        before, tick = peak_mb(), time.perf_counter()
        if version == "before":  # the code before lexical_candidates, verbatim
            presence = (_row_matrix(ctx.pos_rows, [np.ones(len(r), dtype=np.float32) for r in ctx.pos_rows], n_feat, n_texts) @ doc_terms).tocsr()
            needed = np.clip(presence.max(axis=1).toarray().ravel(), 1, 2).astype(np.float32)
            presence.data = (presence.data >= np.repeat(needed, np.diff(presence.indptr))).astype(np.float32)
            lexical = ((ctx.weights @ doc_terms) - args.lexical_contrast * (neg_weights @ doc_terms)).multiply(presence).multiply(idf[None, :]).tocsr()
            lexical.eliminate_zeros()
            out = []
            for f in range(n_feat):
                start, stop = lexical.indptr[f], lexical.indptr[f + 1]
                terms, scores = lexical.indices[start:stop], lexical.data[start:stop]
                good = scores > 0
                terms, scores = terms[good], scores[good]
                if len(terms) > args.candidates:
                    terms = terms[np.argpartition(-scores, args.candidates - 1)[: args.candidates]]
                out.append(terms)
        else:
            out = lexical_candidates(ctx, doc_terms, idf, neg_weights)
        digest = hashlib.sha256(b"".join(np.asarray(o, dtype=np.int64).tobytes() + b"|" for o in out)).hexdigest()[:16]
    return {
        "step": step,
        "code": version,
        "n_latents": sae.config.n_latents,
        "n_texts": len(texts),
        "seconds": round(time.perf_counter() - tick, 2),
        "peak_rss_mb_before_step": before,
        "step_adds_mb": peak_mb() - before,
        "result_digest": digest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--steps", default="encode,candidates")
    parser.add_argument("--before-ref", default=BEFORE_REF, help="commit whose sbert_sae is the families' and evaluate's code as it was")
    parser.add_argument("--one", nargs=2, metavar=("STEP", "VERSION"), help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        if args.code:
            sys.path.insert(0, args.code)
        print(json.dumps(measure(args.run, args.dataset, *args.one)))
        return
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as old_code:
        archive = subprocess.run(["git", "-C", str(root), "archive", args.before_ref, "sbert_sae"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", old_code], input=archive, check=True)
        for step in args.steps.split(","):
            rows = {}
            for version in ("before", "after"):
                code = [] if step not in ("families", "evaluate") else ["--code", old_code if version == "before" else str(root)]
                out = subprocess.run([sys.executable, __file__, args.run, "--dataset", args.dataset, "--one", step, version, *code], capture_output=True, text=True, check=True)
                rows[version] = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps(rows[version]), flush=True)
            b, a = rows["before"], rows["after"]
            same = b["result_digest"] == a["result_digest"]
            if step == "evaluate":
                worst = max(abs(a["metrics"][k] - v) / max(abs(v), 1e-300) for k, v in b["metrics"].items() if isinstance(v, float))
                printed = all(f"{a['metrics'][k]:.4f}" == f"{v:.4f}" for k, v in b["metrics"].items())
                same = f"{same and printed} to 4 decimals (largest relative difference {worst:.1e})"
            print(f"{step}: adds {b['step_adds_mb']} MB -> {a['step_adds_mb']} MB, {b['seconds']} s -> {a['seconds']} s; same result: {same}", flush=True)


if __name__ == "__main__":
    main()
