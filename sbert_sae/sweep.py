"""Scaling sweeps: a grid of SAE sizes (n features) and sparsities (k) trained on one cached
embedding set, with power laws fitted to held-out FVU (O'Neill et al. 2024, Figure 2).

For each k, `FVU = a * n ** -b` is fitted by least squares in log space, and likewise
`FVU = a * C ** -b` against training compute C. C counts the multiply-adds of the dense
encoder and the sparse decoder, forward and backward (6 FLOPs per multiply-add and
sample): `C = samples * 6 * d_in * (n + k)`.

Every grid point is an ordinary run folder (`<out>/n<n>-k<k>/`); a sweep run again skips
the points already finished and resumes interrupted ones (`--resume`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, InputError, ReusedRunSettingsError
from .utils import atomic_write, read_json, save_figure, write_json

logger = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
SWEEP_TABLE = "sweep.md"
SCALING_PLOT = "scaling.png"
MEMORY_HEADROOM = 0.9
"""Share of the free memory a grid point may plan to use."""


@dataclass
class PowerLaw:
    """`y = a * x ** -exponent`, fitted on `n_points` points (r2 in log space)."""

    a: float
    exponent: float
    r2: float
    n_points: int

    def __call__(self, x):
        return self.a * np.asarray(x, dtype=float) ** -self.exponent


@dataclass
class SweepResult:
    rows: list[dict]
    fits_n: dict[int, PowerLaw] = field(default_factory=dict)
    fits_compute: dict[int, PowerLaw] = field(default_factory=dict)
    fits_train_n: dict[int, PowerLaw] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def fit_power_law(x, y) -> PowerLaw | None:
    """Least-squares fit of log y = log a - b log x; None with fewer than 2 distinct x."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = (x > 0) & (y > 0) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(np.unique(x)) < 2:
        return None
    lx, ly = np.log(x), np.log(y)
    slope, intercept = np.polyfit(lx, ly, 1)
    pred = intercept + slope * lx
    ss_res, ss_tot = float(((ly - pred) ** 2).sum()), float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return PowerLaw(a=float(math.exp(intercept)), exponent=float(-slope), r2=r2, n_points=int(len(x)))


def training_flops(samples: int, d_in: int, n: int, k: int) -> float:
    return float(samples) * 6.0 * d_in * (n + k)


def estimate_training_bytes(n: int, k: int, d_in: int, batch_size: int, n_texts: int, embeddings_on_device: bool) -> int:
    """A high estimate of the memory one training run needs: fp32 weights, gradients and
    Adam's two moments (4 copies of the 2*n*d_in + n + d_in parameters), the batch's
    pre-activations, their gradient and AuxK's copy (3 x batch x n floats), and the
    embeddings when they are moved to the device."""
    params = 2 * n * d_in + n + d_in
    weights = 4 * params * 4
    activations = 3 * batch_size * n * 4 + 4 * batch_size * (d_in + 2 * k) * 4
    data = n_texts * d_in * 4 if embeddings_on_device else 0
    return int(weights + activations + data)


def free_memory_bytes(device: str | None) -> tuple[int, str]:
    """Free memory on the device training will use, and its name."""
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free), f"{torch.cuda.get_device_name(dev)} ({dev})"
    import psutil

    # What can be had without swapping (Linux's MemAvailable), on every OS.
    return int(psutil.virtual_memory().available), "CPU memory"


def check_grid(ns: list[int], ks: list[int]) -> list[tuple[int, int]]:
    if not ns or not ks:
        raise InputError("the grid is empty: give at least one n and one k")
    for name, values in (("n", ns), ("k", ks)):
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} values must be positive integers, got {v!r}")
        if len(set(values)) != len(values):
            raise InputError(f"{name} values repeat: {values}")
    grid = [(n, k) for n in sorted(ns) for k in sorted(ks)]
    bad = [(n, k) for n, k in grid if k > n]
    if bad:
        raise InputError(f"k must not exceed n: {', '.join(f'n={n} k={k}' for n, k in bad)}")
    return grid


