"""What every benchmark measures alike: device syncs, peak memory, the JSON it writes."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch


def sync(device: torch.device | str | None = None) -> None:
    """Wait for the GPU's queued work, so that a timer reads what ran (no-op on a CPU)."""
    device = torch.device(device) if device is not None else None
    if (device is None and torch.cuda.is_available()) or (device is not None and device.type == "cuda"):
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gpu_gb(device: torch.device | str | None = None) -> float | None:
    """GPU memory allocated at most since the last `reset_peak`, in GB (None without a GPU)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2)


def peak_rss_gb() -> float:
    """The process' peak resident memory, in GB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)


def write_results(path: str | Path | None, results: dict) -> None:
    """Write `results` as JSON to `path` (nothing when None)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2))
