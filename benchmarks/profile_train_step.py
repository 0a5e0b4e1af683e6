"""Where a training step's time goes: each part of sbert-sae's top-k step timed alone on one batch,
and a torch.profiler table of whole steps. Guides speed work on a GPU; runs anywhere.

    python benchmarks/profile_train_step.py --n 6144 -k 32 --batch 16384
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sbert_sae import SparseAutoencoder, SparseAutoencoderConfig  # noqa: E402


def timeit(label: str, fn, device, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / repeats * 1e3
    print(f"{label:<58} {ms:8.3f} ms", flush=True)
    return ms


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=6144)
    p.add_argument("-k", type=int, default=32)
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--d", type=int, default=384)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=a.d, n_latents=a.n, k=a.k)).to(device)
    x = torch.nn.functional.normalize(torch.randn(a.batch, a.d, device=device), dim=1)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, fused=device.type == "cuda")
    dead = torch.zeros(a.n, dtype=torch.bool, device=device)
    dead[: a.n // 100] = True
    print(f"n={a.n} k={a.k} batch={a.batch} d={a.d} on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), autocast {dtype}")
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        pre = sae.pre_activations(x)
        timeit("encoder matmul (x - b_pre) W_enc^T + b_enc", lambda: sae.pre_activations(x), device)
        timeit("topk(k) of the pre-activations", lambda: pre.topk(a.k, dim=-1, sorted=False), device)
        timeit("topk(2k) masked to dead features (AuxK)", lambda: pre.masked_fill(~dead, float("-inf")).topk(2 * a.k, dim=-1, sorted=False), device)
        v, i = pre.topk(a.k, dim=-1, sorted=False)
        for impl in ("dense", "sparse"):
            sae.decoder_impl = impl
            timeit(f"decode ({impl})", lambda: sae.decode_topk(v, i), device)

    def step(impl: str, with_dead: bool):
        sae.decoder_impl = impl
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            out = sae(x, dead_mask=dead if with_dead else None, check_finite=False)
        out.loss.backward()
        sae.remove_gradient_parallel_to_decoder()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit()

    for impl in ("dense", "sparse"):
        for with_dead in (False, True):
            ms = timeit(f"whole step, {impl} decoder, AuxK {'on' if with_dead else 'off'}", lambda impl=impl, w=with_dead: step(impl, w), device)
            print(f"{'':<58} = {a.batch / ms / 1e3:8.2f} M samples/s", flush=True)
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step("dense", False)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
