"""Does steering do what it says, without an LLM to judge? (O'Neill et al. 2024, section on
steering, with the judge replaced by the SAE itself.)

Triples (query, up feature, down feature) are drawn as the paper draws them: a corpus
text as the query, a feature active in it to lower, a feature absent from it to raise.
For each triple and strength the query is steered and searched (the query's own text left
out), and a hit counts as a success when the up feature fires in it and the down feature
does not. Success is plotted against the cosine between the steered and the original
query: how far the query had to move. The baseline rewrites the query's text instead,
appending the up feature's label (once, twice, ...), and is scored the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .search import SteerableIndex
from .utils import save_figure

DEFAULT_STRENGTHS = (0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
DEFAULT_REPEATS = (1, 2, 5, 10, 20)


@dataclass
class SteeringTriple:
    position: int
    up: int
    down: int


@dataclass
class SteeringPoint:
    """Mean over the triples of one steering setting (or one rewriting of the text)."""

    method: str
    strength: float
    cosine: float
    success: float
    up_share: float
    down_share: float
    n_triples: int


def draw_triples(
    index: SteerableIndex,
    n: int,
    *,
    seed: int = 0,
    k: int = 10,
    density: tuple[float, float] = (0.002, 0.05),
    min_down_hits: int = 2,
) -> list[SteeringTriple]:
    """`n` triples: a random corpus text as the query; as the down feature, one of its active
    features that fires in at least `min_down_hits` of its own top-`k` hits (so there is
    something to lower); as the up feature, a labelled feature firing on a `density` share
    of the corpus that is active neither in the query nor in any of those hits."""
    if n < 1:
        raise InputError(f"n must be >= 1, got {n}")
    counts = index.fire_counts
    share = counts / len(index)
    labels = index.sae.feature_labels
    pool = np.flatnonzero((share >= density[0]) & (share <= density[1]) & np.array([bool(lab) for lab in labels]))
    if len(pool) == 0:
        raise InputError(f"no labelled feature fires on {density[0]:.1%}-{density[1]:.1%} of the corpus: nothing to steer toward")
    rng = np.random.default_rng(seed)
    triples: list[SteeringTriple] = []
    for position in rng.permutation(len(index)):
        if len(triples) == n:
            break
        position = int(position)
        hits, _ = index.nearest(index.vectors([position])[0], k=k, exclude=[position])
        own = set(np.asarray(index.codes.indices[position])[np.asarray(index.codes.values[position]) > 0].tolist())
        in_hits = np.asarray(index.codes.indices[hits])[np.asarray(index.codes.values[hits]) > 0]
        hit_counts = np.bincount(in_hits, minlength=index.sae.config.n_latents)
        downs = [f for f in own if hit_counts[f] >= min_down_hits and share[f] <= density[1] * 4]
        ups = [f for f in pool if f not in own and hit_counts[f] == 0]
        if not downs or not ups:
            continue
        triples.append(SteeringTriple(position, int(rng.choice(ups)), int(rng.choice(downs))))
    if not triples:
        raise InputError("found no query with an active feature shared by its neighbours: the corpus or SAE is too small to evaluate steering")
    return triples


def _score(index: SteerableIndex, hits: np.ndarray, up: int, down: int) -> tuple[float, float, float]:
    acts = index.feature_activations(hits, [up, down])
    fires_up, fires_down = acts[:, 0] > 0, acts[:, 1] > 0
    return float(np.mean(fires_up & ~fires_down)), float(fires_up.mean()), float(fires_down.mean())


def _point(method: str, strength: float, rows: list[tuple[float, float, float, float]]) -> SteeringPoint:
    a = np.array(rows)
    return SteeringPoint(method, float(strength), float(a[:, 0].mean()), float(a[:, 1].mean()), float(a[:, 2].mean()), float(a[:, 3].mean()), len(rows))


@torch.no_grad()
def evaluate_steering(
    index: SteerableIndex,
    triples: list[SteeringTriple],
    *,
    strengths=DEFAULT_STRENGTHS,
    methods=("add", "clamp"),
    repeats=DEFAULT_REPEATS,
    k: int = 10,
    show_progress: bool = False,
) -> list[SteeringPoint]:
    """One point per (method, strength), one for the unsteered query (method "none") and one
    per number of label repeats of the text-rewriting baseline (method "rewrite")."""
    from tqdm.auto import tqdm

    if not triples:
        raise InputError("no triples to evaluate")
    labels = index.sae.feature_labels
    texts = index.text_of([t.position for t in triples])
    queries = index.vectors([t.position for t in triples])
    rows: dict[tuple[str, float], list] = {}
    for t, q in tqdm(list(zip(triples, queries)), desc="steering", unit="triple", disable=not show_progress):
        hits, _ = index.nearest(q, k=k, exclude=[t.position])
        rows.setdefault(("none", 0.0), []).append((1.0, *_score(index, hits, t.up, t.down)))
        for method in methods:
            for s in strengths:
                st = index.steer(q, up={t.up: s}, down={t.down: s}, method=method)
                hits, _ = index.nearest(st.vector, k=k, exclude=[t.position])
                rows.setdefault((method, s), []).append((st.cosine, *_score(index, hits, t.up, t.down)))
    if repeats:
        rewritten = [f"{text} {' '.join([labels[t.up]] * r)}" for r in repeats for t, text in zip(triples, texts)]
        embedded = index.sae.prepare_input(index.sae.embed_texts(rewritten).to(index.device)).float()
        for j, (r, t) in enumerate((r, t) for r in repeats for t in triples):
            q = queries[j % len(triples)]
            hits, _ = index.nearest(embedded[j], k=k, exclude=[t.position])
            cosine = float(F.cosine_similarity(q, embedded[j], dim=0))
            rows.setdefault(("rewrite", float(r)), []).append((cosine, *_score(index, hits, t.up, t.down)))
    return [_point(method, s, r) for (method, s), r in rows.items()]


def success_at_cosine(points: list[SteeringPoint], method: str, cosine: float) -> float | None:
    """The method's success interpolated at `cosine` (linear between its two nearest
    settings; None outside the cosines it reached)."""
    pts = sorted((p.cosine, p.success) for p in points if p.method in (method, "none"))
    xs, ys = np.array([c for c, _ in pts]), np.array([s for _, s in pts])
    if len(xs) < 2 or not xs.min() <= cosine <= xs.max():
        return None
    return float(np.interp(cosine, xs, ys))


def comparison_table(points: list[SteeringPoint], methods=("add", "clamp")) -> list[dict]:
    """For each rewriting of the baseline: its cosine and success, and each steering method's
    success at that same cosine."""
    rows = []
    for p in sorted((p for p in points if p.method == "rewrite"), key=lambda p: p.strength):
        row = {"label_repeats": int(p.strength), "cosine": p.cosine, "rewrite_success": p.success}
        for method in methods:
            row[f"{method}_success"] = success_at_cosine(points, method, p.cosine)
        rows.append(row)
    return rows


def plot_steering(points: list[SteeringPoint], path, title: str = "") -> None:
    """The success/cosine curves: the whole range, and a close-up of the range the
    rewriting baseline reaches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    style = {"add": ("o-", "add decoder direction"), "clamp": ("s-", "clamp and decode"), "rewrite": ("^--", "rewrite text (append up label)")}
    base = next((p for p in points if p.method == "none"), None)
    rewrites = [p.cosine for p in points if p.method == "rewrite"]
    zoom_low = min(rewrites) - 0.03 if rewrites else 0.85
    for panel, ax in enumerate(axes):
        for method, (marker, name) in style.items():
            pts = sorted((p for p in points if p.method == method), key=lambda p: -p.cosine)
            if panel == 1:
                pts = [p for p in pts if p.cosine >= zoom_low]
            if not pts:
                continue
            pts = [base, *pts] if base is not None else pts
            ax.plot([p.cosine for p in pts], [p.success for p in pts], marker, label=name)
            for p in pts[1:]:
                if panel == 1 or p.cosine < 0.9:
                    tag = f"x{p.strength:g}" if method == "rewrite" else f"{p.strength:g}"
                    ax.annotate(tag, (p.cosine, p.success), textcoords="offset points", xytext=(3, 5), fontsize=7)
        ax.invert_xaxis()
        ax.set_xlabel("cosine(steered query, original query)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of top-10 hits: up fires, down does not")
    axes[0].set_title(title or "Steered search vs rewriting the query")
    axes[1].set_title(f"close-up: cosine >= {zoom_low:.2f}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    plt.close(fig)


def points_document(points: list[SteeringPoint]) -> list[dict]:
    return [asdict(p) for p in points]
