"""Top-k of SAE pre-activations: one `torch.topk` over all columns against the two-stage top-k
(`SparseAutoencoder.topk_impl = "two_stage"`: top k of column blocks, then of the candidates),
forward and backward, same rows, same run; checks that both pick the same entries.

    python benchmarks/bench_topk.py --shapes 16384:6144:32,16384:24576:64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sbert_sae import SparseAutoencoder, SparseAutoencoderConfig  # noqa: E402
from measure import sync, write_results  # noqa: E402


def timed(fn, device, repeats: int) -> float:
    """Median milliseconds of `fn` over `repeats` runs, after 3 warm-up runs."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="16384:6144:32,16384:24576:64,16384:98304:64", help="rows:n_latents:k, comma separated")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"top-k on {name}, {dtype}, torch {torch.__version__}", flush=True)
    results = []
    for spec in args.shapes.split(","):
        rows, n, k = (int(v) for v in spec.split(":"))
        sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=8, n_latents=n, k=k)).to(device)
        # Real-looking pre-activations: a product of random inputs and weights, not zeros.
        pre = (torch.randn(rows, 384, device=device) @ torch.randn(384, n, device=device) / 20).to(dtype).requires_grad_(True)
        upstream = torch.randn(rows, k, device=device, dtype=dtype)
        row = {"rows": rows, "n_latents": n, "k": k}
        codes = {}
        for impl in ("torch", "two_stage"):
            sae.topk_impl = impl

            def forward():
                return sae._topk(pre, k)

            def forward_backward():
                values, _ = sae._topk(pre, k)
                torch.autograd.grad(values, pre, upstream)

            row[f"{impl}_forward_ms"] = round(timed(forward, device, args.repeats), 3)
            row[f"{impl}_forward_backward_ms"] = round(timed(forward_backward, device, args.repeats), 3)
            values, indices = forward()
            codes[impl] = torch.zeros(rows, n, device=device, dtype=dtype).scatter(1, indices, values.detach())
        row["same_code"] = bool(torch.equal(codes["torch"], codes["two_stage"]))
        row["speedup_forward"] = round(row["torch_forward_ms"] / row["two_stage_forward_ms"], 2)
        row["speedup_forward_backward"] = round(row["torch_forward_backward_ms"] / row["two_stage_forward_backward_ms"], 2)
        results.append(row)
        print(json.dumps(row), flush=True)
    write_results(args.out, {"device": name, "shapes": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
