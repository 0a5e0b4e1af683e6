"""Quality of a trained SAE: reconstruction, sparsity, feature density, neighbour overlap.

Every figure is computed on rows the SAE was not trained on, except `train_fvu` (the same
FVU on training rows, to show overfitting) and the feature densities (how often each feature
fires over one pass of the training rows), which say which features are dead (never fire) or
dense (fire on more than 10% of texts).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base_model import sae_similarity, similarity_scores
from .modeling_sbert_sae import SparseAutoencoder
from .utils import atomic_write

DENSE_THRESHOLD = 0.1

REDUCE_ROWS = 4096
"""Per-text figures are summed in float64 this many texts at a time, in the order given, and
these sums added up in turn: a fixed grouping, so that a metric does not depend on the batch
size (smaller for a wide SAE, see `batch_rows`). Summed per batch in float32, FVU and cosine
moved in their 7th digit with the batch size."""

METRIC_DESCRIPTIONS = {
    "heldout_fvu": "fraction of variance unexplained on held-out texts: sum ||x - x_hat||^2 / sum ||x - mean x||^2",
    "heldout_normalized_mse": "mean ||x - x_hat||^2 / mean ||x||^2 on held-out texts",
    "heldout_cosine": "mean cosine(x, x_hat) on held-out texts",
    "heldout_l0": "mean number of firing features per held-out text",
    "train_fvu": "the same FVU on the training texts (a gap to heldout_fvu means overfitting)",
    "dead_fraction": "share of features that never fire over one pass of the training texts",
    "dense_fraction": f"share of features that fire on more than {DENSE_THRESHOLD:.0%} of training texts",
    "neighbour_overlap_at_10": "share of each held-out text's 10 nearest corpus neighbours also found when searching with its reconstruction",
    "neighbour_similarity": (
        "what neighbour_overlap_at_10 ranked neighbours by: the base model's similarity_fn_name "
        "(cosine, dot, euclidean or manhattan; cosine for an SAE without a base model)"
    ),
    "heldout_seen_in_training": (
        "share of held-out texts that are also training texts, word for word (duplicates in the corpus): "
        "the SAE was trained on their very embeddings, so the held-out figures flatter it the more of them there are"
    ),
}


def batch_rows(sae: SparseAutoencoder, most: int = 4096) -> int:
    """Texts per batch: at most `most`, and at most `ENCODE_BATCH_ELEMENTS` pre-activations
    (texts x n_latents, float32: 256 MiB) at a time, as when a corpus is encoded: 4096 texts
    made 805 MB of them for an SAE of 49,152 features (1365 texts now)."""
    from . import activations

    return max(1, min(most, activations.ENCODE_BATCH_ELEMENTS // sae.config.n_latents))


@torch.no_grad()
def _blocks(sae: SparseAutoencoder, embeddings: np.ndarray, positions: np.ndarray, batch_size: int):
    """`(positions, prepared inputs, top-k values, top-k indices, reconstructions)` of equal
    batches of at most `batch_size` texts (4096 texts in 4 batches of 1024 for at most 1365,
    not 1365, 1365, 1365 and 1): the CPU's matrix product rounds a batch of 1 to 3 rows
    otherwise than a larger one, which can change a text's top-k at a near tie."""
    device = sae.W_dec.device
    if len(positions) == 0:
        return
    for rows in np.array_split(positions, -(-len(positions) // batch_size)):
        x = torch.from_numpy(np.array(embeddings[rows], dtype=np.float32)).to(device)
        prepared = sae.prepare_input(x, check_finite=False)
        values, indices = sae._topk(sae.pre_activations(prepared), sae.config.k)
        yield rows, prepared.float(), values, indices, sae.decode_topk(values, indices).float()


NO_VARIANCE = 1e-6
"""Held-out rows whose variance about their mean is under this share of their squared norm are
taken to be one text repeated (distinct texts' embeddings keep about half of it)."""


def fvu_denominator(variance, sq_norm):
    """What a pooled FVU divides the squared error by: the rows' `variance` about their mean, or
    their squared norm `sq_norm` where that variance is under `NO_VARIANCE` of it (floats or
    0-d tensors alike).

    One row has no variance around its own mean, and rows that are all one text (a held-out share
    of a duplicated text) only rounding's (~1e-13, which gave an FVU of 8e12): their error is
    normalised by their squared norm, as `fraction_of_variance_unexplained` does for one row.
    Used by both `reconstruction_metrics` (metrics.json) and `trainer.heldout_fvu` (the training
    log), so the two agree.
    """
    return sq_norm if variance <= NO_VARIANCE * sq_norm else variance


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, embeddings: np.ndarray, positions: np.ndarray, batch_size: int | None = None) -> dict:
    """FVU, normalised MSE, cosine and L0 over `embeddings[positions]`, in batches of at most
    `batch_size` texts (default: `batch_rows`).

    Each text's figures are computed alone in float64 and summed in a fixed grouping
    (`REDUCE_ROWS`), so the metrics do not depend on the batch size as long as the SAE's
    outputs for a text do not (see `_blocks`).
    """
    batch_size = batch_size or batch_rows(sae)
    n = 0
    totals = np.zeros(4)  # squared residual, squared norm, cosine, firing features
    sum_x = None
    for g0 in range(0, len(positions), REDUCE_ROWS):
        group = positions[g0 : g0 + REDUCE_ROWS]
        per_text, xs = [], []
        for _, x, values, _, x_hat in _blocks(sae, embeddings, group, batch_size):
            x, x_hat = x.double(), x_hat.double()
            per_text.append(torch.stack([(x - x_hat).pow(2).sum(1), x.pow(2).sum(1), F.cosine_similarity(x, x_hat, dim=1), (values > 0).sum(1).double()], dim=1).cpu().numpy())
            xs.append(x.cpu().numpy())
        totals += np.concatenate(per_text).sum(0)
        group_sum = np.concatenate(xs).sum(0)
        sum_x = group_sum if sum_x is None else sum_x + group_sum
        n += len(group)
    if n == 0:
        return {}
    residual, sq_norm, cos, l0 = (float(t) for t in totals)
    total_variance = fvu_denominator(sq_norm - float((sum_x**2).sum()) / n if n > 1 else sq_norm, sq_norm)
    return {
        "fvu": residual / max(total_variance, 1e-30),
        "normalized_mse": residual / max(sq_norm, 1e-30),
        "cosine": cos / n,
        "l0": l0 / n,
    }


@torch.no_grad()
def feature_fire_counts(sae: SparseAutoencoder, embeddings: np.ndarray, positions: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """(n_latents,) number of rows of `embeddings[positions]` on which each feature fires
    (in batches of at most `batch_size` texts, default `batch_rows`)."""
    counts = torch.zeros(sae.config.n_latents, dtype=torch.long, device=sae.W_dec.device)
    for _, _, values, indices, _ in _blocks(sae, embeddings, positions, batch_size or batch_rows(sae)):
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
    batch_size: int | None = None,
    corpus_chunk: int = 65536,
    corpus_positions: np.ndarray | None = None,
    similarity: str | None = None,
) -> float:
    """Mean share of each query's k nearest corpus neighbours (itself excluded) that
    are still among the k nearest when the search uses its reconstruction instead (queries
    in batches of at most `batch_size`, default 512 within `batch_rows`' budget; the shared
    neighbours are counted in integers, so the batch size changes no sum). The corpus is
    `embeddings[corpus_positions]` (a domain's texts), every row when None.

    Neighbours are the nearest by `similarity`, default the base model's (`sae_similarity`), as
    search ranks them: by cosine in the SAE's input space; by another similarity between the
    embeddings as the model made them, the query and its reconstruction taken back to the
    query's length as the model made it (the reconstruction of an SAE that normalises is unit
    length, as its input)."""
    device = sae.W_dec.device
    similarity = similarity or sae_similarity(sae)
    batch_size = batch_size or batch_rows(sae, 512)
    queries = query_positions[:max_queries]
    corpus = np.arange(len(embeddings)) if corpus_positions is None else np.sort(np.asarray(corpus_positions))
    if len(queries) == 0 or len(corpus) <= k:
        return float("nan")
    shared = 0
    for rows, prepared, _, _, x_hat in _blocks(sae, embeddings, queries, batch_size):
        neighbours = []
        if similarity == "cosine":
            searched = (F.normalize(prepared, dim=1), F.normalize(x_hat, dim=1))
        else:
            lengths = torch.from_numpy(np.array(embeddings[rows], dtype=np.float32)).to(device).norm(dim=1, keepdim=True)
            scale = lengths / prepared.norm(dim=1, keepdim=True).clamp_min(1e-12)
            searched = (prepared * scale, x_hat * scale)
        for query in searched:
            best_scores = best_ids = None
            for c0 in range(0, len(corpus), corpus_chunk):
                chunk = corpus[c0 : c0 + corpus_chunk]
                # a slice of the memory map where the corpus is every row: no copy by index
                rows_of_block = embeddings[chunk[0] : chunk[-1] + 1] if corpus_positions is None else embeddings[chunk]
                block = torch.from_numpy(np.array(rows_of_block, dtype=np.float32)).to(device)
                scores = query @ F.normalize(block, dim=1).T if similarity == "cosine" else similarity_scores(query, block, similarity)
                ids = torch.from_numpy(chunk).to(device)
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
        shared += int((a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum())
    return shared / k / len(queries)


def evaluate(
    sae: SparseAutoencoder,
    embeddings: np.ndarray,
    train_positions: np.ndarray,
    heldout_positions: np.ndarray,
    corpus_positions: np.ndarray | None = None,
    similarity: str | None = None,
) -> tuple[dict, np.ndarray]:
    """All metrics of `metrics.json`, and the per-feature training fire counts. The neighbour
    overlap searches `embeddings[corpus_positions]` (a domain's texts; every row when None) by
    `similarity`, default the base model's, and says which (`neighbour_similarity`)."""
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
        similarity = similarity or sae_similarity(sae)
        metrics["neighbour_overlap_at_10"] = neighbour_overlap(sae, embeddings, heldout_positions, corpus_positions=corpus_positions, similarity=similarity)
        metrics["neighbour_similarity"] = similarity
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
