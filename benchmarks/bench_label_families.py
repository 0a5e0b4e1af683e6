"""Labelling and families of a trained SAE, timed stage by stage, against an earlier revision
of sbert-sae in the same run.

Both take a copy of the SAE in `RUN` and its corpus' cached embeddings (nothing is embedded
or trained here), label every feature, then find the families, printing each stage's wall
time, its parts and peak memory. With `--baseline-rev REV` the same is first run with the
package as it was at git revision REV (exported to a temporary folder), then with the working
tree, and the ratios are printed.

    python benchmarks/bench_label_families.py runs/large --baseline-rev adfd8d6 --cache-dir /tmp/large/cache
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAE_FILES = ("config.json", "model.safetensors", "training_args.json", "split.json", "metrics.json")


def measure(run: Path, cache_dir: str | None, device: str | None) -> dict:
    """Label and find families for a copy of the SAE in `run` with the `sbert_sae` on sys.path."""
    import dataclasses

    import sbert_sae
    from sbert_sae.families import FamilyArguments, run_families
    from sbert_sae.hub import training_data_arguments
    from sbert_sae.labels import LabelArguments
    from sbert_sae.pipeline import run_labelling

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from measure import peak_gpu_gb, peak_rss_gb, reset_peak, sync

    out = {"package": str(Path(sbert_sae.__file__).parent)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "sae"
        work.mkdir()
        for name in SAE_FILES:
            if (run / name).exists():
                shutil.copy2(run / name, work / name)
        data = training_data_arguments(work)
        data = dataclasses.replace(data, **{k: v for k, v in {"cache_dir": cache_dir, "device": device}.items() if v is not None})
        for stage, fn in (
            ("label", lambda: run_labelling(work, data, LabelArguments(), show_progress=False)),
            ("families", lambda: run_families(work, data, FamilyArguments(), show_progress=False)),
        ):
            sync()
            reset_peak()
            t0 = time.perf_counter()
            value = fn()
            sync()
            record = {"seconds": round(time.perf_counter() - t0, 2), "peak_gpu_gb": peak_gpu_gb(), "peak_rss_gb": peak_rss_gb()}
            if stage == "label":
                # Wall-clock seconds of each stage (they overlap across two threads) and, from
                # the revisions that record it, the CPU seconds of the thread that ran each; a
                # baseline from before holds the wall times alone, as "seconds".
                record["parts"] = {"wall_seconds": value.get("wall_seconds", value.get("seconds")), "thread_cpu_seconds": value.get("thread_cpu_seconds")}
                record["label_auroc_mean"] = value.get("label_auroc_mean")
            else:
                record["inside_compute_families"] = value.summary.get("seconds")
                record["families"] = len(value.families)
                record["block_ratio"] = value.summary.get("block_ratio")
            out[stage] = record
            print(json.dumps({"stage": stage, **record}), flush=True)
    return out


def run_with(root: Path, args) -> dict:
    """`measure` in a fresh process whose `sbert_sae` is the one in `root`."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [sys.executable, __file__, str(args.run), "--measure"]
    for flag, value in (("--cache-dir", args.cache_dir), ("--device", args.device)):
        if value:
            command += [flag, value]
    done = subprocess.run(command, env=env, capture_output=True, text=True)  # in this folder: datasets named by relative paths
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"the run with {root} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="folder of a trained SAE (its training_args.json names the corpus)")
    p.add_argument("--cache-dir", default=None, help="embedding cache holding the corpus' embeddings")
    p.add_argument("--device", default=None)
    p.add_argument("--baseline-rev", default=None, help="git revision to compare with (default: no comparison)")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.run.resolve(), args.cache_dir, args.device)), flush=True)
        return 0
    args.run = args.run.resolve()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        roots = []
        if args.baseline_rev:
            base = Path(tmp) / "baseline"
            base.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline_rev, "sbert_sae", "benchmarks"], capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
            roots.append((f"baseline {args.baseline_rev}", base))
        roots.append(("working tree", REPO))
        for name, root in roots:
            print(f"== {name}", flush=True)
            results[name] = run_with(root, args)
            for stage in ("label", "families"):
                print(json.dumps({"code": name, "stage": stage, **results[name][stage]}), flush=True)
    if args.baseline_rev:
        base, new = results[f"baseline {args.baseline_rev}"], results["working tree"]
        for stage in ("label", "families"):
            print(f"{stage}: {base[stage]['seconds']} s -> {new[stage]['seconds']} s = {base[stage]['seconds'] / new[stage]['seconds']:.2f}x faster")
        total_base = base["label"]["seconds"] + base["families"]["seconds"]
        total_new = new["label"]["seconds"] + new["families"]["seconds"]
        print(f"label + families: {total_base:.1f} s -> {total_new:.1f} s = {total_base / total_new:.2f}x faster")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