def check_memory(grid, d_in: int, batch_size: int, n_texts: int, device: str | None, free: int | None = None) -> None:
    """Refuse, before any training, a grid with a point that would not fit in memory."""
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if free is None:
        free, where = free_memory_bytes(device)
    else:
        where = str(dev)
    on_device = dev.type == "cuda"
    too_big = []
    for n, k in grid:
        need = estimate_training_bytes(n, k, d_in, batch_size, n_texts, on_device)
        if need > MEMORY_HEADROOM * free:
            too_big.append(f"n={n} k={k} needs ~{need / 1e9:.1f} GB")
    if too_big:
        raise ConfigError(
            f"the grid does not fit in {where}: {'; '.join(too_big)} with batch {batch_size}, "
            f"but {free / 1e9:.1f} GB is free (at most {MEMORY_HEADROOM:.0%} of it is planned for): "
            "drop those points or lower --batch-size"
        )


REUSE_TRAINING_SETTINGS = ("epochs", "batch_size", "lr", "lr_schedule", "decoder_lr_scale", "warmup_fraction", "decay_fraction", "adam_betas", "grad_clip", "seed")
"""Training settings a finished grid point must share with the sweep to be reused."""
REUSE_SAE_SETTINGS = ("auxk_coef", "normalize", "encoder_init_scale", "k_aux", "dead_threshold")
"""SAE settings (besides n and k) a finished grid point must share, where the sweep sets them."""


def check_reusable(folder: Path, data, sae_args, train_args, cache_name: str) -> None:
    """Refuse a finished grid point in `folder` that was trained with other settings or on
    other data than this sweep asks for: reused, it would mix into the fits (and its compute
    would be counted with this sweep's epochs)."""
    if not (folder / "metrics.json").exists() or not (folder / "training_args.json").exists():
        return
    recorded = read_json(folder / "training_args.json")
    was_training, was_sae, was_data = recorded.get("training") or {}, recorded.get("sae") or {}, recorded.get("data") or {}
    # Keyed as a resumed run's changes are (`trainer.run_signature`), so that the CLI names
    # them by its options as it does those: (key, recorded, given).
    differ = []
    for name in REUSE_TRAINING_SETTINGS:
        now = getattr(train_args, name)
        if name in was_training and _normal(was_training[name]) != _normal(now):
            differ.append((f"training_args.{name}", was_training[name], now))
    for name in REUSE_SAE_SETTINGS:
        now = getattr(sae_args, name)
        if now is not None and name in was_sae and _normal(was_sae[name]) != _normal(now):
            differ.append((f"config.{name}", was_sae[name], now))
    if "heldout_fraction" in was_data and _normal(was_data["heldout_fraction"]) != _normal(data.heldout_fraction):
        differ.append(("data.heldout_fraction", was_data["heldout_fraction"], data.heldout_fraction))
    was_cache = recorded.get("embedding_cache")
    if was_cache and Path(was_cache).name != cache_name:
        source = ("dataset", "max_rows", "model")
        differ.append(("data", {k: was_data.get(k) for k in source}, {k: getattr(data, k, None) for k in source}))
    if differ:
        raise ReusedRunSettingsError(
            f"{folder} was trained with other settings than this sweep's ({{changes}}): pass --overwrite to train the grid again (with --resume as well, the points trained with these settings are kept), or give another --out",
            differ,
        )


def _reusable(folder: Path, data, sae_args, train_args, cache_name: str) -> bool:
    """Whether `folder` holds a finished grid point trained with these very settings and data."""
    if not (folder / "metrics.json").exists() or not (folder / "training_args.json").exists():
        return False
    try:
        check_reusable(folder, data, sae_args, train_args, cache_name)
    except ReusedRunSettingsError:
        return False
    return True


def _interrupted(folder: Path) -> bool:
    """Whether `folder` holds a run that --resume continues: one with checkpoints, or one
    stopped before its first whose folder holds no finished run (it starts again)."""
    from .trainer import list_checkpoints

    if not (folder / "checkpoints").is_dir():
        return False
    return bool(list_checkpoints(folder)) or not (folder / "metrics.json").exists()


