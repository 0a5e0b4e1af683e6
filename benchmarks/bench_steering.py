"""Steered search against rewriting the query, judged without an LLM (issue: the paper's analyses).

Over many (query, up feature, down feature) triples drawn from a labelled SAE's corpus, the
share of top-10 hits where the up feature fires and the down feature does not, against
the cosine between the steered and the original query, for a grid of strengths of both
steering methods and for the text-rewriting baseline (the up feature's label appended to
the query 1, 2, 5, 10, 20 times). Writes a JSON file with every point, the comparison at equal
cosine, and the curve as a PNG.

    python benchmarks/bench_steering.py runs/wiki6k --triples 300 \
        --out benchmarks/results/steering.json --plot benchmarks/results/steering.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sbert_sae.search import SteerableIndex  # noqa: E402
from sbert_sae.steering_eval import comparison_table, draw_triples, evaluate_steering, plot_steering, points_document  # noqa: E402

from measure import peak_rss_gb, write_results  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a labelled SAE run folder")
    p.add_argument("--triples", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="JSON results")
    p.add_argument("--plot", default=None, help="PNG of the curves")
    args = p.parse_args()

    t0 = time.perf_counter()
    index = SteerableIndex.from_run(args.run, device=args.device)
    _ = index.codes
    triples = draw_triples(index, args.triples, seed=args.seed)
    t1 = time.perf_counter()
    points = evaluate_steering(index, triples, show_progress=True)
    t2 = time.perf_counter()
    table = comparison_table(points)

    print(f"{len(index)} corpus texts, {len(triples)} triples ({t1 - t0:.1f}s to open and draw, {t2 - t1:.1f}s to evaluate)")
    print("| method | strength | cosine to query | success (up fires, down not) | up fires | down fires |")
    print("| --- | --- | --- | --- | --- | --- |")
    for pt in sorted(points, key=lambda q: (q.method, q.strength)):
        print(f"| {pt.method} | {pt.strength:g} | {pt.cosine:.3f} | {pt.success:.3f} | {pt.up_share:.3f} | {pt.down_share:.3f} |")
    print()
    print("| label repeats | cosine | rewrite success | add success at that cosine | clamp success at that cosine |")
    print("| --- | --- | --- | --- | --- |")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for row in table:
        print(f"| {row['label_repeats']} | {row['cosine']:.3f} | {row['rewrite_success']:.3f} | {fmt(row['add_success'])} | {fmt(row['clamp_success'])} |")
    if args.plot:
        plot_steering(points, args.plot, title=f"Steering vs rewriting: {Path(args.run).name}, {len(triples)} triples")
        print(f"plot: {args.plot}")
    write_results(args.out, {
        "run": str(args.run), "n_texts": len(index), "n_triples": len(triples), "seed": args.seed,
        "points": points_document(points), "equal_cosine": table,
        "seconds": {"open_and_draw": t1 - t0, "evaluate": t2 - t1}, "peak_rss_gb": peak_rss_gb(),
    })


if __name__ == "__main__":
    main()
