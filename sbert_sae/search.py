"""Steered semantic search: the nearest texts of a corpus to a query whose SAE features are
raised, lowered or clamped (O'Neill et al. 2024, "steering").

A query embedding `q` (in the SAE's input space) is moved along decoder directions `d_f`
(unit length), by strengths in units of the query's length (unit embeddings: the paper's
`u` and `d`; strength 1 on a direction orthogonal to the query turns it by 45 degrees):

- `method="add"` (the paper's): `q' = q + |q| (sum_up s_f d_f - sum_down s_f d_f)`;
- `method="clamp"`: the query's code `z` is edited (`z_f <- max(z_f, s_f |q|)` for a raised
  feature, `z_f <- (1 - min(s_f, 1)) z_f` for a lowered one: strength 1 removes it) and
  the change is decoded, `q' = q + W_dec^T (z' - z)`, so what the SAE does not
  reconstruct of the query is kept;
- `clamp={f: value}` sets feature f's activation to `value` whatever the method.

Features are named by id, by a label query ("features about X": the feature whose label
is nearest to X by the base model's embedding), or as a whole family (`"family:<parent
id>"` or a `Family`): a family counts as one direction, its members' mean, so a strength
means the same for a family as for one feature.

Texts are ranked by the similarity the SAE's base model declares (`similarity_fn_name` of
sentence-transformers: "cosine" for most models, "dot" for e.g. msmarco's dot-product
models; `base_model.sae_similarity`), cosine for an SAE without a base model. Steering
happens in the SAE's input space (unit length for `normalize="l2"`); the steered query is then
taken back to the model's scale (times the query's length as the model made it, over its length
in the SAE's input space: `SteeredQuery.model_vector`) and compared with the corpus'
embeddings as the model made them. So "dot" ranks by the steered query's direction against the
texts' own embeddings, whose lengths count as the model was trained for them to (a query's own
length changes no ranking; a score is the dot product at the query's length); "euclidean" and
"manhattan" rank by distance from the steered query at the query's length.

Search is exact (one matrix product over the corpus, chunked) up to
`EXACT_SEARCH_MAX_ROWS` rows and, above that, approximate with a FAISS HNSW index when
`faiss` is installed (`pip install sbert-sae[faiss]`); exact still for a base model ranking
by euclidean or manhattan distance, which FAISS's inner-product index cannot.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .activations import SparseActivations, codes_paths, corpus_codes, encoder_fingerprint, save_npy
from .base_model import SIMILARITIES, check_one_query_choice, sae_similarity, similarity_scores
from .data import column_values
from .errors import InputError
from .modeling_sbert_sae import SparseAutoencoder

logger = logging.getLogger(__name__)

EXACT_SEARCH_MAX_ROWS = 2_000_000
"""Above this many corpus texts, search with a FAISS HNSW index when faiss is installed
(exact search over 2M x 384 fp32 vectors is 3 GB and ~0.1 s a query on a CPU)."""

LIVE_COUNTS_FROM_CORPUS_MAX_ROWS = 200_000
"""Up to this many texts, the corpus is encoded to tell which features never fire on it."""

METHODS = ("add", "clamp")
_FAMILY_KEY = re.compile(r"^family:(\d+)$")


@dataclass
class Hit:
    """One search result.

    Attributes:
        row: the text's row id in the dataset.
        text: the text (None when the index was built without texts).
        score: the base model's similarity (`SteerableIndex.similarity`: cosine unless the model
            declares another) between the text's embedding and the (steered) query.
        steered: activation of each steered feature in this text (0.0 where it does not fire).
    """

    row: int
    text: str | None
    score: float
    steered: dict[int, float] = field(default_factory=dict)


@dataclass
class SteeredQuery:
    """A query vector after steering.

    Attributes:
        original: (d_in,) the query in the SAE's input space.
        vector: (d_in,) the steered query.
        cosine: cosine(original, vector): how far steering moved the query.
        up, down, clamp: the resolved targets, feature id -> strength (clamp: -> activation).
        method: "add" or "clamp".
        resolved: how each named target was read: the caller's key -> feature ids.
        scale: the query's length as the base model made it over its length in the SAE's input
            space (1 for an SAE with `normalize="none"`).
    """

    # Left out of the repr: a notebook showing a search result printed both in full (2 x d_in numbers).
    original: torch.Tensor = field(repr=False)
    vector: torch.Tensor = field(repr=False)
    cosine: float
    up: dict[int, float]
    down: dict[int, float]
    clamp: dict[int, float]
    method: str
    resolved: dict[str, list[int]] = field(default_factory=dict)
    scale: float = 1.0

    @property
    def model_vector(self) -> torch.Tensor:
        """(d_in,) the steered query at the base model's scale: what dot, euclidean and
        manhattan similarities compare with the corpus' embeddings as the model made them."""
        return self.vector * self.scale

    @property
    def features(self) -> list[int]:
        return list(dict.fromkeys([*self.up, *self.down, *self.clamp]))


@dataclass
class SearchResult:
    """What `SteerableIndex.search` returns.

    Attributes:
        query: the query's text (None for a query given as a vector).
        hits: the nearest texts, best first (`Hit`: row, text, score, steered).
        steering: the query before and after steering (`SteeredQuery`).
    """

    query: str | None
    hits: list[Hit]
    steering: SteeredQuery

    @property
    def cosine(self) -> float:
        """cosine(query, steered query): how far steering moved it (1.0 unsteered)."""
        return self.steering.cosine

    def rows(self) -> list[int]:
        """The hits' dataset row ids, best first."""
        return [h.row for h in self.hits]


