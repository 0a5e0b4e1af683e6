"""Feature families: broad features and the narrower ones that fire inside them.

The recipe of O'Neill et al. (2024, public code `Christine8888/saerch`, `matrix.py` and
`family.py`), on the corpus' sparse activations:

1. **Co-occurrence** `C = A^T A` of the binary firing matrix A (texts x n): `C[i, j]` texts
   on which both fire, `C[i, i]` texts on which i fires. A is never made: C is counted from
   the top-k codes chunk by chunk (see `cooccurrence`).
2. **Normalisation** `C_norm[i, j] = C[i, j] / (C[i, i] + 1)`, about P(j fires | i fires);
   entries below `threshold` (0.1) are dropped.
3. **Maximum spanning tree** of the graph those entries make, each edge oriented from the
   denser feature (the parent) to the sparser one (the child).
4. **Families**: a root (in-degree 0) with out-degree > 2, with every feature its DFS
   reaches, is a family; inside it, every child of out-degree > 2 (whose ancestors all
   qualified) heads a family of its own, as the paper's code does. The roots found are
   removed, the tree is built again and searched again, 3 times.
5. Families with more than 3 children are kept, and of two families whose children
   overlap with Jaccard > 0.6 only the larger.

Each family is named from its members' labels (`feature_labels.json`), and the whole is
checked by its block structure: the mean `C_norm` of pairs inside one family over the
mean of the other pairs of family features (each feature counted in the largest family
holding it), against the same ratio for families whose feature ids were permuted at random.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from .activations import SparseActivations, encode_corpus, published_activations
from .errors import ConfigError, InputError, ModelLoadError
from .modeling_sbert_sae import SparseAutoencoder
from .utils import read_json, round_figure, save_figure, usable_cores

logger = logging.getLogger(__name__)

FAMILIES_FILE = "families.json"
FAMILIES_VERSION = 1
COOCCURRENCE_PLOT = "families_cooccurrence.png"
GRAPH_PLOT = "family_graph.png"


@dataclass
class FamilyArguments:
    """How families are found (saved in `families.json`); the defaults are the paper's."""

    threshold: float = 0.1
    """Entries of `C_norm` below this are no edge. (The paper's code uses 0.1 for its first
    tree and, by a default argument, 0.07 for the later ones; this uses one value.)"""
    min_out_degree: int = 3
    """A root heads a family when it has at least this many children in the tree (paper: > 2)."""
    min_children: int = 4
    """A family is kept when it has at least this many members besides its parent (paper: > 3)."""
    removal_rounds: int = 3
    """Times the roots found are removed and the tree built and searched again (paper: 3,
    so 4 trees in all)."""
    descend: bool = True
    """Inside a family, a child of out-degree >= `min_out_degree` heads a family too, and so on
    down (the paper's code does; its text names only the roots)."""
    max_jaccard: float = 0.6
    """Of two families whose children overlap with a Jaccard index above this, only the
    larger is kept."""
    max_density: float = 0.2
    """Features firing on more than this share of texts are left out, as the paper keeps
    only features of density < 0.2: a feature on every text would parent everything."""
    permutations: int = 20
    """Random permutations of feature ids the block ratio is compared against."""
    chunk_rows: int = 262144
    """Texts per chunk when counting co-occurrences (on a GPU fewer where k is large: at
    most 2^24 pairs per chunk)."""
    dense_max_latents: int = 12288
    """On a GPU, up to this many features, co-occurrences are counted in a dense n x n int32
    array there (12288^2 x 4 bytes = 576 MiB); above it, in a sparse sorted list of the pairs
    that occur, still on the GPU; on the CPU always in sparse matrices (see `cooccurrence`)."""
    seed: int = 0

    def validate(self) -> None:
        for name in ("min_out_degree", "min_children", "permutations", "chunk_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.removal_rounds, bool) or not isinstance(self.removal_rounds, int) or self.removal_rounds < 0:
            raise ConfigError(f"removal_rounds must be an integer >= 0, got {self.removal_rounds!r}")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold!r}")
        if not 0 <= self.max_jaccard <= 1:
            raise ConfigError(f"max_jaccard must be in [0, 1], got {self.max_jaccard!r}")
        if not 0 < self.max_density <= 1:
            raise ConfigError(f"max_density must be in (0, 1], got {self.max_density!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:  # numpy seeds are >= 0
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")


@dataclass
class Family:
    """A parent feature and the sparser features under it in the spanning tree.

    Attributes:
        parent: the family's root feature (the densest member).
        children: every other member, in DFS order (strongest edge first).
        under: each child's parent in the tree (`parent` or another child), aligned with `children`.
        depth: each child's distance from `parent` in the tree (1 = a direct child).
        weights: each child's `C_norm[child, under]`, P(its tree parent fires | it fires).
        round: the tree (0 = the first) the family was found in.
        label: the family's name (see `family_label`), None without feature labels.
        parent_label, child_labels: the members' own labels (None where a feature has none).
        keywords: the keywords most of its children share.
    """

    parent: int
    children: list[int]
    under: list[int]
    depth: list[int]
    weights: list[float] = field(default_factory=list)
    round: int = 0
    label: str | None = None
    parent_label: str | None = None
    child_labels: list[str | None] = field(default_factory=list)
    keywords: list[str] = field(default_factory=list)

    @property
    def features(self) -> list[int]:
        """The parent, then the children."""
        return [self.parent, *self.children]

    @property
    def labels(self) -> list[str | None]:
        """Labels of `features`, in that order."""
        return [self.parent_label, *(self.child_labels or [None] * len(self.children))]

    def edges(self) -> list[tuple[int, int]]:
        """The tree's (parent, child) edges inside the family."""
        return list(zip(self.under, self.children))

    def to_dict(self, counts: np.ndarray | None = None, n_texts: int | None = None) -> dict:
        """The family as stored in `families.json` (with densities when `counts` is given)."""

        def density(f: int) -> dict:
            if counts is None or not n_texts:
                return {}
            return {"n_firing": int(counts[f]), "density": round(float(counts[f]) / n_texts, 6)}

        child_labels = self.child_labels or [None] * len(self.children)
        weights = self.weights or [None] * len(self.children)
        return {
            "label": self.label,
            "keywords": list(self.keywords),
            "round": self.round,
            "n_children": len(self.children),
            "parent": {"feature": self.parent, "label": self.parent_label, **density(self.parent)},
            "children": [
                {"feature": c, "label": lab, "under": u, "depth": d, "cooccurrence": None if w is None else round(float(w), 4), **density(c)}
                for c, u, d, w, lab in zip(self.children, self.under, self.depth, weights, child_labels)
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Family":
        children = data["children"]
        return cls(
            parent=int(data["parent"]["feature"]),
            children=[int(c["feature"]) for c in children],
            under=[int(c["under"]) for c in children],
            depth=[int(c["depth"]) for c in children],
            weights=[c.get("cooccurrence") for c in children],
            round=int(data.get("round", 0)),
            label=data.get("label"),
            parent_label=data["parent"].get("label"),
            child_labels=[c.get("label") for c in children],
            keywords=list(data.get("keywords") or []),
        )


@dataclass
class FamilyResult:
    """What `compute_families` returns: the families, a summary, and what the plots need."""

    families: list[Family]
    summary: dict
    settings: dict
    cooccurrence: sp.csr_matrix
    """(n, n) counts `C` (int32: exact below 2^31 texts; see `cooccurrence`); the diagonal
    holds each feature's firing count."""
    n_texts: int

    def __repr__(self) -> str:
        # The dataclass' own listed every family with its members' labels, and the matrix: a
        # notebook cell ending in run_families(...) printed about a MB for runs/wiki's 879 families.
        return (
            f"FamilyResult({len(self.families)} families over {self.n_texts} texts, block_ratio={self.summary.get('block_ratio')}; "
            ".families, .summary hold the rest)"
        )

    @property
    def counts(self) -> np.ndarray:
        return np.asarray(self.cooccurrence.diagonal()).astype(np.int64)


# ------------------------------------------------------------ co-occurrence
def cooccurrence(
    acts: SparseActivations,
    chunk_rows: int = 262144,
    dense_max_latents: int = 12288,
    device: str | torch.device | None = None,
    show_progress: bool = False,
    method: str | None = None,
) -> sp.csr_matrix:
    """Co-occurrence counts `C = A^T A` (n, n) of the binary firing matrix A, never made.

    `C[i, j]` is the number of texts on which features i and j both fire (value > 0),
    `C[i, i]` the number on which i fires. The texts go by in chunks; `method`:

    - "scipy": each chunk is a sparse binary CSR matrix `A_c` (rows, n) and `A_c^T A_c` is
      summed in sparse form on the CPU: memory grows with the pairs that occur.
    - "dense": each chunk's (i, j) pairs are added into a dense int32 n x n array on `device`.
    - "merge": each chunk's pairs, as keys i * n + j, are merged on `device` into a running
      sorted list of distinct keys with their counts: sparse, for n too large to be dense.

    None picks "scipy" on the CPU (measured faster there than "dense": 10k texts, n=6144,
    k=32, 1.5 s against 3.5 s), and on a GPU "dense" up to `dense_max_latents` features,
    else "merge" (H100, 200k texts: k=32, n=12288, 1.7 s dense against 15 s scipy).

    The counts are int32 (int64 from 2^31 texts on, where int32 could overflow): no count
    exceeds the number of texts, and int64 doubled the matrix's values (540 MB for the 67M
    entries of n=49,152 on 10k texts).
    """
    from tqdm.auto import tqdm

    n, k = acts.n_latents, acts.indices.shape[1] if acts.indices.ndim == 2 else 0
    count_dtype = np.int32 if len(acts) < 2**31 else np.int64
    device = torch.device(device or "cpu")
    if method is None:
        method = "scipy" if device.type == "cpu" else ("dense" if n <= dense_max_latents else "merge")
    if method not in ("scipy", "dense", "merge"):
        raise ConfigError(f"method must be scipy, dense or merge, got {method!r}")
    if method == "scipy":
        # Each chunk's product is as large as the whole result (all the pairs that occur), and
        # adding two means copying and sorting both: few large chunks (220k texts, n=9216,
        # k=64: 56 s in 54 chunks of 4096 texts, 9 s in one). A chunk's product is computed in
        # blocks of features by several threads (scipy lets go of the GIL): 4.8 s on 2 cores.
        total = None
        starts = range(0, len(acts), chunk_rows)
        for start in tqdm(starts, desc="co-occurrence", unit="chunk", disable=not show_progress or len(starts) < 2):
            a = _binary_rows(acts.values[start : start + chunk_rows], acts.indices[start : start + chunk_rows], n, count_dtype)
            part = _gram(a)
            total = part if total is None else total + part
        if total is None:
            return sp.csr_matrix((n, n), dtype=count_dtype)
        total.sum_duplicates()  # sorted once (no-op after _gram); later conversions keep the order
        return sp.csr_matrix((total.data.astype(count_dtype, copy=False), total.indices, total.indptr), shape=(n, n))
    rows = max(1, min(chunk_rows, (1 << 24) // max(1, k * k)))  # at most 2^24 pairs (128 MiB of keys) a chunk
    starts = range(0, len(acts), rows)
    bar = dict(desc="co-occurrence", unit="chunk", disable=not show_progress or len(starts) < 2)
    flat = torch.zeros(n * n if method == "dense" else 0, dtype=torch.int32, device=device)
    keys_seen = torch.zeros(0, dtype=torch.int64, device=device)
    counts_seen = torch.zeros(0, dtype=torch.int64, device=device)
    for start in tqdm(starts, **bar):
        idx = torch.from_numpy(np.ascontiguousarray(acts.indices[start : start + rows], dtype=np.int64)).to(device)
        on = torch.from_numpy(np.ascontiguousarray(acts.values[start : start + rows] > 0)).to(device)
        keys = (idx[:, :, None] * n + idx[:, None, :])[on[:, :, None] & on[:, None, :]]
        if method == "dense":
            flat.index_add_(0, keys, torch.ones_like(keys, dtype=torch.int32))
            continue
        keys, counts = torch.unique(keys, return_counts=True)
        keys_seen, where = torch.unique(torch.cat([keys_seen, keys]), return_inverse=True)
        counts_seen = torch.zeros(len(keys_seen), dtype=torch.int64, device=device).index_add_(0, where, torch.cat([counts_seen, counts]))
    if method == "dense":
        keys_seen = flat.nonzero().squeeze(1)
        counts_seen = flat[keys_seen].to(torch.int64)
        del flat
    # The keys come sorted (nonzero and unique sort them): rows and columns in order, so the
    # CSR arrays are read off them, without scipy's sort of ~10^8 (row, column) pairs.
    keys_np, counts_np = keys_seen.cpu().numpy(), counts_seen.cpu().numpy().astype(count_dtype)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys_np // n, minlength=n), out=indptr[1:])
    out = sp.csr_matrix((counts_np, (keys_np % n).astype(np.int32), indptr), shape=(n, n))
    out.has_sorted_indices = True
    return out


def _gram(a: sp.csr_matrix, block: int = 512) -> sp.csr_matrix:
    """`a^T a` (n, n) with sorted indices, its rows computed in blocks by a thread pool.

    Each block is copied, as it comes, into arrays made once for the whole product: holding
    every block and then `sp.vstack`ing them held the product twice (525 MB for the 254 MB of
    n=49,152 on 10k texts). The arrays are made as long as the product can be (row i holds at
    most the entries of the rows of `a` where i fires, and at most n) but untouched: memory is
    taken only where a block is written, and the unwritten end is given back (`resize`)."""
    from concurrent.futures import ThreadPoolExecutor

    at = a.T.tocsr()
    n = at.shape[0]
    bound = int(np.minimum(at @ np.diff(a.indptr).astype(np.int64), n).sum())
    index_dtype = np.int32 if max(bound, n) < 2**31 else np.int64
    indices = np.empty(bound, dtype=index_dtype)
    data = np.empty(bound, dtype=a.dtype)  # the product's dtype: a^T's and a's are a's
    indptr = np.zeros(n + 1, dtype=index_dtype)

    def rows(r0: int) -> sp.csr_matrix:
        product = at[r0 : r0 + block] @ a
        product.sort_indices()
        return product

    filled = 0
    workers = usable_cores()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # At most twice the workers' blocks computed ahead of the one copied (pool.map would
        # run every block at once and hold those that finish before their turn).
        starts = iter(range(0, n, block))
        pending = deque((r0, pool.submit(rows, r0)) for r0 in itertools.islice(starts, 2 * workers))
        while pending:
            r0, future = pending.popleft()
            product = future.result()
            pending.extend((r, pool.submit(rows, r)) for r in itertools.islice(starts, 1))
            size = product.nnz
            indices[filled : filled + size] = product.indices[:size]
            data[filled : filled + size] = product.data[:size]
            indptr[r0 + 1 : r0 + 1 + product.shape[0]] = filled + product.indptr[1:]
            filled += size
            del product, future
    indices.resize(filled, refcheck=False)
    data.resize(filled, refcheck=False)
    out = sp.csr_matrix((data, indices, indptr), shape=(n, a.shape[1]))
    out.has_sorted_indices = True  # each block's rows are sorted, and the blocks come in order
    return out


def _binary_rows(values: np.ndarray, indices: np.ndarray, n: int, dtype=np.int32) -> sp.csr_matrix:
    """(rows, n) CSR with a 1 (of `dtype`, which their products keep) where a feature fires (value > 0) in a row."""
    on = values > 0
    r = np.nonzero(on)[0]
    return sp.csr_matrix((np.ones(len(r), dtype=dtype), (r, indices[on].astype(np.int64))), shape=(len(values), n))


def normalization(cooc: sp.csr_matrix) -> np.ndarray:
    """(n,) float64 `1 / (C[i, i] + 1)`: row i of `C` times it is row i of `C_norm`."""
    return 1.0 / (np.asarray(cooc.diagonal(), dtype=np.float64) + 1.0)


def normalized_cooccurrence(cooc: sp.csr_matrix) -> sp.csr_matrix:
    """`C_norm[i, j] = C[i, j] / (C[i, i] + 1)` (float64, diagonal dropped): about P(j | i).

    The whole matrix as float64 (810 MB for n=49,152 on 10k texts, and as much again while
    it was made): the block ratios read `C` with `normalization` instead (`_ratios`)."""
    out = sp.diags(normalization(cooc)) @ cooc.astype(np.float64)
    out = out.tocsr()
    out.setdiag(0)
    out.eliminate_zeros()
    return out


# ------------------------------------------------------------ trees and families
def edges(cooc: sp.csr_matrix, threshold: float, chunk_entries: int = 1 << 22) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The graph's edges `(i, j, w)`, i < j, with `w = C[i, j] / (min(C[i, i], C[j, j]) + 1) >= threshold`,
    in row, then column order; the ids int32 (int64 from 2^31 features on), the weights float64.

    The paper thresholds the row-normalised `C_norm` and hands the asymmetric matrix to
    networkx as an undirected graph, which keeps whichever of `C_norm[i, j]` and
    `C_norm[j, i]` comes last in row order. Here an edge exists where either passes the
    threshold and weighs the larger, `w` above: P(denser fires | sparser fires), the
    containment a parent-child edge stands for, and the same for i, j as for j, i. (The
    paper's exp() of the weights changes no spanning tree: only their order counts.)
    """
    counts = np.asarray(cooc.diagonal(), dtype=np.int64)
    cooc = cooc.tocsr()
    cooc.sum_duplicates()  # one entry per pair, columns in order within a row
    # int64 ids were a third of the edges' memory (6.5M edges at n=49,152 on 10k texts: 148
    # MB, 99 MB with int32) and were copied again by every tree.
    id_dtype = np.int32 if cooc.shape[0] < 2**31 else np.int64
    parts_i, parts_j, parts_w = [np.zeros(0, id_dtype)], [np.zeros(0, id_dtype)], [np.zeros(0)]
    # Rows in blocks of about `chunk_entries` stored pairs, in row order (the edges' order as
    # before): every pair's row, column and weight at once (sp.triu, then float64 weights) was
    # 0.9 GB above the matrix for n=49,152 on 10k texts (33M pairs, 6.5M edges kept).
    r0, n = 0, cooc.shape[0]
    while r0 < n:
        r1 = max(r0 + 1, int(np.searchsorted(cooc.indptr, cooc.indptr[r0] + chunk_entries, side="right")) - 1)
        r1 = min(r1, n)
        span = slice(cooc.indptr[r0], cooc.indptr[r1])
        i = np.repeat(np.arange(r0, r1, dtype=id_dtype), np.diff(cooc.indptr[r0 : r1 + 1]))
        j = cooc.indices[span].astype(id_dtype, copy=False)
        upper = j > i
        i, j, c = i[upper], j[upper], cooc.data[span][upper]
        w = c.astype(np.float64) / (np.minimum(counts[i], counts[j]) + 1.0)
        keep = w >= threshold
        parts_i.append(i[keep])
        parts_j.append(j[keep])
        parts_w.append(w[keep])
        r0 = r1
    return np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_w)


def spanning_tree(graph: tuple[np.ndarray, np.ndarray, np.ndarray], counts: np.ndarray, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximum spanning forest of the eligible features' edges (`edges`, in row order), each
    edge oriented from the denser feature (more firing texts; ties: the lower id) to the sparser.

    Returns `(parents, children, weights)` of the tree's edges.
    """
    from scipy.sparse.csgraph import minimum_spanning_tree

    i, j, w = graph
    if len(i) > 1 and not ((i[1:] > i[:-1]) | ((i[1:] == i[:-1]) & (j[1:] > j[:-1]))).all():
        # Not from `edges`: put in row, then column order, as scipy's COO -> CSR conversion did
        # (the order decides which of equal weights the tree takes).
        order = np.lexsort((j, i))
        i, j, w = i[order], j[order], w[order]
    keep = eligible[i] & eligible[j]
    n = len(counts)
    # The eligible edges go straight into the CSR arrays csgraph works on: the edges come in
    # row, then column order, so each row's entries are already in place and only the row
    # starts are counted. (Filtering the edges, then a COO -> CSR conversion and csgraph's
    # own copy of it held the eligible edges three more times: the families' peak at
    # n=49,152.) csgraph may overwrite these arrays: they are this tree's alone.
    index_dtype = np.int32 if max(n, len(w)) < 2**31 else np.int64
    indices = j[keep].astype(index_dtype, copy=False)
    if len(indices) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    indptr = np.zeros(n + 1, dtype=index_dtype)
    np.cumsum(np.bincount(i[keep], minlength=n), out=indptr[1:])
    # Weights in (0, 1]: the minimum spanning forest of 2 - w is the maximum one of w, and
    # every stored weight stays > 0 (csgraph reads 0 as no edge).
    data = w[keep]
    np.subtract(2.0, data, out=data)
    graph_csr = sp.csr_matrix((data, indices, indptr), shape=(n, n))
    graph_csr.has_sorted_indices = True
    tree = minimum_spanning_tree(graph_csr, overwrite=True).tocoo()
    a, b, weight = tree.row.astype(np.int64), tree.col.astype(np.int64), 2.0 - tree.data
    a_first = (counts[a] > counts[b]) | ((counts[a] == counts[b]) & (a < b))
    return np.where(a_first, a, b), np.where(a_first, b, a), weight


def _families_in_tree(parents: np.ndarray, children: np.ndarray, weights: np.ndarray, args: FamilyArguments, round_: int) -> list[Family]:
    """Every root (in-degree 0) with out-degree >= `min_out_degree`, with its DFS subtree;
    with `descend`, also every such child inside it, recursively."""
    out: dict[int, list[tuple[float, int]]] = {}
    indegree: Counter = Counter(children.tolist())
    for p, c, w in zip(parents.tolist(), children.tolist(), weights.tolist()):
        out.setdefault(p, []).append((w, c))
    for edges in out.values():
        edges.sort(key=lambda e: (-e[0], e[1]))  # strongest edge first, then by id
    found: list[Family] = []
    heads = [p for p in sorted(out) if indegree[p] == 0 and len(out[p]) >= args.min_out_degree]
    done: set[int] = set()
    while heads:
        head = heads.pop(0)
        if head in done:  # a feature below two roots is reached from both
            continue
        done.add(head)
        family = Family(parent=head, children=[], under=[], depth=[], weights=[], round=round_)
        stack = [(c, head, 1, w) for w, c in reversed(out[head])]
        while stack:
            node, up, depth, w = stack.pop()
            family.children.append(node)
            family.under.append(up)
            family.depth.append(depth)
            family.weights.append(w)
            stack.extend((c, node, depth + 1, cw) for cw, c in reversed(out.get(node, [])))
        found.append(family)
        if args.descend:
            heads.extend(c for _, c in out[head] if len(out.get(c, [])) >= args.min_out_degree)
    return found


def deduplicate(families: list[Family], max_jaccard: float) -> list[Family]:
    """Keep the larger of two families whose children overlap with Jaccard > `max_jaccard`
    (larger first: more children, then the earlier round, then the lower parent id)."""
    ranked = sorted(families, key=lambda f: (-len(f.children), f.round, f.parent))
    kept: list[Family] = []
    sets: list[set] = []
    for fam in ranked:
        own = set(fam.children)
        if all(len(own & other) / len(own | other) <= max_jaccard for other in sets):
            kept.append(fam)
            sets.append(own)
    return kept


def find_families(cooc: sp.csr_matrix, n_texts: int, args: FamilyArguments | None = None) -> list[Family]:
    """The paper's families from co-occurrence counts `cooc` (n, n) over `n_texts` texts,
    largest first (unlabelled: see `label_families`)."""
    args = args or FamilyArguments()
    args.validate()
    counts = np.asarray(cooc.diagonal(), dtype=np.int64)
    eligible = (counts > 0) & (counts <= args.max_density * max(1, n_texts))
    graph = edges(cooc, args.threshold)
    candidates: list[Family] = []
    for round_ in range(args.removal_rounds + 1):
        parents, children, weights = spanning_tree(graph, counts, eligible)
        found = _families_in_tree(parents, children, weights, args, round_)
        if not found:
            break
        candidates.extend(found)
        eligible = eligible.copy()
        eligible[[f.parent for f in found]] = False
    sized = [f for f in candidates if len(f.children) >= args.min_children]
    return deduplicate(sized, args.max_jaccard)


# ------------------------------------------------------------ labels
def _keywords_of(entry: dict | None, shortlist: int) -> list[str]:
    """A feature's label keywords, then the first `shortlist` of its keyword shortlist."""
    if not entry:
        return []
    words = [w.strip() for w in (entry.get("label") or "").split(",") if w.strip()]
    for kw in (entry.get("keywords") or [])[:shortlist]:
        word = kw.get("keyword") if isinstance(kw, dict) else kw
        if isinstance(word, str) and word not in words:
            words.append(word)
    return words


def family_label(
    parent_entry: dict | None,
    child_entries: list[dict | None],
    document_frequency: dict[str, int] | None = None,
    n_documents: int | None = None,
    top: int = 3,
    shortlist: int = 5,
) -> tuple[str | None, list[str]]:
    """A family's name and the keywords its children share.

    Every child votes once for each of its label keywords and its first `shortlist`
    KeyBERT keywords. Keywords with at least 2 votes, not already in the parent's label,
    are the family's `keywords`, ranked by votes x log(n_documents / document_frequency)
    (how many of all features have the keyword: words every feature has, "known",
    "located", rank low; by votes alone without frequencies), then by the parent's own
    order, then alphabetically. The name is the parent's label,
    then the `top` shared keywords after a colon ("football, club: league, goalkeeper"):
    the parent says what the family is about, the shared keywords what its narrower
    features have in common beyond it.
    """
    parent_words = _keywords_of(parent_entry, shortlist)
    parent_label = (parent_entry or {}).get("label")
    in_label = {w.strip().lower() for w in (parent_label or "").split(",")}
    votes: Counter = Counter()
    for entry in child_entries:
        votes.update({w.lower() for w in _keywords_of(entry, shortlist)})
    df = document_frequency or {}
    total = max(n_documents or 0, len(child_entries) + 1)

    def score(word: str) -> float:
        return votes[word] * math.log((total + 1) / (df[word] + 0.5)) if word in df else votes[word]

    rank = {w.lower(): i for i, w in enumerate(parent_words)}
    shared = [w for w, v in votes.items() if v >= 2 and w not in in_label]
    shared.sort(key=lambda w: (-score(w), rank.get(w, len(rank)), w))
    if parent_label and shared:
        return f"{parent_label}: {', '.join(shared[:top])}", shared
    if parent_label:
        return parent_label, shared
    return (", ".join(shared[:top]) or None), shared


def label_families(families: list[Family], label_data: dict | None, shortlist: int = 5) -> list[Family]:
    """Fill each family's member labels and name from a loaded `feature_labels.json`
    (`sae.label_data`); without one, labels stay None."""
    entries = (label_data or {}).get("features") or {}
    df: Counter = Counter()
    for entry in entries.values():
        df.update({w.lower() for w in _keywords_of(entry, shortlist)})
    n_documents = sum(1 for e in entries.values() if _keywords_of(e, shortlist))
    for fam in families:
        parent_entry = entries.get(fam.parent)
        child_entries = [entries.get(c) for c in fam.children]
        fam.parent_label = (parent_entry or {}).get("label")
        fam.child_labels = [(e or {}).get("label") for e in child_entries]
        if entries:
            fam.label, fam.keywords = family_label(parent_entry, child_entries, df, n_documents, shortlist=shortlist)
        else:
            fam.label, fam.keywords = None, []
    return families


# ------------------------------------------------------------ block structure
def family_blocks(families: list[Family], n: int) -> np.ndarray:
    """(n,) the block of each feature: the index of the first family in `families` that holds
    it (the largest, in `find_families`' order), -1 outside families. Families may share a
    few features; blocks do not, as in the co-occurrence plot."""
    block = np.full(n, -1, dtype=np.int32)  # int32: gathers over the entries are several times faster
    for b in range(len(families) - 1, -1, -1):
        block[families[b].features] = b
    return block


def block_ratio(norm: sp.csr_matrix, families: list[Family], blocks: np.ndarray | None = None, row_scale: np.ndarray | None = None) -> float | None:
    """The mean `C_norm` over ordered pairs of distinct features in one block (`family_blocks`),
    over its mean over the pairs of features in different blocks; None without two blocks'
    worth of pairs or when the outside mean is 0. `norm` is `C_norm`, or the counts `C` with
    `row_scale=normalization(C)` (see `_ratios`)."""
    block = family_blocks(families, norm.shape[0]) if blocks is None else blocks
    return _ratios(norm, block[:, None], row_scale)[0]


def _ratios(norm: sp.csr_matrix, blocks: np.ndarray, row_scale: np.ndarray | None = None, chunk_entries: int = 1 << 22) -> list[float | None]:
    """The block ratio of each column of `blocks` (n, m): m block assignments at once.

    The sum over all pairs of members, `m^T C_norm m` for a member indicator m, takes one
    sparse product for every assignment together; the sum inside blocks reads `C_norm` at
    the pairs that share a block (the sum of squared block sizes), for every assignment in
    one pass over the matrix (`_values_at`).

    With `row_scale`, row i of `norm` is read times `row_scale[i]`: the counts `C` with
    `normalization(C)` are read as `C_norm` (its values to the bit), without a float64 copy
    of the whole matrix (810 MB for n=49,152 on 10k texts, 67M entries). Its diagonal is
    never counted, so it need not be dropped. The product goes a block of about
    `chunk_entries` stored values at a time, so that integer counts are made float a
    block at a time too.
    """
    norm = norm.tocsr()
    n = norm.shape[0]
    scale = np.ones(n) if row_scale is None else np.asarray(row_scale, dtype=np.float64)
    members = (blocks >= 0).astype(np.float64)
    product = np.zeros(members.shape)
    r0 = 0
    while r0 < n:
        r1 = min(n, max(r0 + 1, int(np.searchsorted(norm.indptr, norm.indptr[r0] + chunk_entries, side="right")) - 1))
        product[r0:r1] = norm[r0:r1] @ members
        r0 = r1
    product *= scale[:, None]
    among_sums = np.einsum("ij,ij->j", members, product) - (norm.diagonal() * scale) @ members  # pairs of distinct features
    pairs = [_pairs_within_blocks(column) for column in blocks.T]
    which = np.repeat(np.arange(blocks.shape[1]), [len(a) for a, _ in pairs])
    rows = np.concatenate([a for a, _ in pairs] + [np.zeros(0, np.int64)])
    values = _values_at(norm, rows, np.concatenate([b for _, b in pairs] + [np.zeros(0, np.int64)]))
    if row_scale is not None:
        values *= scale[rows]
    inside_sums = np.bincount(which, weights=values, minlength=blocks.shape[1])
    out = []
    for column, among_sum, inside_sum in zip(blocks.T, among_sums, inside_sums):
        sizes = np.bincount(column[column >= 0])
        count = int(sizes.sum())
        inside_pairs = int((sizes * (sizes - 1)).sum())
        outside_pairs = count * (count - 1) - inside_pairs
        if inside_pairs == 0 or outside_pairs == 0:
            out.append(None)
            continue
        outside_mean = (float(among_sum) - float(inside_sum)) / outside_pairs
        out.append(None if outside_mean <= 0 else (float(inside_sum) / inside_pairs) / outside_mean)
    return out


def _values_at(m: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray, block_rows: int | None = None) -> np.ndarray:
    """`m[rows, cols]` (0 where nothing is stored), as float64, in one pass over `m`:
    each block of rows is spread into a dense buffer and the pairs in it read from there.

    (scipy's own lookup scans whole rows for each pair when there are few pairs, and a
    binary search per pair costs a dozen random reads: 7 s against 1 s for 21 x 1.5M pairs
    in 57M entries.) The buffer holds at most 2^22 values by default (512 rows up to 8192
    columns): 512 rows of float64 were 200 MB for n=49,152."""
    out = np.zeros(len(rows), dtype=np.float64)
    if len(rows) == 0 or m.nnz == 0:
        return out
    m.sum_duplicates()  # one entry per (row, column), so that spreading a row writes each once
    n_rows = m.shape[0]
    if block_rows is None:
        block_rows = max(1, min(512, (1 << 22) // max(1, m.shape[1])))
    order = np.argsort(rows, kind="stable")
    edges = np.searchsorted(rows[order], np.arange(0, n_rows + block_rows, block_rows))
    dense = np.zeros((block_rows, m.shape[1]), dtype=m.dtype)
    for b, r0 in enumerate(range(0, n_rows, block_rows)):
        if edges[b] == edges[b + 1]:
            continue
        r1 = min(r0 + block_rows, n_rows)
        span = slice(m.indptr[r0], m.indptr[r1])
        local = np.repeat(np.arange(r1 - r0), np.diff(m.indptr[r0 : r1 + 1]))
        dense[local, m.indices[span]] = m.data[span]
        picked = order[edges[b] : edges[b + 1]]
        out[picked] = dense[rows[picked] - r0, cols[picked]]
        dense[local, m.indices[span]] = 0.0
    return out


def _pairs_within_blocks(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered pair `(a, b)`, a != b, of features in the same block (>= 0)."""
    members = np.flatnonzero(block >= 0)
    order = members[np.argsort(block[members], kind="stable")]
    sizes = np.bincount(block[order])
    sizes = sizes[sizes > 0]
    first = np.repeat(np.cumsum(sizes) - sizes, sizes)  # each member's block's start in `order`
    span = np.repeat(sizes, sizes)  # each member's block size
    a = np.repeat(order, span)
    offset = np.arange(len(a)) - np.repeat(np.cumsum(span) - span, span)
    b = order[np.repeat(first, span) + offset]
    keep = a != b
    return a[keep], b[keep]


def permuted_block_ratios(norm: sp.csr_matrix, families: list[Family], eligible: np.ndarray, permutations: int, seed: int = 0, row_scale: np.ndarray | None = None) -> list[float]:
    """`block_ratio` of the same blocks after randomly permuting the eligible feature ids:
    the same sizes, with members drawn at random (`norm`, `row_scale`: as `block_ratio`'s)."""
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(eligible)
    block = family_blocks(families, norm.shape[0])
    moved = np.empty((norm.shape[0], permutations), dtype=block.dtype)
    for p in range(permutations):
        mapping = np.arange(norm.shape[0])
        mapping[pool] = rng.permutation(pool)
        moved[mapping, p] = block  # feature f's block now belongs to mapping[f]
    return [r for r in _ratios(norm, moved, row_scale) if r is not None]


# ------------------------------------------------------------ the whole
def compute_families(
    acts: SparseActivations,
    args: FamilyArguments | None = None,
    label_data: dict | None = None,
    device: str | torch.device | None = None,
    show_progress: bool = False,
) -> FamilyResult:
    """Families of the features that fire in `acts`, named from `label_data`, with the block ratio."""
    args = args or FamilyArguments()
    args.validate()
    started = clock = time.perf_counter()
    parts: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        parts[name] = round(now - clock, 2)
        clock = now

    cooc = cooccurrence(acts, args.chunk_rows, args.dense_max_latents, device=device, show_progress=show_progress)
    lap("cooccurrence")
    families = label_families(find_families(cooc, len(acts), args), label_data)
    lap("trees")
    counts = np.asarray(cooc.diagonal(), dtype=np.int64)
    eligible = (counts > 0) & (counts <= args.max_density * max(1, len(acts)))
    scale = normalization(cooc)  # C_norm read off C, never made (see _ratios)
    ratio = block_ratio(cooc, families, row_scale=scale)
    lap("block_ratio")
    permuted = permuted_block_ratios(cooc, families, eligible, args.permutations, args.seed, row_scale=scale) if families else []
    lap("permutations")
    sizes = [len(f.children) for f in families]
    summary = {
        "n_families": len(families),
        "n_texts": len(acts),
        "n_features": acts.n_latents,
        "n_eligible_features": int(eligible.sum()),
        "n_features_in_families": len({f for fam in families for f in fam.features}),
        "children_min": min(sizes) if sizes else None,
        "children_median": float(np.median(sizes)) if sizes else None,
        "children_mean": round(float(np.mean(sizes)), 2) if sizes else None,
        "children_max": max(sizes) if sizes else None,
        "families_per_round": [sum(1 for f in families if f.round == r) for r in range(args.removal_rounds + 1)],
        "block_ratio": round_figure(ratio),
        "permuted_block_ratio_mean": round_figure(np.mean(permuted)) if permuted else None,
        "permuted_block_ratio_std": round_figure(np.std(permuted)) if permuted else None,
        "permuted_block_ratio_max": round_figure(max(permuted)) if permuted else None,
        "n_permutations": len(permuted),
        "seconds": round(time.perf_counter() - started, 2),
        "seconds_parts": parts,
    }
    return FamilyResult(families=families, summary=summary, settings=asdict(args), cooccurrence=cooc, n_texts=len(acts))


def families_document(result: FamilyResult, sae: SparseAutoencoder | None = None, dataset: str | None = None, domain: dict | None = None) -> dict:
    """The content of `families.json`; `domain` ({"column", "value"}) where the corpus was one
    domain's texts of `dataset` (a domain's SAE), None where it was all of it."""
    counts = result.counts
    return {
        "version": FAMILIES_VERSION,
        "method": "O'Neill et al. 2024: C = A^T A of binary firing; C_norm[i,j] = C[i,j]/(C[i,i]+1) >= threshold; maximum spanning tree (edge weight max(C_norm[i,j], C_norm[j,i])) oriented dense -> sparse; roots of out-degree > 2 with their DFS subtree, roots removed and repeated; > 3 children; Jaccard deduplication",
        "base_model": sae.config.base_model if sae is not None else None,
        "dataset": dataset,
        "domain": domain,
        "settings": result.settings,
        "summary": result.summary,
        "families": [fam.to_dict(counts, result.n_texts) for fam in result.families],
    }


def load_families(path: str | Path) -> list[Family]:
    """The families of a `families.json` file (or of the folder holding one)."""
    from .utils import read_json

    path = Path(path)
    if path.is_dir():
        path = path / FAMILIES_FILE
    try:
        data = read_json(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read {path}: {err}") from err
    return parse_families(data, source=str(path))


def parse_families(data, source: str = FAMILIES_FILE) -> list[Family]:
    if not isinstance(data, dict) or not isinstance(data.get("families"), list):
        raise ModelLoadError(f"{source} is malformed: expected an object with a 'families' list")
    try:
        return [Family.from_dict(entry) for entry in data["families"]]
    except (KeyError, TypeError, ValueError) as err:
        raise ModelLoadError(f"{source} is malformed: {type(err).__name__}: {err}") from err


def feature_families(
    sae: SparseAutoencoder,
    embeddings: np.ndarray | torch.Tensor | None = None,
    *,
    activations: SparseActivations | None = None,
    args: FamilyArguments | None = None,
    show_progress: bool = False,
) -> list[Family]:
    """The SAE's feature families, largest first, with labels where the SAE has them.

    Computed from the corpus' `activations`, or from `embeddings` (n_texts, d_in) encoded
    first. With neither, the `families.json` saved beside the SAE (`sbert-sae families`)
    is read when `args` is None, else the families are computed on the corpus the run
    folder was trained on (its embeddings come from the cache), else, for an SAE from the
    Hub, on the activations dataset it was published with (nothing is embedded).
    """
    if activations is None and embeddings is None:
        source = getattr(sae, "name_or_path", "") or ""
        if args is None and source:
            try:
                data = sae.read_extra_json(FAMILIES_FILE)
            except (OSError, ValueError) as err:
                if isinstance(err, ModelLoadError):
                    raise
                data = None
            if data is not None:
                return parse_families(data, source=f"{source}/{FAMILIES_FILE}")
        if source and (Path(source) / "training_args.json").exists():
            data = corpus_arguments(source, device=str(sae.W_dec.device))
            return run_families(source, data, args=args, show_progress=show_progress, write=False, sae=sae).families
        if not (getattr(sae, "activations_link", None) or {}).get("repo_id"):
            raise InputError(
                "pass the corpus' embeddings or activations: this SAE has no families.json, no training run "
                "folder and no published activations dataset to read its corpus from"
            )
        activations = published_activations(sae)
    if activations is None:
        x = embeddings.detach().float().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != sae.config.d_in:
            raise InputError(f"embeddings must have shape (n_texts, {sae.config.d_in}), got {tuple(x.shape)}")
        activations = encode_corpus(sae, x, show_progress=show_progress)
    elif activations.n_latents != sae.config.n_latents:
        raise InputError(f"activations are of {activations.n_latents} features but the SAE has {sae.config.n_latents}")
    return compute_families(activations, args, getattr(sae, "label_data", None), device=sae.W_dec.device, show_progress=show_progress).families


def corpus_arguments(sae_path: str | Path, data=None, **overrides):
    """The `DataArguments` of the corpus to find families on: `data`, else the dataset the run
    in `sae_path` was trained on (`training_args.json`), with the non-None `overrides`
    (cache_dir, device, ...) applied."""
    import dataclasses

    sae_path = Path(sae_path)
    if not sae_path.is_dir():
        raise ModelLoadError(f"{sae_path} is not a folder: pass the folder of a trained SAE (config.json, model.safetensors)")
    if data is None:
        from .hub import training_data_arguments

        data = training_data_arguments(sae_path)
    return dataclasses.replace(data, **{k: v for k, v in overrides.items() if v is not None})


def run_families(
    sae_path: str | Path,
    data=None,
    args: FamilyArguments | None = None,
    show_progress: bool = True,
    plot_family: int | None = None,
    write: bool = True,
    sae: SparseAutoencoder | None = None,
) -> FamilyResult:
    """Families of the SAE in the run folder `sae_path` over a dataset (`DataArguments`;
    default: the one it was trained on, see `corpus_arguments`); writes `families.json`,
    `families_cooccurrence.png` and `family_graph.png` (the family headed by `plot_family`,
    else `pick_family`'s) there, or nothing without `write`. Returns the result."""

    from .pipeline import cache_codes, load_sae_corpus
    from .utils import check_weights_unchanged, run_lock, weights_stamp, write_json

    sae_path = Path(sae_path)
    data = corpus_arguments(sae_path, data)
    args = args or FamilyArguments()
    args.validate()
    stamp = weights_stamp(sae_path)
    if sae is None:
        sae = SparseAutoencoder.from_pretrained(sae_path)
    data, _, cache = load_sae_corpus(sae, sae_path, data, show_progress=show_progress)
    device = data.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sae = sae.to(device)
    acts = cache_codes(sae, cache, show_progress=show_progress)
    result = compute_families(acts, args, getattr(sae, "label_data", None), device=device, show_progress=show_progress)
    chosen = pick_family(result.families)
    if plot_family is not None:
        matches = [f for f in result.families if f.parent == plot_family]
        if not matches:
            raise InputError(f"feature {plot_family} heads no family; the largest families' parents are {[f.parent for f in result.families[:10]]}")
        chosen = matches[0]
    result.summary["plotted_family"] = None if chosen is None else chosen.parent
    if not write:
        return result
    dataset_name = data.dataset if isinstance(data.dataset, str) else ",".join(data.dataset)
    with run_lock(sae_path):
        check_weights_unchanged(sae_path, stamp, "families")
        kept = _families_kept_over_none(sae_path / FAMILIES_FILE) if not result.families else None
        if kept is not None:
            # A run that found nothing (a corpus too small, a threshold too high) must not wipe
            # families found before: the file and its plots stay, and the caller is told.
            result.summary["kept_existing"] = kept
            return result
        write_json(sae_path / FAMILIES_FILE, families_document(result, sae, dataset=dataset_name, domain=cache.meta.get("domain")))
        for name in (COOCCURRENCE_PLOT, GRAPH_PLOT):
            (sae_path / name).unlink(missing_ok=True)  # never leave plots of other families beside this file
        if chosen is not None:
            plot_cooccurrence_blocks(result, sae_path / COOCCURRENCE_PLOT)
            plot_family_graph(chosen, sae_path / GRAPH_PLOT, counts=result.counts, n_texts=result.n_texts)
    return result


def _families_kept_over_none(path: Path) -> int | None:
    """The number of families in an existing `families.json` that holds any, else None."""
    if not path.is_file():
        return None
    try:
        families = read_json(path).get("families")
    except Exception:  # noqa: BLE001 - an unreadable file holds nothing worth keeping
        return None
    return len(families) if isinstance(families, list) and families else None


# ------------------------------------------------------------ plots
def pick_family(families: list[Family], fewest: int = 8, most: int = 25) -> Family | None:
    """The family a graph shows best: of those with `fewest` to `most` children (else those
    with at most `most`, else all), one more than a layer deep if any is, and of those the
    one whose children co-occur most with their tree parents (mean `weights`): a
    mid-sized, tight tree."""
    pool = [f for f in families if fewest <= len(f.children) <= most] or [f for f in families if len(f.children) <= most] or families
    if not pool:
        return None
    return max(pool, key=lambda f: (max(f.depth, default=0) > 1, float(np.mean([w or 0.0 for w in f.weights])) if f.weights else 0.0, len(f.children)))


def _family_order(families: list[Family], max_features: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Features ordered family by family (each where it first appears), and each family's span."""
    order: list[int] = []
    seen: set[int] = set()
    spans = []
    for fam in families:
        new = [f for f in fam.features if f not in seen]
        if order and len(order) + len(new) > max_features:
            break
        start = len(order)
        order.extend(new)
        seen.update(new)
        spans.append((start, len(order)))
    return order, spans


def plot_cooccurrence_blocks(result: FamilyResult, path: str | Path, max_features: int = 1500) -> None:
    """`C_norm` (P(column fires | row fires)) of the features in families, ordered family by
    family, on a log colour scale, with each family's block outlined: families make blocks
    on the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    order, spans = _family_order(result.families, max_features)
    # Only the shown features' rows of C_norm, not the whole matrix in float64 (see _ratios).
    matrix = result.cooccurrence[order][:, order].toarray() * normalization(result.cooccurrence)[order][:, None]
    np.fill_diagonal(matrix, 0.0)
    matrix[matrix <= 0] = np.nan
    fig, ax = plt.subplots(figsize=(8.5, 7.5))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(matrix, cmap=cmap, norm=LogNorm(vmin=1e-3, vmax=1.0), interpolation="nearest")
    for start, end in spans:
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), end - start, end - start, fill=False, edgecolor="red", linewidth=0.6))
    fig.colorbar(image, ax=ax, label="C_norm[i, j] = C[i, j] / (C[i, i] + 1)  ~  P(j fires | i fires)")
    s = result.summary
    shown = f"{len(spans)} of {len(result.families)} families" if len(spans) < len(result.families) else f"{len(spans)} families"
    permuted = s.get("permuted_block_ratio_mean")
    ratio = f"block ratio {s['block_ratio']:.2f} vs {permuted:.2f} permuted" if s.get("block_ratio") is not None and permuted is not None else ""
    ax.set_title(f"Co-occurrence of {len(order)} features in {shown}, ordered by family\n{ratio}", fontsize=10)
    ax.set_xlabel("feature j (ordered by family: parent, then children)")
    ax.set_ylabel("feature i")
    fig.tight_layout()
    save_figure(fig, path, dpi=150)
    plt.close(fig)


def family_tree(family: Family, max_nodes: int = 40) -> tuple[dict[int, list[int]], dict[int, float | None]]:
    """The part of `family`'s tree a picture shows: at most `max_nodes` members, shallow ones
    first (so that a shown child's tree parent is shown too). Returns each shown member's
    shown children, in the family's order, and each shown child's weight (None without)."""
    kept = {family.parent}
    kids: dict[int, list[int]] = {}
    weight: dict[int, float | None] = {}
    for i in sorted(range(len(family.children)), key=lambda i: (family.depth[i], i)):
        if len(kept) >= max_nodes:
            break
        c, u = family.children[i], family.under[i]
        if u in kept:
            kept.add(c)
            kids.setdefault(u, []).append(c)
            weight[c] = family.weights[i] if family.weights else None
    return kids, weight


GRAPH_WIDTH_IN = 8.0
"""Width of family_graph.png in inches: drawn at 200 dpi (1600 px) and shown at about half that
in a model card (~800 px), where its 11 pt text is ~15 px high."""


def plot_family_graph(family: Family, path: str | Path, counts: np.ndarray | None = None, n_texts: int | None = None, max_nodes: int = 40) -> None:
    """One family as a vertical tree, as the explorer draws it: one member a row, the parent
    on top, each child indented under its tree parent; each named by its id and label (cut to
    the row), then the share of texts it fires on and `C_norm[child, parent]`, which is also
    its edge's width. The figure is `GRAPH_WIDTH_IN` wide whatever the family and grows by a
    row a member, so its text stays readable in a model card (a layered tree spread the
    leaves across 2600 px of 7 pt text: 2-3 px high at the card's width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kids, weight = family_tree(family, max_nodes)
    labels = dict(zip(family.features, family.labels))
    rows: list[tuple[int, int, int | None]] = []

    def walk(node: int, depth: int, up: int | None) -> None:
        rows.append((node, depth, up))
        for c in kids.get(node, []):
            walk(c, depth + 1, node)

    walk(family.parent, 0, None)
    row_in, indent_in, top_in, font = 0.34, 0.32, 1.05, 11
    height = top_in + row_in * (len(rows) + 0.3)
    fig = plt.figure(figsize=(GRAPH_WIDTH_IN, height))
    # One axes over the whole figure, in inches, y downward: text goes where it is drawn.
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, GRAPH_WIDTH_IN)
    ax.set_ylim(height, 0)
    ax.axis("off")
    x = {node: 0.25 + depth * indent_in for node, depth, _ in rows}
    y = {node: top_in + (i + 0.5) * row_in for i, (node, _, _) in enumerate(rows)}
    for u, below in kids.items():
        ax.plot([x[u], x[u]], [y[u], y[below[-1]]], color="0.6", linewidth=1, zorder=1, solid_capstyle="butt")
        for c in below:
            ax.plot([x[u], x[c]], [y[c], y[c]], color="0.6", linewidth=1 + 5 * (weight.get(c) or 0), zorder=1, solid_capstyle="butt")
    densities = counts is not None and bool(n_texts)
    # About 0.55 em a character: what fits between a member's dot and the right edge.
    chars_per_in = 72 / (0.55 * font)
    for node, _, up in rows:
        root = up is None
        ax.scatter([x[node]], [y[node]], s=90 if root else 40, color="tab:red" if root else "tab:blue", zorder=3)
        notes = [f"{counts[node] / n_texts:.2%}"] if densities else []
        if weight.get(node) is not None:
            notes.append(f"{weight[node]:.2f}")
        note = " · ".join(notes)
        room = int((GRAPH_WIDTH_IN - x[node] - 0.3) * chars_per_in) - len(f"#{node} ") - len(note)
        name = labels.get(node) or "(no label)"
        if len(name) > room:
            name = name[: max(room - 1, 1)] + "…"
        shown = ax.text(x[node] + 0.14, y[node], f"#{node} {name}", fontsize=font, va="center", fontweight="bold" if root else "normal", zorder=4)
        if note:
            ax.annotate(note, xy=(1, 0.5), xycoords=shown, xytext=(5, 0), textcoords="offset points", fontsize=font - 1, color="0.4", va="center", zorder=4)
    hidden = len(family.features) - len(rows)
    title = f"Feature family of #{family.parent}: {family.label or '(no labels)'}"
    room = int((GRAPH_WIDTH_IN - 0.4) * 72 / (0.62 * (font + 2)))  # bold: ~0.62 em a character
    title = title if len(title) <= room else title[: room - 1] + "…"
    ax.text(0.2, 0.27, title, fontsize=font + 2, fontweight="bold", va="center")
    children = f"{len(family.children)} children" + (f" ({hidden} deeper ones not shown)" if hidden else "")
    after = ("the share of texts it fires on, then " if densities else "") + "P(its tree parent fires | it fires), the line's width"
    ax.text(0.2, 0.56, children, fontsize=font - 2, color="0.35", va="center")
    ax.text(0.2, 0.8, f"after each member: {after}", fontsize=font - 2, color="0.35", va="center")
    save_figure(fig, path, dpi=200)
    plt.close(fig)
