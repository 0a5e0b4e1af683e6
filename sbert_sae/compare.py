"""Match the features of two SAEs (e.g. trained on two knowledge domains) one to one.

Each feature is a unit-norm decoder row, so two features are compared by the cosine of
their directions. `compare_saes` builds the n_a x n_b cosine matrix in torch and finds the
optimal one-to-one assignment (maximum total cosine, `scipy.optimize.linear_sum_assignment`).
Pairs at or above `min_cosine` are *shared*; a feature without such a partner is found in
one SAE only. The same matching against as many random unit directions says what cosine
chance gives in this dimension (about 0.1-0.25 in d=384, never near 0.7).

Scaling: the exact assignment needs the whole dense matrix (n_a * n_b * 8 bytes in float64
inside scipy) and O(n^3) time: fine to 16384 features a side (2 GiB, a few minutes). Above
`EXACT_LIMIT` on either side the cosines are computed in row blocks of `BLOCK_ROWS`
(memory O(BLOCK_ROWS * n_b) at a time, time O(n_a * n_b * d) in matrix products), each row
keeps its `CANDIDATES` best partners, and pairs are taken greedily by descending cosine
(one to one): an approximation of the optimal assignment (at least half its total, and the
same pairs wherever a feature's best partner is unambiguous, which is the case for shared
features far above chance), in memory O(n_a * CANDIDATES).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import InputError, ModelLoadError
from .utils import read_json, save_figure

logger = logging.getLogger(__name__)

EXACT_LIMIT = 16384
BLOCK_ROWS = 4096
CANDIDATES = 8
COMPARISON_FILE = "comparison.json"
COMPARISON_PLOT = "comparison_cosines.png"


@dataclass
class ComparisonResult:
    """The one-to-one matching of two SAEs' features (indices are the SAEs' feature ids)."""

    min_cosine: float
    pairs: list[tuple[int, int, float]]
    """Every matched pair (feature of A, feature of B, cosine), best first."""
    random_cosines: np.ndarray
    """Matched cosines of A's features against random unit directions (the chance baseline)."""
    n_a: int
    n_b: int
    live_a: np.ndarray
    live_b: np.ndarray
    labels_a: list[str | None] = field(default_factory=list)
    labels_b: list[str | None] = field(default_factory=list)
    method: str = "exact"
    notes: list[str] = field(default_factory=list)

    @property
    def shared(self) -> list[tuple[int, int, float]]:
        return [p for p in self.pairs if p[2] >= self.min_cosine]

    @property
    def matched_cosines(self) -> np.ndarray:
        return np.array([p[2] for p in self.pairs], dtype=np.float64)

    @property
    def only_a(self) -> list[int]:
        partnered = {p[0] for p in self.shared}
        return [int(i) for i in np.flatnonzero(self.live_a) if int(i) not in partnered]

    @property
    def only_b(self) -> list[int]:
        partnered = {p[1] for p in self.shared}
        return [int(j) for j in np.flatnonzero(self.live_b) if int(j) not in partnered]

    def __repr__(self) -> str:
        # The dataclass' own listed every pair, every random cosine and both SAEs' labels: a
        # notebook cell ending in compare_saes(...) printed hundreds of kB for two 6144-feature SAEs.
        s = self.summary()
        median = s["matched_cosine"].get("median")
        return (
            f"ComparisonResult(n_a={self.n_a}, n_b={self.n_b}, min_cosine={self.min_cosine}, method={self.method!r}, "
            f"matched={s['n_matched']}, shared={s['n_shared']}, only_a={s['n_only_a']}, only_b={s['n_only_b']}, "
            f"median_cosine={None if median is None else round(median, 4)}; .pairs, .summary(), .to_dict() hold the rest)"
        )

    def summary(self) -> dict:
        cos, rand = self.matched_cosines, self.random_cosines

        def stats(x: np.ndarray) -> dict:
            if len(x) == 0:
                return {"n": 0}
            q = np.quantile(x, [0.1, 0.25, 0.5, 0.75, 0.9])
            return {"n": int(len(x)), "mean": float(x.mean()), "min": float(x.min()), "max": float(x.max()),
                    "q10": float(q[0]), "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]), "q90": float(q[4])}

        return {
            "n_features_a": self.n_a,
            "n_features_b": self.n_b,
            "n_live_a": int(self.live_a.sum()),
            "n_live_b": int(self.live_b.sum()),
            "min_cosine": self.min_cosine,
            "method": self.method,
            "n_matched": len(self.pairs),
            "n_shared": len(self.shared),
            "n_only_a": len(self.only_a),
            "n_only_b": len(self.only_b),
            "shared_fraction_a": len(self.shared) / max(1, int(self.live_a.sum())),
            "shared_fraction_b": len(self.shared) / max(1, int(self.live_b.sum())),
            "matched_cosine": stats(cos),
            "random_cosine": stats(rand),
            "random_above_min_cosine": int((rand >= self.min_cosine).sum()),
        }

    def to_dict(self, top: int | None = None) -> dict:
        la, lb = self.labels_a or [None] * self.n_a, self.labels_b or [None] * self.n_b
        shared = self.shared if top is None else self.shared[:top]
        return {
            "summary": self.summary(),
            "notes": self.notes,
            "shared": [{"feature_a": i, "feature_b": j, "cosine": c, "label_a": la[i], "label_b": lb[j]} for i, j, c in shared],
            "only_a": [{"feature": i, "label": la[i]} for i in self.only_a],
            "only_b": [{"feature": j, "label": lb[j]} for j in self.only_b],
            "matched_cosines": [round(float(c), 5) for c in self.matched_cosines],
            "random_cosines": [round(float(c), 5) for c in self.random_cosines],
        }


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor, block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """The full (n_a, n_b) cosine matrix of two sets of directions, filled block by block."""
    a, b = _unit_rows(a), _unit_rows(b)
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, a.shape[0], block_rows):
            out[start : start + block_rows] = (a[start : start + block_rows] @ b.T).cpu().numpy()
    return out