LABEL_MATCH_QUANTILES = (0.999, 0.9999)
"""A label is a near match of a query when their cosine reaches the first of these quantiles
of the cosines of unrelated pairs (`LabelFinder.thresholds`), a close match at the second."""
LABEL_PAIRS_SAMPLE = 2048
"""Labels (picked at random, seeded) whose every pair gives those quantiles: ~2M pairs."""
REFERENCE_WORDS = 1024
"""Words of the base model's own vocabulary (picked at random, seeded) whose every pair, ~520k
pairs, is the model's reference for the cut-offs: how near two words of it get by chance."""
REFERENCE_PAIRS_WEIGHT = 100_000
"""How many of an SAE's label pairs the model's reference counts as: the pairs a 99.99th
percentile needs for 10 pairs above it. An SAE with far more label pairs (2M from 2048
labels) has cut-offs of its own; one of tens of labels (~1700 pairs: its 99.99th
percentile is its closest pair) has about the model's."""
STRENGTHS = ("words", "close", "near", "weak")
"""How well a label matches a query, best first: "words" (the label or its keywords hold
every word of the query), then by the cosine of their embeddings."""


@dataclass
class FeatureMatch:
    feature: int
    score: float
    """Cosine of the label's and the query's embeddings."""
    label: str | None
    strength: str = "close"
    """One of `STRENGTHS`."""

    @property
    def matches(self) -> bool:
        """Whether the label is a match at all ("words" or "close"), not only the nearest."""
        return self.strength in ("words", "close")