def _normal(value):
    """A setting as JSON records it (tuples are lists, ints and floats compare as numbers)."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def run_sweep(
    data,
    ns: list[int],
    ks: list[int],
    train_args,
    out_dir: str | Path,
    sae_args=None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    show_progress: bool = True,
) -> SweepResult:
    """Train every (n, k) of the grid on `data` (embedded once) into `out_dir/n<n>-k<k>/`,
    then fit and plot the scaling laws and write `sweep.json`, `sweep.md` and `scaling.png`."""
    from .pipeline import SaeArguments, load_and_embed, run_training

    out_dir = Path(out_dir)
    data = data.with_recorded_paths()  # as each point's run records them
    grid = check_grid(list(ns), list(ks))
    sae_args = sae_args or SaeArguments()
    train_args.validate()
    if data.per_domain or data.domain is not None:
        raise InputError("a sweep trains on one corpus: leave out --per-domain and --domain")
    if not data.heldout_fraction > 0:
        raise InputError(f"a sweep fits the held-out FVU of each point: --heldout-fraction {data.heldout_fraction:g} leaves no held-out texts (give more than 0)")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} is a file, not a folder")
    loaded = load_and_embed(data, show_progress=show_progress)  # once for every point of the grid
    cache = loaded[1]
    check_memory(grid, cache.dim, train_args.batch_size, len(cache.row_ids), data.device)
    # A point stopped while it retrained (a `sweep --overwrite` killed part-way) holds the run it
    # replaces beside the new run's checkpoints: with --resume it continues from those (which
    # refuse other settings themselves), rather than being judged, and skipped or refused, by the
    # results it was replacing.
    continued = {(n, k) for n, k in grid if resume and _interrupted(out_dir / f"n{n}-k{k}")}
    if not overwrite:
        for n, k in grid:
            if (n, k) not in continued:
                check_reusable(out_dir / f"n{n}-k{k}", data, sae_args, train_args, cache.path.name)
    # --overwrite with --resume finishes a stopped `sweep --overwrite`: the points it retrained are
    # kept, a stopped one continues, and those still holding the runs it was replacing train again.
    kept = {(n, k) for n, k in grid if overwrite and resume and (n, k) not in continued and _reusable(out_dir / f"n{n}-k{k}", data, sae_args, train_args, cache.path.name)}

    result = SweepResult(rows=[])
    for n, k in grid:
        folder = out_dir / f"n{n}-k{k}"
        metrics_path = folder / "metrics.json"
        if metrics_path.exists() and (not overwrite or (n, k) in kept) and (n, k) not in continued:
            logger.info("n=%d k=%d: already trained in %s", n, k, folder)
            result.skipped.append(folder.name)
        else:
            logger.info("n=%d k=%d -> %s", n, k, folder)
            point = dataclasses.replace(sae_args, n_latents=n, k=k, k_aux=None if sae_args.k_aux is None else min(sae_args.k_aux, n))
            run_training(data, point, train_args, folder, overwrite=overwrite, resume=(n, k) in continued, loaded=loaded)
        metrics = read_json(metrics_path)
        samples = int(metrics.get("n_train", 0)) * train_args.epochs
        result.rows.append(
            {
                "n": n,
                "k": k,
                "folder": folder.name,
                "heldout_fvu": metrics.get("heldout_fvu"),
                "train_fvu": metrics.get("train_fvu"),
                "heldout_cosine": metrics.get("heldout_cosine"),
                "dead_fraction": metrics.get("dead_fraction"),
                "steps": metrics.get("steps"),
                "train_samples": samples,
                "train_flops": training_flops(samples, cache.dim, n, k),
                "train_seconds": metrics.get("train_seconds"),
            }
        )
    for k in sorted(set(ks)):
        rows = [r for r in result.rows if r["k"] == k]
        fit = fit_power_law([r["n"] for r in rows], [r["heldout_fvu"] for r in rows])
        if fit is not None:
            result.fits_n[k] = fit
        fit = fit_power_law([r["train_flops"] for r in rows], [r["heldout_fvu"] for r in rows])
        if fit is not None:
            result.fits_compute[k] = fit
        # On a small corpus the held-out FVU flattens while the training FVU keeps falling:
        # the gap says the sweep is limited by data, not by n.
        fit = fit_power_law([r["n"] for r in rows], [r["train_fvu"] for r in rows])
        if fit is not None:
            result.fits_train_n[k] = fit
    write_sweep(result, out_dir, data, train_args)
    return result


def sweep_document(result: SweepResult, data=None, train_args=None) -> dict:
    return {
        "rows": result.rows,
        "fit_fvu_vs_n": {str(k): dataclasses.asdict(f) for k, f in result.fits_n.items()},
        "fit_fvu_vs_compute": {str(k): dataclasses.asdict(f) for k, f in result.fits_compute.items()},
        "fit_train_fvu_vs_n": {str(k): dataclasses.asdict(f) for k, f in result.fits_train_n.items()},
        "compute": "train_flops = samples * 6 * d_in * (n + k)",
        "dataset": None if data is None else (data.dataset if isinstance(data.dataset, str) else list(data.dataset)),
        "model": None if data is None else data.model,
        "training": None if train_args is None else train_args.to_dict(),
    }


def write_sweep(result: SweepResult, out_dir: Path, data=None, train_args=None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / SWEEP_FILE, sweep_document(result, data, train_args))
    lines = ["| n | k | held-out FVU | train FVU | dead | steps | train FLOPs | seconds |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result.rows:
        lines.append(
            f"| {r['n']} | {r['k']} | {r['heldout_fvu']:.4f} | {r['train_fvu']:.4f} | {r['dead_fraction']:.1%} | {r['steps']} | {r['train_flops']:.2e} | {r['train_seconds']:.1f} |"
        )
    lines += ["", "| k | held-out FVU ~ n^-b: b | a | r2 | held-out FVU ~ C^-b: b | r2 | train FVU ~ n^-b: b | r2 |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k, fit in sorted(result.fits_n.items()):
        fc, ft = result.fits_compute.get(k), result.fits_train_n.get(k)
        cells = [f"{fit.exponent:.3f}", f"{fit.a:.3g}", f"{fit.r2:.3f}"]
        cells += ["", ""] if fc is None else [f"{fc.exponent:.3f}", f"{fc.r2:.3f}"]
        cells += ["", ""] if ft is None else [f"{ft.exponent:.3f}", f"{ft.r2:.3f}"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write(out_dir / SWEEP_TABLE, lambda tmp: Path(tmp).write_text(text))
    plot_scaling(result, out_dir / SCALING_PLOT)


def plot_scaling(result: SweepResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    ks = sorted({r["k"] for r in result.rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, k in enumerate(ks):
        rows = sorted((r for r in result.rows if r["k"] == k), key=lambda r: r["n"])
        color = colors[j % len(colors)]
        for ax, key, fits in ((axes[0], "n", result.fits_n), (axes[1], "train_flops", result.fits_compute)):
            x = np.array([r[key] for r in rows], dtype=float)
            y = np.array([r["heldout_fvu"] for r in rows], dtype=float)
            fit = fits.get(k)
            label = f"k={k}" + ("" if fit is None else f": FVU ∝ {'n' if key == 'n' else 'C'}^-{fit.exponent:.2f}")
            ax.plot(x, y, "o", color=color, label=label)
            xs = np.geomspace(x.min(), x.max(), 50)
            if fit is not None:
                ax.plot(xs, fit(xs), "-", color=color, alpha=0.7)
            if key == "n":
                train = np.array([r["train_fvu"] for r in rows], dtype=float)
                tfit = result.fits_train_n.get(k)
                ax.plot(x, train, "o", mfc="none", color=color, label=f"k={k} train" + ("" if tfit is None else f": n^-{tfit.exponent:.2f}"))
                if tfit is not None:
                    ax.plot(xs, tfit(xs), ":", color=color, alpha=0.7)
    for ax, xlabel in ((axes[0], "features n"), (axes[1], "training compute C (FLOPs)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("FVU (filled: held-out, hollow: training)" if xlabel.startswith("features") else "held-out FVU")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    sizes = sorted({r["n"] for r in result.rows})
    axes[0].set_xticks(sizes, [str(n) for n in sizes])
    axes[0].xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    # Within about one decade matplotlib labels minor ticks 2-9, and their labels overlap
    # (3x10^11 on 4x10^11); ticks at 2 and 5 only keep the axis labelled and readable.
    axes[1].xaxis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=(2.0, 5.0)))
    axes[0].set_title("FVU against SAE size")
    axes[1].set_title("Held-out FVU against training compute")
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    plt.close(fig)