def match(a: torch.Tensor, b: torch.Tensor, exact_limit: int = EXACT_LIMIT, block_rows: int = BLOCK_ROWS, candidates: int = CANDIDATES) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """One-to-one matching of the rows of `a` and `b` by cosine: (rows of a, rows of b, cosines, method)."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0), "exact"
    if max(a.shape[0], b.shape[0]) <= exact_limit:
        from scipy.optimize import linear_sum_assignment

        cos = cosine_matrix(a, b, block_rows)
        rows, cols = linear_sum_assignment(cos, maximize=True)
        return rows, cols, cos[rows, cols].astype(np.float64), "exact"
    # Large: blocked top-m candidates per row, then greedy one-to-one by descending cosine.
    a, b = _unit_rows(a), _unit_rows(b)
    m = min(candidates, b.shape[0])
    values, indices = [], []
    with torch.no_grad():
        for start in range(0, a.shape[0], block_rows):
            v, i = torch.topk(a[start : start + block_rows] @ b.T, m, dim=1)
            values.append(v.cpu())
            indices.append(i.cpu())
    v = torch.cat(values).numpy().ravel()
    j = torch.cat(indices).numpy().ravel()
    i = np.repeat(np.arange(a.shape[0]), m)
    order = np.argsort(-v, kind="stable")
    used_a, used_b = np.zeros(a.shape[0], bool), np.zeros(b.shape[0], bool)
    rows, cols, cos = [], [], []
    for t in order:
        if used_a[i[t]] or used_b[j[t]]:
            continue
        used_a[i[t]] = used_b[j[t]] = True
        rows.append(i[t])
        cols.append(j[t])
        cos.append(v[t])
    return np.array(rows), np.array(cols), np.array(cos, dtype=np.float64), f"greedy-top{m}"


def check_comparable(sae_a, sae_b, name_a: str = "A", name_b: str = "B") -> None:
    """Refuse two SAEs whose features live in different spaces."""
    ca, cb = sae_a.config, sae_b.config
    if ca.base_model != cb.base_model:
        raise InputError(
            f"cannot compare SAEs over different base models: {name_a} reads {ca.base_model!r}, {name_b} reads {cb.base_model!r} "
            "(their embedding spaces are unrelated)"
        )
    if ca.d_in != cb.d_in:
        raise InputError(f"cannot compare SAEs of different input sizes: {name_a} has d_in={ca.d_in}, {name_b} has d_in={cb.d_in}")


def compare_saes(
    sae_a,
    sae_b,
    min_cosine: float = 0.7,
    *,
    live_a: np.ndarray | None = None,
    live_b: np.ndarray | None = None,
    seed: int = 0,
    exact_limit: int = EXACT_LIMIT,
) -> ComparisonResult:
    """Match the features of `sae_a` and `sae_b` one to one by decoder cosine.

    `live_a` / `live_b` (boolean masks) leave dead features out; by default every feature
    takes part. The random baseline matches A's features against as many random unit
    directions as B has (live) features.
    """
    check_comparable(sae_a, sae_b)
    if not -1 <= float(min_cosine) <= 1:
        raise InputError(f"min_cosine must be in [-1, 1], got {min_cosine!r}")
    n_a, n_b = sae_a.config.n_latents, sae_b.config.n_latents
    live_a = np.ones(n_a, bool) if live_a is None else np.asarray(live_a, bool)
    live_b = np.ones(n_b, bool) if live_b is None else np.asarray(live_b, bool)
    if live_a.shape != (n_a,) or live_b.shape != (n_b,):
        raise InputError(f"live masks must have one entry per feature ({n_a} and {n_b}), got {live_a.shape} and {live_b.shape}")
    ia, ib = np.flatnonzero(live_a), np.flatnonzero(live_b)
    wa = sae_a.W_dec.detach().float().cpu()[torch.from_numpy(ia)]
    wb = sae_b.W_dec.detach().float().cpu()[torch.from_numpy(ib)]
    rows, cols, cos, method = match(wa, wb, exact_limit=exact_limit)
    pairs = sorted(((int(ia[r]), int(ib[c]), float(x)) for r, c, x in zip(rows, cols, cos)), key=lambda p: -p[2])

    # numpy, not torch: torch.randn under the training seed is exactly how SAE decoders start,
    # and a baseline equal to an SAE's initialisation would be no baseline.
    rng = np.random.default_rng([seed, 0x5AE])
    random_dirs = torch.from_numpy(rng.standard_normal((len(ib), sae_a.config.d_in), dtype=np.float32))
    _, _, random_cos, _ = match(wa, random_dirs, exact_limit=exact_limit)
    notes = []
    if method != "exact":
        notes.append(f"more than {exact_limit} features a side: greedy one-to-one matching on the {CANDIDATES} best candidates per feature (approximate)")
    return ComparisonResult(
        min_cosine=float(min_cosine),
        pairs=pairs,
        random_cosines=np.sort(random_cos)[::-1],
        n_a=n_a,
        n_b=n_b,
        live_a=live_a,
        live_b=live_b,
        labels_a=list(sae_a.feature_labels),
        labels_b=list(sae_b.feature_labels),
        method=method,
        notes=notes,
    )


def live_mask(run: str | Path, n: int) -> np.ndarray | None:
    """Features that fired during training (from the run's feature_density.json), or None when unknown."""
    path = Path(run) / "feature_density.json"
    if not path.exists():
        return None
    counts = np.asarray(read_json(path).get("fire_counts", []))
    return counts > 0 if counts.shape == (n,) else None


def _training_seed(run: Path):
    path = run / "training_args.json"
    if not path.exists():
        return None
    return (read_json(path).get("training") or {}).get("seed")


def plot_cosines(result: ComparisonResult, path: str | Path, title: str = "") -> None:
    """Histogram of matched cosines against the random-direction baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    bins = np.linspace(min(0.0, float(result.random_cosines.min(initial=0))), 1.0, 51)
    ax.hist(result.random_cosines, bins=bins, alpha=0.6, label=f"random unit directions (median {np.median(result.random_cosines) if len(result.random_cosines) else float('nan'):.2f})", color="grey")
    ax.hist(result.matched_cosines, bins=bins, alpha=0.7, label=f"matched features (median {np.median(result.matched_cosines) if len(result.matched_cosines) else float('nan'):.2f})", color="tab:blue")
    ax.axvline(result.min_cosine, color="red", linestyle="--", label=f"min cosine {result.min_cosine:g}: {len(result.shared)} shared")
    ax.set_xlabel("cosine of one-to-one matched decoder directions")
    ax.set_ylabel("features")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    plt.close(fig)


def run_comparison(run_a: str | Path, run_b: str | Path, out_dir: str | Path | None = None, min_cosine: float = 0.7) -> tuple[ComparisonResult, Path]:
    """Load two SAE folders, compare them, write comparison.json and the histogram into `out_dir`."""
    from .modeling_sbert_sae import SparseAutoencoder
    from .utils import run_lock, write_json

    run_a, run_b = Path(run_a), Path(run_b)
    for run in (run_a, run_b):
        if not run.is_dir():
            raise ModelLoadError(f"SAE folder {str(run)!r} does not exist")
    sae_a, sae_b = SparseAutoencoder.from_pretrained(run_a), SparseAutoencoder.from_pretrained(run_b)
    check_comparable(sae_a, sae_b, str(run_a), str(run_b))
    out = Path(out_dir) if out_dir is not None else run_a / f"compare-{run_b.resolve().name}"
    result = compare_saes(
        sae_a, sae_b, min_cosine, live_a=live_mask(run_a, sae_a.config.n_latents), live_b=live_mask(run_b, sae_b.config.n_latents)
    )
    seed_a, seed_b = _training_seed(run_a), _training_seed(run_b)
    if run_a.resolve() != run_b.resolve() and seed_a is not None and seed_a == seed_b:
        result.notes.append(
            f"both SAEs were trained with seed {seed_a}: their decoders started from the same random directions, so features "
            "that training moved little match by shared initialisation (with different sizes, the smaller one's start equals the first rows "
            "of the larger one's); train with different --seed to rule it out"
        )
    with run_lock(out):
        document = {"sae_a": str(run_a), "sae_b": str(run_b), "base_model": sae_a.config.base_model, **result.to_dict()}
        write_json(out / COMPARISON_FILE, document)
        plot_cosines(result, out / COMPARISON_PLOT, title=f"{run_a.name} vs {run_b.name}: {len(result.shared)} shared features (cosine >= {min_cosine:g})")
    return result, out