class LabelFinder:
    """Finds an SAE's features by their labels, as the Search and Features tabs and `--up
    <words>` do: the labels or keywords that hold a query's words, then the labels nearest
    to it by the base model's embeddings, each with how strong a match it is."""

    def __init__(self, sae: SparseAutoencoder):
        self.sae = sae
        self._labelled: list[int] | None = None
        self._vectors: torch.Tensor | None = None
        self._haystacks: list[str] | None = None
        self._holding: dict[str, np.ndarray] = {}
        self._thresholds: tuple[float, float] | None = None
        # Held while the vectors, cut-offs or haystacks are made: a Find racing the warm-up
        # waits for them instead of embedding them again, and never sees them half made.
        self._lock = threading.RLock()
        self._warm_up_lock = threading.Lock()
        self._warm_up_thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        """Whether a Find now embeds only its query: the labels' vectors, the cut-offs and the
        labels' words are made (or there are no labels)."""
        return not self.labelled or (self._vectors is not None and self._thresholds is not None and self._haystacks is not None)

    def start_warm_up(self) -> None:
        """Make what every Find needs (`warm_up`) in a background thread, unless it is made or
        under way: else the first Find loads the base model and embeds every label and the
        reference words (seconds, or minutes for a large SAE on a CPU) while its user waits."""
        with self._warm_up_lock:
            if self.ready or (self._warm_up_thread is not None and self._warm_up_thread.is_alive()):
                return
            self._warm_up_thread = threading.Thread(target=self._warm_up_quietly, name="sbert-sae-label-finder", daemon=True)
            self._warm_up_thread.start()

    def wait_warm_up(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds (None: until done) for a warm-up under way; `ready`."""
        thread = self._warm_up_thread
        if thread is not None:
            thread.join(timeout)
        return self.ready

    def warm_up(self) -> None:
        """Load the base model, run it once, and make the labels' vectors (read from the cache
        when an earlier run kept them), the match cut-offs and the labels' words."""
        if not self.labelled:
            return
        started = time.perf_counter()
        self.sae.embed_texts([self.sae.feature_labels[self.labelled[0]]])  # the model's first pass is its slowest
        self.vectors()
        self.thresholds()
        self._label_words()
        logger.info("label search of %d labels ready in %.1fs", len(self.labelled), time.perf_counter() - started)

    def _warm_up_quietly(self) -> None:
        try:
            self.warm_up()
        except Exception as err:  # noqa: BLE001 - the first Find makes them itself, and says what fails
            logger.warning("could not prepare the label search in the background (%s): the first Find will", err)

    @property
    def labelled(self) -> list[int]:
        """The features with a label, in id order."""
        if self._labelled is None:
            self._labelled = [f for f, label in enumerate(self.sae.feature_labels) if label]
        return self._labelled

    def vectors(self) -> torch.Tensor:
        """(len(labelled), d) unit vectors of the labels, kept in the cache folder (keyed by
        the model and the labels) so that a label search is quick the next time too:
        embedding 6144 labels takes ~10 s on a CPU."""
        with self._lock:
            if self._vectors is None:
                labels = self.sae.feature_labels
                self._vectors = _embedded_kept(self.sae, [labels[f] for f in self.labelled], "label-vectors")
        return self._vectors

    def _label_words(self) -> list[str]:
        """Each labelled feature's label and keywords, lower-cased, in one string; and, made
        with them, which of those strings hold each of their words (`_holding`)."""
        with self._lock:
            if self._haystacks is None:
                labels = self.sae.feature_labels
                features = (getattr(self.sae, "label_data", None) or {}).get("features", {})
                haystacks = [
                    " | ".join([labels[f] or "", *(k.get("keyword", "") for k in features.get(f, {}).get("keywords", []) if isinstance(k, dict))]).lower()
                    for f in self.labelled
                ]
                holding: dict[str, list[int]] = {}
                for j, haystack in enumerate(haystacks):
                    for word in dict.fromkeys(_WORD.findall(haystack)):
                        holding.setdefault(word, []).append(j)
                self._holding = {word: np.asarray(js, dtype=np.int64) for word, js in holding.items()}
                self._haystacks = haystacks  # last: `ready` reads it
        return self._haystacks

    def _literal(self, query: str) -> np.ndarray:
        """(len(labelled),) whether each label or its keywords hold every word of `query`
        (`_holds_word`). A word of letters and digits is one of a string's words, found in
        the index of them; any other ("c++", "u.s.", a word in a script written without
        spaces) is looked for in the strings that hold its words of letters, if it has any,
        else in all: each of 6134 strings read for each word took 0.05-1 s a Find."""
        haystacks = self._label_words()
        candidates = np.arange(len(haystacks))
        others = []
        for word in dict.fromkeys(query.lower().split()):
            if _UNSPACED.search(word):
                others.append(word)
                continue
            pieces = _WORD.findall(word)
            if not (len(pieces) == 1 and pieces[0] == word):
                others.append(word)
            for piece in pieces:  # each of them is a whole word of a string that holds `word`
                candidates = np.intersect1d(candidates, self._holding.get(piece, candidates[:0]), assume_unique=True)
        literal = np.zeros(len(haystacks), dtype=bool)
        if others:
            candidates = np.asarray([j for j in candidates if all(_holds_word(haystacks[j], w) for w in others)], dtype=np.int64)
        literal[candidates] = True
        return literal

    def find(self, query: str, top: int = 10) -> list[FeatureMatch]:
        """Labelled features whose label is nearest to `query` (cosine of the base model's
        embeddings), best first; features whose label or keywords hold every word of the
        query come first. Each match says how strong it is (`FeatureMatch.strength`): a
        query that no label is near (a typo, nonsense) still gets its nearest labels, all
        "weak"."""
        if not isinstance(query, str) or not query.strip():
            raise InputError(f"a label query must be a non-empty string, got {query!r}")
        if not self.labelled:
            raise InputError("this SAE has no feature labels to search: run `sbert-sae label` on it first")
        labels = self.sae.feature_labels
        q = F.normalize(self.sae.embed_texts([query]).float(), dim=-1).cpu()[0]
        scores = (self.vectors() @ q).numpy()
        near, close = self.thresholds()
        literal = self._literal(query)
        # Every label that holds the words (however far down by cosine), then by cosine.
        ranked = np.lexsort((-scores, ~literal))[:top]

        def strength(j: int) -> str:
            if literal[j]:
                return "words"
            return "close" if scores[j] >= close else "near" if scores[j] >= near else "weak"

        return [FeatureMatch(self.labelled[j], float(scores[j]), labels[self.labelled[j]], strength(j)) for j in ranked]

    def label_pair_cosines(self) -> np.ndarray:
        """The cosines between two different labels: all pairs of up to `LABEL_PAIRS_SAMPLE`
        of them (two features with one label are one label: their cosine of 1 says nothing)."""
        labels = self.sae.feature_labels
        _, first = np.unique(np.asarray([labels[f] for f in self.labelled], dtype=object), return_index=True)
        rows = np.sort(first)
        if len(rows) > LABEL_PAIRS_SAMPLE:
            rows = np.sort(np.random.default_rng(0).choice(rows, LABEL_PAIRS_SAMPLE, replace=False))
        if len(rows) < 2:
            return np.zeros(0, dtype=np.float32)
        sample = self.vectors()[torch.from_numpy(rows)]
        return (sample @ sample.T).numpy()[np.triu_indices(len(rows), 1)]

    def reference_pair_cosines(self) -> np.ndarray:
        """The cosines between two words of the base model's own vocabulary: all pairs of
        `REFERENCE_WORDS` of them, picked at random (seeded). Empty where the model's
        tokenizer lists no words."""
        words = reference_words(self.sae.base_sentence_transformer())
        if len(words) < 2:
            return np.zeros(0, dtype=np.float32)
        # Beside the label vectors, where `sbert-sae cache` lists and prunes them.
        vectors = _embedded_kept(self.sae, words, "label-vectors")
        return (vectors @ vectors.T).numpy()[np.triu_indices(len(words), 1)]

    def thresholds(self) -> tuple[float, float]:
        """(near, close): the cosines a label needs with a query to be a near or a close match.

        The `LABEL_MATCH_QUANTILES` (99.9th, 99.99th percentiles) of the cosines of unrelated
        pairs, measured with the SAE's own base model, so that they hold for any model and
        language (one model's unrelated texts have a cosine of 0.1, another's of 0.7): a
        query as near a label as one unrelated pair in a thousand (ten thousand) is a near
        (close) match. Unrelated pairs are pairs of the SAE's labels, and pairs of words of
        the model's vocabulary (`reference_pair_cosines`) counted as `REFERENCE_PAIRS_WEIGHT`
        label pairs: the quantiles are those of the two pooled, each label pair weighing
        one, the words' pairs as many as that weight together. So an SAE of thousands of
        labels has cut-offs of its own (6144 Wikipedia labels: near 0.50, close 0.67, the
        same as from its labels alone), and one of tens has about the model's: 59 labels
        give 1711 pairs, whose 99.99th percentile is their closest pair, two labels of one
        topic (0.80 where the model's reference says 0.69). With no words and fewer than two
        different labels there is nothing to measure: only the query's words can match."""
        with self._lock:
            if self._thresholds is None:
                pairs = self.label_pair_cosines() if self.labelled else np.zeros(0, dtype=np.float32)
                try:
                    reference = self.reference_pair_cosines()
                except Exception as err:  # noqa: BLE001 - a model without a usable vocabulary: the labels alone
                    logger.warning("no reference words from the base model's vocabulary (%s): the label match cut-offs come from the labels alone", err)
                    reference = np.zeros(0, dtype=np.float32)
                values = np.concatenate([pairs, reference]).astype(np.float64)
                if len(values) == 0:
                    self._thresholds = (float("inf"), float("inf"))
                else:
                    weights = np.concatenate([np.ones(len(pairs)), np.full(len(reference), REFERENCE_PAIRS_WEIGHT / max(len(reference), 1))])
                    near, close = weighted_high_quantiles(values, weights, LABEL_MATCH_QUANTILES)
                    self._thresholds = (near, close)
        return self._thresholds


