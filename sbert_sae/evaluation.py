"""Quality of a trained SAE: reconstruction, sparsity, feature density, neighbour overlap.

Every figure is computed on rows the SAE was not trained on, except the feature
densities (how often each feature fires over one pass of the training rows), which say
which features are dead (never fire) or dense (fire on more than 10% of texts).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .modeling_sbert_sae import SparseAutoencoder
from .utils import atomic_write

DENSE_THRESHOLD = 0.1

METRIC_DESCRIPTIONS = {
    "heldout_fvu": "fraction of variance unexplained on held-out texts: sum ||x - x_hat||^2 / sum ||x - mean x||^2",
    "heldout_normalized_mse": "mean ||x - x_hat||^2 / mean ||x||^2 on held-out texts",
    "heldout_cosine": "mean cosine(x, x_hat) on held-out texts",
    "heldout_l0": "mean number of firing features per held-out text",
    "train_fvu": "the same FVU on the training texts (a gap to heldout_fvu means overfitting)",
    "dead_fraction": "share of features that never fire over one pass of the training texts",
    "dense_fraction": f"share of features that fire on more than {DENSE_THRESHOLD:.0%} of training texts",
    "neighbour_overlap_at_10": "share of each held-out text's 10 nearest corpus neighbours also found when searching with its reconstruction",
}


@torch.no_grad()
def _blocks(sae: SparseAutoencoder, embeddings: np.ndarray, positions: np.ndarray, batch_size: int):
    device = sae.W_dec.device
    for start in range(0, len(positions), batch_size):
        rows = positions[start : start + batch_size]
        x = torch.from_numpy(np.array(embeddings[rows], dtype=np.float32)).to(device)
        prepared = sae.prepare_input(x, check_finite=False)
        values, indices = sae._topk(sae.pre_activations(prepared), sae.config.k)
        yield prepared.float(), values, indices, sae.decode_topk(values, indices).float()


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, embeddings: np.ndarray, positions: np.ndarray, batch_size: int = 4096) -> dict:
    """FVU, normalised MSE, cosine and L0 over `embeddings[positions]`."""
    n = 0
    residual = sq_norm = cos = l0 = 0.0
    sum_x = None
    sum_sq = 0.0
    for x, values, _, x_hat in _blocks(sae, embeddings, positions, batch_size):
        residual += float((x - x_hat).pow(2).sum())
        sq_norm += float(x.pow(2).sum())
        cos += float(F.cosine_similarity(x, x_hat, dim=1).sum())
        l0 += float((values > 0).sum())
        sum_x = x.sum(0) if sum_x is None else sum_x + x.sum(0)
        sum_sq += float(x.pow(2).sum())
        n += len(x)
    if n == 0:
        return {}
    # One row has no variance around its own mean: its error is normalised by its squared
    # norm instead, as `fraction_of_variance_unexplained` (and the training log) does.
    total_variance = sum_sq - float(sum_x.pow(2).sum()) / n if n > 1 else sq_norm
    return {
        "fvu": residual / max(total_variance, 1e-30),
        "normalized_mse": residual / max(sq_norm, 1e-30),
        "cosine": cos / n,
        "l0": l0 / n,
    }


@torch.no_grad()
def feature_fire_counts(sae: SparseAutoencoder, embeddings: np.ndarray, positions: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """(n_latents,) number of rows of `embeddings[positions]` on which each feature fires."""
    counts = torch.zeros(sae.config.n_latents, dtype=torch.long, device=sae.W_dec.device)
    for _, values, indices, _ in _blocks(sae, embeddings, positions, batch_size):
        active = values > 0
        counts.scatter_add_(0, indices[active], torch.ones_like(indices[active]))
    return counts.cpu().numpy()


@torch.no_grad()
def neighbour_overlap(
    sae: SparseAutoencoder,
    embeddings: np.ndarray,
    query_positions: np.ndarray,
    k: int = 10,
    max_queries: int = 2000,
    batch_size: int = 512,
    corpus_chunk: int = 65536,
) -> float:
    """Mean share of each query's k nearest corpus neighbours (cosine, itself excluded) that
    are still among the k nearest when the search uses its reconstruction instead."""
    device = sae.W_dec.device
    queries = query_positions[:max_queries]
    if len(queries) == 0 or len(embeddings) <= k:
        return float("nan")
    total = 0.0
    for start, (prepared, _, _, x_hat) in zip(range(0, len(queries), batch_size), _blocks(sae, embeddings, queries, batch_size)):
        rows = queries[start : start + batch_size]
        neighbours = []
        for query in (F.normalize(prepared, dim=1), F.normalize(x_hat, dim=1)):
            best_scores = best_ids = None
            for c0 in range(0, len(embeddings), corpus_chunk):
                block = torch.from_numpy(np.array(embeddings[c0 : c0 + corpus_chunk], dtype=np.float32)).to(device)
                scores = query @ F.normalize(block, dim=1).T
                ids = torch.arange(c0, c0 + len(block), device=device)
                self_hit = ids.unsqueeze(0) == torch.as_tensor(rows, device=device).unsqueeze(1)
                scores = scores.masked_fill(self_hit, float("-inf"))
                top = scores.topk(min(k, scores.shape[1]), dim=1)
                cand_scores, cand_ids = top.values, ids[top.indices]
                if best_scores is not None:
                    cand_scores = torch.cat([best_scores, cand_scores], 1)
                    cand_ids = torch.cat([best_ids, cand_ids], 1)
                    keep = cand_scores.topk(k, dim=1).indices
                    cand_scores, cand_ids = cand_scores.gather(1, keep), cand_ids.gather(1, keep)
                best_scores, best_ids = cand_scores, cand_ids
            neighbours.append(best_ids)
        a, b = neighbours
        total += float((a.unsqueeze(2) == b.unsqueeze(1)).any(2).float().sum()) / k
    return total / len(queries)


def evaluate(
    sae: SparseAutoencoder,
    embeddings: np.ndarray,
    train_positions: np.ndarray,
    heldout_positions: np.ndarray,
) -> tuple[dict, np.ndarray]:
    """All metrics of `metrics.json`, and the per-feature training fire counts."""
    sae.eval()
    counts = feature_fire_counts(sae, embeddings, train_positions)
    density = counts / max(1, len(train_positions))
    metrics: dict = {}
    if len(heldout_positions):
        held = reconstruction_metrics(sae, embeddings, heldout_positions)
        metrics.update({f"heldout_{k}": v for k, v in held.items()})
    train_sample = train_positions[:: max(1, len(train_positions) // 20000)]
    metrics["train_fvu"] = reconstruction_metrics(sae, embeddings, train_sample)["fvu"]
    metrics["dead_fraction"] = float((counts == 0).mean())
    metrics["dense_fraction"] = float((density > DENSE_THRESHOLD).mean())
    if len(heldout_positions):
        metrics["neighbour_overlap_at_10"] = neighbour_overlap(sae, embeddings, heldout_positions)
    metrics["n_features"] = int(sae.config.n_latents)
    metrics["n_dead"] = int((counts == 0).sum())
    return metrics, counts


def plot_density(counts: np.ndarray, n_rows: int, path: str | Path, title: str = "") -> None:
    """Histogram of log10 feature density (fires / texts); dead features are counted in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    density = counts / max(1, n_rows)
    alive = density[density > 0]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if len(alive):
        low = math.floor(np.log10(alive.min()) * 4) / 4
        bins = np.arange(low, 0.25, 0.125)
        ax.hist(np.log10(alive), bins=bins, color="#3b6ea8", edgecolor="white", linewidth=0.4)
    ax.axvline(np.log10(DENSE_THRESHOLD), color="#c0392b", linestyle="--", linewidth=1, label=f"dense (> {DENSE_THRESHOLD:.0%})")
    ax.set_xlabel("log10 feature density (share of texts a feature fires on)")
    ax.set_ylabel("features")
    dead = int((density == 0).sum())
    ax.set_title(f"{title}\n{len(density)} features, {dead} dead ({dead / max(1, len(density)):.1%}), over {n_rows} texts".strip())
    ax.legend(loc="upper left", frameon=False)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