def weighted_high_quantiles(values: np.ndarray, weights: np.ndarray, quantiles: Sequence[float]) -> list[float]:
    """For each quantile q, the smallest of `values` whose own weight and that of every
    smaller value reach the fraction q of all the `weights` (positive), as sorting them all
    would give. Only the largest values, the fewest that can hold the weight above the lowest
    quantile, are sorted (`np.argpartition`): ~2.6M label and word pairs took 0.5-5 s to
    sort on a shared CPU, for the 99.9th and 99.99th percentiles."""
    n, lowest = len(values), min(quantiles)
    total = float(np.sum(weights))
    # Enough of the largest values to outweigh the fraction above the lowest quantile, however
    # light each of them is, and two more, so that the lowest quantile's own value is among them.
    keep = min(n, int(np.ceil((1.0 - lowest) * total / float(np.min(weights)))) + 2)
    top, below = np.arange(n), 0.0
    if keep < n // 2:
        top = np.argpartition(values, n - keep)[n - keep :]
        below = total - float(np.sum(weights[top]))
        if below >= lowest * total:  # only where rounding says so: sort them all
            top, below = np.arange(n), 0.0
    top = top[np.argsort(values[top], kind="stable")]
    cumulative = below + np.cumsum(weights[top])
    cumulative /= cumulative[-1]
    return [float(values[top][min(np.searchsorted(cumulative, q), len(top) - 1)]) for q in quantiles]


def reference_words(model, n: int = REFERENCE_WORDS) -> list[str]:
    """`n` whole words of the model's tokenizer vocabulary, picked at random (seeded): tokens
    that start a word (no '##' continuation; with the '▁' or 'Ġ' word mark where the
    vocabulary uses one), letters only, 3+ letters (2+ in scripts written without spaces).
    They speak the model's languages, whatever those are."""
    tokenizer = getattr(model, "tokenizer", None)
    vocab = tokenizer.get_vocab() if tokenizer is not None and hasattr(tokenizer, "get_vocab") else {}
    marked = [t for t in vocab if t[:1] in ("\u2581", "\u0120")]
    tokens = [t[1:] for t in marked] if len(marked) > len(vocab) // 10 else [t for t in vocab if not t.startswith("##")]
    words = sorted({t for t in tokens if t.isalpha() and len(t) >= (2 if _UNSPACED.search(t) else 3)})
    if len(words) <= n:
        return words
    return [words[i] for i in np.sort(np.random.default_rng(0).choice(len(words), n, replace=False))]


def _embedded_kept(sae: SparseAutoencoder, texts: list[str], folder: str) -> torch.Tensor:
    """(len(texts), d) unit vectors of `texts` by the SAE's base model, kept in the cache
    folder's `folder` (keyed by the model and the texts) and read back from there."""
    from .embeddings import default_cache_dir
    from .utils import atomic_write

    config = sae.config
    key = hashlib.sha256(json.dumps([config.base_model, config.base_model_revision, config.base_model_kwargs, texts]).encode()).hexdigest()[:20]
    path = default_cache_dir() / folder / f"{key}.npy"
    if path.is_file():
        try:
            vectors = np.load(path, allow_pickle=False)
            if vectors.shape[0] == len(texts):
                with contextlib.suppress(OSError):  # when they were last used (`sbert-sae cache remove --older-than`)
                    os.utime(path)
                return torch.from_numpy(vectors)
        except (OSError, ValueError):
            pass  # unreadable: embed again and replace it
    vectors = F.normalize(sae.embed_texts(texts).float(), dim=-1).cpu()
    try:
        atomic_write(path, lambda tmp: save_npy(tmp, vectors.numpy()))
    except OSError as err:
        logger.warning("could not keep the vectors in %s: %s", path.parent, err)
    return vectors


class SteerableIndex:
    """A corpus' embeddings and their SAE codes, searchable with steered queries.

    Build it with `SteerableIndex.build(sae, dataset)` (a dataset name, folder or files,
    embedded with the SAE's base model through the embedding cache), `from_run(folder)`
    (the corpus the run was trained on), or directly from `embeddings` (n_texts, d_in)
    and their `texts`.

    A query given as text is embedded as `SparseAutoencoder.query_encoding` says: with the
    base model's "query" prompt where the model has one and the corpus was embedded as
    documents, else as the corpus was; `query_prompt_name`, `query_prompt` ("" for none) or
    `query_like_corpus` choose otherwise. `query_encoding` tells which prompt it is.
    """

    def __init__(
        self,
        sae: SparseAutoencoder,
        embeddings: np.ndarray | torch.Tensor,
        *,
        texts: Sequence[str] | None = None,
        row_ids: np.ndarray | None = None,
        codes_dir: str | Path | None = None,
        codes_fingerprint: str | None = None,
        codes_meta: dict | None = None,
        device: str | torch.device | None = None,
        backend: str = "auto",
        show_progress: bool = False,
        similarity: str | None = None,
        query_prompt_name: str | None = None,
        query_prompt: str | None = None,
        query_like_corpus: bool = False,
    ):
        if not isinstance(sae, SparseAutoencoder):
            raise InputError(f"sae must be a SparseAutoencoder, got {type(sae).__name__}")
        shape = tuple(embeddings.shape)
        if len(shape) != 2 or shape[1] != sae.config.d_in:
            raise InputError(f"embeddings must have shape (n_texts, {sae.config.d_in}), got {shape}")
        if shape[0] == 0:
            raise InputError("the corpus is empty (0 embeddings)")
        if texts is not None and len(texts) != shape[0]:
            raise InputError(f"{len(texts)} texts for {shape[0]} embeddings: give one text per embedding")
        if backend not in ("auto", "exact", "faiss"):
            raise InputError(f"backend must be 'auto', 'exact' or 'faiss', got {backend!r}")
        if similarity is not None and similarity not in SIMILARITIES:
            raise InputError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        self._similarity = similarity
        check_one_query_choice(query_prompt_name, query_prompt, query_like_corpus, prefix="query_")
        self._query_asked = {"prompt_name": query_prompt_name, "prompt": query_prompt, "like_corpus": bool(query_like_corpus)}
        self._query_encoding = None
        self.device = torch.device(device or sae.W_dec.device)
        self.sae = sae.to(self.device).eval()
        self.texts = texts
        self.row_ids = np.arange(shape[0]) if row_ids is None else np.asarray(row_ids)
        self.codes_dir = Path(codes_dir) if codes_dir is not None else None
        self.show_progress = show_progress
        self._embeddings = embeddings
        self._corpus: torch.Tensor | None = None
        self._codes: SparseActivations | None = None
        self._row_position: dict[int, int] | None = None
        self.label_finder = LabelFinder(sae)
        self._families = None
        self._fire_counts: np.ndarray | None = None
        # The name of the codes in codes_dir: the encoder's fingerprint unless given (a domain's
        # rows of a cache keep theirs apart from the whole dataset's, see pipeline.codes_fingerprint).
        self._fingerprint: str | None = codes_fingerprint
        self._codes_meta = codes_meta  # written beside them (`activations.codes_meta_path`)
        # Chosen here, FAISS gives way to exact search where it cannot rank by the base model's
        # similarity (euclidean, manhattan: known once the model is); given by name, it says so.
        self._backend_chosen = backend == "auto"
        if backend == "auto":
            backend = "exact" if shape[0] <= EXACT_SEARCH_MAX_ROWS or not _faiss_available() else "faiss"
        if backend == "faiss" and not _faiss_available():
            raise InputError("backend='faiss' needs the faiss package: pip install 'sbert-sae[faiss]'")
        self.backend = backend
        self._faiss_index = None

    # ------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        sae: SparseAutoencoder,
        dataset=None,
        *,
        texts: Sequence[str] | None = None,
        embeddings: np.ndarray | torch.Tensor | None = None,
        text_column: str = "text",
        split: str = "train",
        config_name: str | None = None,
        json_field: str | None = None,
        max_rows: int | None = None,
        cache_dir: str | None = None,
        device: str | None = None,
        backend: str = "auto",
        show_progress: bool = False,
        query_prompt_name: str | None = None,
        query_prompt: str | None = None,
        query_like_corpus: bool = False,
    ) -> "SteerableIndex":
        """An index over `dataset` (Hub id, folder or files; or a `DataArguments`), over
        `texts` (embedded with the SAE's base model), or over ready `embeddings` (with
        their `texts`, optional). Codes are computed once and kept beside the cache.
        `query_*`: how a query is embedded (see the class)."""
        query = {"query_prompt_name": query_prompt_name, "query_prompt": query_prompt, "query_like_corpus": query_like_corpus}
        if embeddings is not None:
            return cls(sae, embeddings, texts=texts, device=device, backend=backend, show_progress=show_progress, **query)
        if texts is not None:
            texts = list(texts)
            if not texts:
                raise InputError("texts is empty")
            vectors = sae.embed_texts(texts)
            return cls(sae, vectors, texts=texts, device=device, backend=backend, show_progress=show_progress, **query)
        if dataset is None:
            raise InputError("give a dataset, texts or embeddings to search")
        from .pipeline import DataArguments

        if isinstance(dataset, DataArguments):
            data = dataset
        else:
            data = DataArguments(dataset=dataset, text_column=text_column, split=split, config_name=config_name, json_field=json_field, max_rows=max_rows, cache_dir=cache_dir, device=device)
        return cls._from_data(sae, "the SAE", data, device=device, backend=backend, show_progress=show_progress, query=query)

    @classmethod
    def from_run(
        cls,
        sae_path: str | Path,
        data=None,
        *,
        device: str | None = None,
        backend: str = "auto",
        show_progress: bool = False,
        query_prompt_name: str | None = None,
        query_prompt: str | None = None,
        query_like_corpus: bool = False,
    ) -> "SteerableIndex":
        """The index of the corpus the SAE in run folder `sae_path` was trained on (or `data`);
        `query_*`: how a query is embedded (see the class)."""
        query = {"query_prompt_name": query_prompt_name, "query_prompt": query_prompt, "query_like_corpus": query_like_corpus}
        from .families import corpus_arguments

        data = corpus_arguments(sae_path, data, device=device)
        sae = SparseAutoencoder.from_pretrained(sae_path)
        return cls._from_data(sae, sae_path, data, device=device, backend=backend, show_progress=show_progress, query=query)

    @classmethod
    def _from_data(cls, sae, sae_path, data, *, device, backend, show_progress, query=None) -> "SteerableIndex":
        from .pipeline import codes_fingerprint, codes_meta, load_sae_corpus

        data, ds, cache = load_sae_corpus(sae, sae_path, data, show_progress=show_progress)
        texts = DatasetTexts(ds, data.text_column, cache.row_ids)
        return cls(
            sae, cache.embeddings, texts=texts, row_ids=cache.row_ids, codes_dir=cache.path,
            codes_fingerprint=codes_fingerprint(sae, cache), codes_meta=codes_meta(cache),
            device=device, backend=backend, show_progress=show_progress, **(query or {}),
        )

    def __len__(self) -> int:
        return int(self._embeddings.shape[0])

    @property
    def similarity(self) -> str:
        """What texts are ranked by: the `similarity` given, else the base model's own
        (`base_model.sae_similarity`), read when first needed (a text query has loaded the model
        by then)."""
        if self._similarity is None:
            self._similarity = sae_similarity(self.sae)
        return self._similarity

    # -------------------------------------------------------- corpus state
    def vectors(self, positions) -> torch.Tensor:
        """(len(positions), d_in) the corpus texts at `positions` (a slice or indices) in the
        SAE's input space, float32 on the device."""
        if not isinstance(positions, slice):
            positions = np.asarray(positions)
            if isinstance(self._embeddings, torch.Tensor):
                positions = torch.as_tensor(positions)
        block = self._embeddings[positions]
        # A copy: the memory map is read-only, and torch wants writable arrays.
        x = block if isinstance(block, torch.Tensor) else torch.from_numpy(np.array(block, dtype=np.float32))
        return self.sae.prepare_input(x.to(self.device, torch.float32), check_finite=False).float()

    def _blocks(self, size: int = 65536):
        """The whole corpus as `vectors`, `size` rows at a time."""
        for start in range(0, len(self), size):
            yield self.vectors(slice(start, start + size))

    def _model_blocks(self, size: int = 65536):
        """The whole corpus' embeddings as the base model made them (not brought to the SAE's
        input space), float32 on the device, `size` rows at a time."""
        for start in range(0, len(self), size):
            block = self._embeddings[start : start + size]
            x = block if isinstance(block, torch.Tensor) else torch.from_numpy(np.array(block, dtype=np.float32))
            yield x.to(self.device, torch.float32)

    @property
    def corpus(self) -> torch.Tensor:
        """(n_texts, d_in) the corpus vectors search compares a query with, on the device: unit
        length in the SAE's input space for cosine, the model's embeddings as they are else."""
        if self._corpus is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
            if self.similarity == "cosine":
                self._corpus = torch.cat([F.normalize(block, dim=-1).to(dtype) for block in self._blocks()])
            else:
                self._corpus = torch.cat([block.to(dtype) for block in self._model_blocks()])
        return self._corpus

    @property
    def codes(self) -> SparseActivations:
        """Top-k codes of every corpus text, computed once (and kept beside the embedding
        cache, keyed by the SAE's encoder weights, when the index has a cache folder)."""
        if self._codes is None:
            embeddings = self._embeddings.detach().float().cpu().numpy() if isinstance(self._embeddings, torch.Tensor) else self._embeddings
            self._codes = corpus_codes(self.sae, embeddings, self.codes_dir, show_progress=self.show_progress, fingerprint=self.encoder_fingerprint(), meta=self._codes_meta)
        return self._codes

    def codes_paths(self) -> tuple[Path, Path] | None:
        """Where the corpus codes (values, indices) are kept, or None without a cache folder."""
        return None if self.codes_dir is None else codes_paths(self.sae, self.codes_dir, self.encoder_fingerprint())

    def encoder_fingerprint(self) -> str:
        """A digest of what the codes depend on: the encoder's weights, k and the input norm."""
        if self._fingerprint is None:
            self._fingerprint = encoder_fingerprint(self.sae)
        return self._fingerprint

    @property
    def fire_counts(self) -> np.ndarray:
        """(n_latents,) number of corpus texts each feature fires on."""
        if self._fire_counts is None:
            self._fire_counts = self.codes.fire_counts()
        return self._fire_counts

    def live_counts(self) -> np.ndarray:
        """(n_latents,) texts each feature fires on: over this corpus, except that a corpus
        above `LIVE_COUNTS_FROM_CORPUS_MAX_ROWS` whose codes are not computed yet is judged
        by the SAE's training texts (its run's feature_density.json) when known, so that it
        is not encoded whole just to check a steering target."""
        if self._codes is None and len(self) > LIVE_COUNTS_FROM_CORPUS_MAX_ROWS:
            source = Path(getattr(self.sae, "name_or_path", "") or "")
            density = source / "feature_density.json" if str(source) else None
            if density is not None and density.is_file():
                from .utils import read_json

                counts = np.asarray(read_json(density).get("fire_counts", []))
                if counts.shape == (self.sae.config.n_latents,):
                    return counts
        return self.fire_counts

    def text_of(self, positions: Sequence[int]) -> list[str | None]:
        if self.texts is None:
            return [None] * len(positions)
        if isinstance(self.texts, DatasetTexts):
            return self.texts.get(list(positions))
        return [self.texts[int(p)] for p in positions]

    # ------------------------------------------------------------- features
    def _check_feature(self, feature, role: str) -> int:
        n = self.sae.config.n_latents
        if isinstance(feature, (bool, np.bool_)) or not isinstance(feature, (int, np.integer)):
            raise InputError(f"{role} feature {feature!r} is not a feature id (an integer in 0..{n - 1})")
        if not 0 <= int(feature) < n:
            raise InputError(f"{role} feature {int(feature)} does not exist: this SAE has features 0..{n - 1}")
        return int(feature)

    def features_about(self, query: str, top: int = 10) -> list[FeatureMatch]:
        """`LabelFinder.find`: features by their labels, best first, each with its strength."""
        return self.label_finder.find(query, top=top)

    def label_match_thresholds(self) -> tuple[float, float]:
        """`LabelFinder.thresholds`: (near, close), the cosines a near or close match needs."""
        return self.label_finder.thresholds()

    def family_members(self, parent: int) -> list[int]:
        from .families import Family

        if isinstance(parent, Family):
            return [parent.parent, *parent.children]
        if self._families is None:
            from .families import FAMILIES_FILE, parse_families

            source = getattr(self.sae, "name_or_path", "") or ""
            data = self.sae.read_extra_json(FAMILIES_FILE)
            if data is None:
                raise InputError("this SAE has no families.json: run `sbert-sae families` on it, or pass a Family")
            self._families = {fam.parent: fam for fam in parse_families(data, source=f"{source}/{FAMILIES_FILE}")}
        if parent not in self._families:
            raise InputError(f"feature {parent} heads no family; family parents include {sorted(self._families)[:10]}")
        fam = self._families[parent]
        return [fam.parent, *fam.children]

    def resolve(self, targets, role: str) -> tuple[dict[int, float], dict[str, list[int]]]:
        """Feature id -> strength for the caller's targets: a mapping of id, label query or
        "family:<parent>" to strength, a list of (target, strength) pairs (targets may be
        `Family` objects there), or a list of targets (strength 1)."""
        from .families import Family

        if targets is None:
            return {}, {}
        if isinstance(targets, (str, int, np.integer, Family)):
            targets = [targets]
        if isinstance(targets, Mapping):
            pairs = list(targets.items())
        else:  # targets, or (target, strength) pairs (a Family is not hashable: it cannot key a dict)
            pairs = [t if isinstance(t, tuple) and len(t) == 2 else (t, 1.0) for t in targets]
        out: dict[int, float] = {}
        resolved: dict[str, list[int]] = {}
        for key, strength in pairs:
            if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not np.isfinite(strength):
                raise InputError(f"{role} strength for {key!r} must be a finite number, got {strength!r}")
            if isinstance(key, Family):
                members = self.family_members(key)
                name = f"family:{key.parent}"
            elif isinstance(key, str) and _FAMILY_KEY.match(key.strip()):
                members = self.family_members(int(_FAMILY_KEY.match(key.strip()).group(1)))
                name = key.strip()
            elif isinstance(key, str) and key.strip().isdigit():
                members = [self._check_feature(int(key.strip()), role)]
                name = key.strip()
            elif isinstance(key, str):
                match = self.features_about(key, top=1)[0]
                members, name = [match.feature], key
                logger.debug("%s %r -> feature %d %r", role, key, match.feature, match.label)
                if not match.matches:
                    # Steered all the same (the caller asked for it), but not in silence.
                    logger.warning(
                        "no feature label matches %r: steering (%s) the nearest, #%d %r, a %s match (cos %.2f); name a feature by its id to choose another", key, role, match.feature, match.label, match.strength, match.score
                    )
            else:
                members = [self._check_feature(key, role)]
                name = str(int(key))
            resolved[name] = members
            share = float(strength) / len(members)
            for f in members:
                out[f] = out.get(f, 0.0) + share
        return out, resolved

    # ------------------------------------------------------------ steering
    @property
    def query_encoding(self):
        """How a query given as text is embedded (`base_model.QueryEncoding`: its prompt, and
        why); loads the base model. InputError for a prompt name the model does not have."""
        if self._query_encoding is None:
            self._query_encoding = self.sae.query_encoding(**self._query_asked)
        return self._query_encoding

    @torch.no_grad()
    def query_vector(self, query: str | torch.Tensor | np.ndarray) -> torch.Tensor:
        """(d_in,) the query in the SAE's input space: a text is embedded with the base model."""
        return self.sae.prepare_input(self._model_query(query))[0].float()

    @torch.no_grad()
    def _model_query(self, query: str | torch.Tensor | np.ndarray) -> torch.Tensor:
        """(1, d_in) the query as the base model embeds it, float32 on the device."""
        if isinstance(query, str):
            if not query.strip():
                raise InputError("the query is empty")
            x = self.sae.embed_queries(query, **self._query_asked)  # one string: a bad one is named "text", not "texts[0]"
        elif isinstance(query, (torch.Tensor, np.ndarray)):
            x = torch.as_tensor(query, dtype=torch.float32).reshape(1, -1) if query.ndim == 1 else torch.as_tensor(query)
            if x.shape[0] != 1:
                raise InputError(f"search takes one query, got {x.shape[0]} rows")
        else:
            raise InputError(f"the query must be a text or an embedding, got {type(query).__name__}")
        return x.to(self.device).float()

    @torch.no_grad()
    def query_features(self, query, top: int | None = None) -> list[tuple[int, float, str | None]]:
        """The query's active features (feature, activation, label), strongest first."""
        values, indices = self.sae.encode_topk(self.query_vector(query)[None])
        labels = self.sae.feature_labels
        pairs = [(int(i), float(v)) for v, i in zip(values[0].tolist(), indices[0].tolist()) if v > 0]
        pairs.sort(key=lambda p: -p[1])
        return [(f, v, labels[f]) for f, v in pairs[:top]]

    @torch.no_grad()
    def steer(self, query, up=None, down=None, clamp=None, method: str = "add") -> SteeredQuery:
        """The steered query vector; see the module docstring for the two methods."""
        if method not in METHODS:
            raise InputError(f"method must be one of {METHODS}, got {method!r}")
        x = self._model_query(query)
        q = self.sae.prepare_input(x)[0].float()
        up_ids, up_names = self.resolve(up, "up")
        down_ids, down_names = self.resolve(down, "down")
        clamp_ids, clamp_names = self.resolve(clamp, "clamp")
        for role, ids in (("up", up_ids), ("down", down_ids)):
            for f, s in ids.items():
                if s < 0:
                    raise InputError(f"{role} strength for feature {f} is {s}: strengths are >= 0 (lower a feature with down=)")
        both = set(up_ids) & set(down_ids)
        if both:
            raise InputError(f"features {sorted(both)} are both raised and lowered")
        steered = [*up_ids, *down_ids, *clamp_ids]
        if steered:
            counts = self.live_counts()
            dead = [f for f in steered if counts[f] == 0]
            if dead:
                raise InputError(
                    f"feature(s) {dead} never fire on this corpus of {len(self)} texts (dead): steering along them "
                    "moves the query toward no text"
                )
        values, indices = self.sae.encode_topk(q[None])
        z = dict(zip(indices[0].tolist(), values[0].tolist()))
        scale = float(q.norm())
        delta: dict[int, float] = {}
        if method == "add":
            delta.update({f: s * scale for f, s in up_ids.items()})
            delta.update({f: -s * scale for f, s in down_ids.items()})
        else:
            delta.update({f: max(z.get(f, 0.0), s * scale) - z.get(f, 0.0) for f, s in up_ids.items()})
            delta.update({f: -min(s, 1.0) * z.get(f, 0.0) for f, s in down_ids.items()})
        for f, value in clamp_ids.items():
            if value < 0:
                raise InputError(f"clamp value for feature {f} is {value}: activations are >= 0")
            delta[f] = value - z.get(f, 0.0)
        vector = q.clone()
        if delta:
            ids = torch.tensor(list(delta), device=self.device)
            amounts = torch.tensor(list(delta.values()), device=self.device, dtype=torch.float32)
            vector += amounts @ self.sae.W_dec[ids].float()
        cosine = float(F.cosine_similarity(q, vector, dim=0))
        length = float(q.norm())
        scale = float(x.norm()) / length if length > 0 else 1.0
        return SteeredQuery(q, vector, cosine, up_ids, down_ids, clamp_ids, method, {**up_names, **down_names, **clamp_names}, scale)

    # -------------------------------------------------------------- search
    @torch.no_grad()
    def nearest(self, vector: torch.Tensor, k: int = 10, exclude: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Corpus positions and similarities (`similarity`) of the `k` texts nearest to `vector`
        (d_in,). Cosine and dot rank by its direction alone, the same in the SAE's input space
        as in the model's; euclidean and manhattan take it at the model's scale
        (`SteeredQuery.model_vector`)."""
        exclude = set(int(e) for e in exclude)
        want = min(len(self), k + len(exclude))
        similarity = self.similarity
        v = F.normalize(vector.float(), dim=0) if similarity == "cosine" else vector.float()
        if self.backend == "faiss" and (similarity in ("cosine", "dot") or not self._backend_chosen):
            index = self._faiss()
            scores, pos = index.search(v.cpu().numpy()[None].astype(np.float32), want)
            pos, scores = pos[0], scores[0]
            keep = pos >= 0
            pos, scores = pos[keep], scores[keep]
        elif similarity in ("cosine", "dot"):
            corpus = self.corpus
            scores = (corpus @ v.to(corpus.dtype)).float()
            top = torch.topk(scores, want)
            pos, scores = top.indices.cpu().numpy(), top.values.cpu().numpy()
        else:
            corpus = self.corpus
            scores = torch.cat([similarity_scores(v[None], corpus[c0 : c0 + 65536].float(), similarity)[0] for c0 in range(0, len(corpus), 65536)])
            top = torch.topk(scores, want)
            pos, scores = top.indices.cpu().numpy(), top.values.cpu().numpy()
        keep = np.array([p not in exclude for p in pos], dtype=bool)
        return pos[keep][:k], scores[keep][:k]

    def _faiss(self):
        if self._faiss_index is None:
            import faiss

            if self.similarity not in ("cosine", "dot"):
                raise InputError(f"the FAISS index ranks by cosine or dot, not by the base model's {self.similarity}: use backend='exact'")
            dim = self.sae.config.d_in
            index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
            # Dot: the embeddings as the model made them; cosine: at unit length.
            blocks = self._model_blocks() if self.similarity == "dot" else (F.normalize(b, dim=-1) for b in self._blocks())
            for block in blocks:
                index.add(block.cpu().numpy())
            index.hnsw.efSearch = 128
            self._faiss_index = index
        return self._faiss_index

    def position_of(self, row: int) -> int | None:
        if self._row_position is None:
            self._row_position = {int(r): i for i, r in enumerate(self.row_ids)}
        return self._row_position.get(int(row))

    @torch.no_grad()
    def search(
        self,
        query,
        up=None,
        down=None,
        clamp=None,
        k: int = 10,
        method: str = "add",
        exclude_rows: Iterable[int] = (),
    ) -> SearchResult:
        """The `k` corpus texts nearest to the steered query, best first; each hit carries
        the activations of the steered features in it."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        steering = self.steer(query, up=up, down=down, clamp=clamp, method=method)
        exclude = [p for p in (self.position_of(r) for r in exclude_rows) if p is not None]
        # Cosine ranks the steered query as it is (the same direction, and the figures of
        # earlier searches to the last digit); the others at the model's scale (module docstring).
        pos, scores = self.nearest(steering.vector if self.similarity == "cosine" else steering.model_vector, k=k, exclude=exclude)
        firing = self.feature_activations(pos, steering.features)
        texts = self.text_of(pos.tolist())
        hits = [
            Hit(int(self.row_ids[p]), t, float(s), {f: float(firing[j, c]) for c, f in enumerate(steering.features)})
            for j, (p, s, t) in enumerate(zip(pos, scores, texts))
        ]
        return SearchResult(query if isinstance(query, str) else None, hits, steering)

    @torch.no_grad()
    def codes_at(self, positions: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(values, indices), each (len(positions), k): the top-k codes of the corpus texts at
        `positions`, from the corpus' codes when they are computed, else encoded (a few hits)."""
        positions = np.asarray(positions, dtype=np.int64)
        if self._codes is not None:
            return np.asarray(self._codes.values[positions]), np.asarray(self._codes.indices[positions])
        v, i = self.sae.encode_topk(self.vectors(positions))
        return v.float().cpu().numpy(), i.cpu().numpy()

    def feature_activations(self, positions: np.ndarray, features: Sequence[int]) -> np.ndarray:
        """(len(positions), len(features)) activations of `features` in the corpus texts at `positions`."""
        out = np.zeros((len(positions), len(features)), dtype=np.float32)
        if not len(features) or not len(positions):
            return out
        values, indices = self.codes_at(positions)
        for c, f in enumerate(features):
            out[:, c] = np.where(indices == f, values, 0.0).sum(axis=1)
        return out


class DatasetTexts:
    """Texts of a datasets.Dataset by corpus position, read on demand (the Arrow table stays
    memory-mapped): `row_ids[position]` is the dataset row of a corpus position."""

    def __init__(self, ds, column: str, row_ids: np.ndarray):
        self.ds = ds
        self.name = column
        self.row_ids = row_ids

    def __len__(self) -> int:
        return len(self.row_ids)

    def get(self, positions) -> list[str]:
        rows = self.row_ids[np.asarray(positions, dtype=np.int64)]
        return column_values(self.ds, self.name, rows)

    def __getitem__(self, position: int) -> str:
        return self.get([int(position)])[0]


# Scripts written without spaces between words: a word of them is found inside a longer run.
_UNSPACED = re.compile("[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# A string's words as `_holds_word` sees them: the runs of word characters between any others.
_WORD = re.compile(r"\w+")


def _holds_word(haystack: str, word: str) -> bool:
    """Whether `word` is a whole word of `haystack` (a piece of one, in a script without spaces):
    "art" is not in "party", so that a few letters typed do not count as a label's words."""
    if _UNSPACED.search(word):
        return word in haystack
    return re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", haystack) is not None


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True
