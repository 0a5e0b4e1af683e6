"""Name every feature without an LLM, and measure how well each name predicts where it fires.

For each feature, from the corpus' sparse activations (computed once):

1. **Examples**: the texts it fires on (activation > 0 only), the strongest plus a sample
   across activation quantiles, and non-firing texts for contrast, the hardest of them
   (nearest to the feature's firing texts in embedding space) among them. Texts are split
   once into a labelling part and a held-out part; labels are made from the first.
2. **Candidates**: real 1-3-word n-grams of the corpus (never glued word pairs, never across
   punctuation), scored per feature by their activation-weighted frequency in its firing
   texts times their rarity in the whole corpus (c-TF-IDF: a word common to a whole domain
   scores low for every feature of it).
3. **Keywords**: KeyBERT, with the base sentence-transformers model, ranks each feature's
   candidates against the activation-weighted centroid of its firing texts; a keyword
   too close to a better-ranked one is merged into it. Every distinct candidate is
   embedded once for all features; texts are never embedded again (their cached
   embeddings are reused).
4. **Label**: the 1-3 keywords that best separate the feature's firing from its non-firing
   *labelling* texts (AUROC of the cosine), found greedily among the best-separating
   keywords; the combined string is then embedded and kept only where it separates better
   than its first keyword alone. Features left sharing a label get one of their own.
5. **Score**: on held-out texts, the cosine between the label's embedding and each text's
   embedding predicts the feature's activation: Pearson r with the true activation, and
   AUROC of firing against non-firing texts (hard negatives included).
"""

from __future__ import annotations

import logging
import re
import time
import unicodedata
import weakref
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from .activations import SparseActivations, encode_corpus
from .base_model import embedding_dimension
from .data import split_heldout
from .errors import ConfigError, DatasetError
from .modeling_sbert_sae import SparseAutoencoder
from .text_encoder import EncodeSettings, TextEncoder
from .utils import round_figure, usable_cores

logger = logging.getLogger(__name__)

LABELS_FILE = "feature_labels.json"
LABELS_VERSION = 1

_CLAUSE_BREAK = re.compile(r"[.,;:!?()\[\]{}<>\"“”«»…–—|/，。、；：！？「」『』（）【】《》〈〉]+|\s-+\s")
_WORD = re.compile(r"(?u)\b[^\W\d_][\w'\-]*[^\W_]\b|\b[^\W\d_]\b")
# Scripts written without spaces between words: Han ideographs (with the iteration marks
# 々 〆 〇), hiragana, katakana (with the prolonged-sound mark ー, not the word separator ・),
# halfwidth katakana; and Thai, Lao, Myanmar, Khmer. `_WORD` would make a whole clause of them
# one "word"; each run of them is cut into n-grams of characters (Han and kana,
# `CHAR_NGRAM_RANGE`) or of clusters (the others, `CLUSTER_NGRAM_RANGE`) instead.
_CJK = (
    "\u3005-\u3007\u3021-\u3029\u3038-\u303b\u3041-\u3096\u3099-\u309f\u30a1-\u30fa\u30fc-\u30ff\u31f0-\u31ff"
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f"
)
_SOUTHEAST_ASIAN = "\u0e01-\u0e4e\u0e81-\u0ede\u1000-\u103f\u1050-\u108f\u1780-\u17d3"
_NO_SPACE_RUN = re.compile(f"[{_CJK}]+|[{_SOUTHEAST_ASIAN}]+")
_SOUTHEAST_ASIAN_CHAR = re.compile(f"[{_SOUTHEAST_ASIAN}]")
_HIRAGANA = re.compile("[\u3041-\u309f]")
# A run of katakana (with the prolonged-sound mark) is one loanword or a few run together:
# コンピューター, インターネット. They run longer than `CHAR_NGRAM_RANGE`, so a longer run is
# also a candidate whole.
_KATAKANA_RUN = re.compile("[\u30a1-\u30fa\u30fc-\u30ff\uff66-\uff9f]{2,}")
# Hiragana that never begins a word: the small kana (ぁ っ ゃ ...), ん, the iteration marks ゝ ゞ.
_HIRAGANA_NOT_FIRST = frozenset("ぁぃぅぇぉっゃゅょゎゕゖんゝゞ")
# What a word written in hiragana alone does not hold, for this is what the endings of verbs
# and of polite speech are made of (咲きました, 咲いています, 行かない, ください), nor を, only
# ever a particle, and what it does not end with: a case particle (さくらが, ひまわりに).
# Japanese's stop words.
_KANA_ENDINGS = re.compile("ます|まし|ませ|です|でし|てい|ない|ださ|して|した|する|った|って|られ|を|[がにではへ]$")
# Thai and Lao vowels written before the consonant they follow in speech (เ แ โ ใ ไ, ເ ແ ໂ ໃ ໄ),
# and the coeng/virama of Khmer and Myanmar that stacks the next consonant under this one: the
# next character belongs to the same cluster.
_JOINS_NEXT = frozenset("\u0e40\u0e41\u0e42\u0e43\u0e44\u0ec0\u0ec1\u0ec2\u0ec3\u0ec4\u17d2\u1039")
# Thai and Lao vowels and marks that are letters, not combining marks, yet never begin a
# syllable (ะ า ำ ๅ ๆ, ະ າ ຳ ໆ): they belong to the cluster before.
_JOINS_PREVIOUS = frozenset("\u0e30\u0e32\u0e33\u0e45\u0e46\u0eb0\u0eb2\u0eb3\u0ec6")
CHAR_NGRAM_RANGE = (2, 4)
"""Lengths, in characters, of the candidates cut from a run of Han and kana: most Chinese and
Japanese words are 2 characters, compounds 3-4 (single characters are too ambiguous to name a
feature). `LabelArguments.ngram_range` counts words and does not apply."""
CLUSTER_NGRAM_RANGE = (2, 8)
"""Lengths, in clusters (a consonant with its vowels and marks, as the script writes them
together: โร|ง|พ|ยา|บา|ล), of the candidates cut from a run of Thai, Lao, Myanmar or Khmer:
their words run longer than Chinese ones (โรงพยาบาล, hospital, is 6 clusters)."""
FRAGMENT_SHARE = 0.9
"""A candidate cut from a run without spaces is dropped when one a character or cluster longer
that contains it occurs in at least this share of the texts it occurs in: it is then mostly a
piece of that longer one (ฟุตบอ of ฟุตบอล, 噌汁 of 味噌汁), not a word of its own."""


@dataclass
class LabelArguments:
    """How features are labelled and scored (saved in `feature_labels.json`)."""

    top_texts: int = 20
    """Strongest firing texts of a feature used to label it."""
    quantile_texts: int = 10
    """Further firing texts, sampled evenly across its activation ranks."""
    negatives: int = 100
    """Non-firing labelling texts that candidate labels are judged on: half the hardest
    (nearest the feature's firing texts), half at random."""
    judge_texts: int = 100
    """At most this many firing labelling texts (the strongest half, the rest spread over
    the activation ranks) that candidate labels are judged on."""
    ngram_range: tuple[int, int] = (1, 3)
    """Lengths of the candidate n-grams."""
    min_df: int = 3
    """An n-gram must occur in at least this many corpus texts to be a candidate (rarer ones
    seldom name a feature and would cost an embedding each: benchmarks/README.md)."""
    candidates: int = 48
    """Lexically best candidates per feature handed to KeyBERT."""
    lexical_contrast: float = 0.0
    """Weight of the hard negatives' n-gram frequency subtracted from the firing texts' (the
    corpus-wide rarity weighting applies always); 0 measured best (benchmarks/README.md)."""
    direction_contrast: float = 0.0
    """Weight of the hard negatives' centroid subtracted from the firing texts' centroid
    that KeyBERT ranks candidates against; 0 measured best."""
    keywords: int = 48
    """Keywords KeyBERT keeps per feature (closest to its firing texts): the shortlist a
    label is made from."""
    merge_threshold: float = 0.85
    """A keyword whose embedding has at least this cosine with a better-ranked keyword's is
    merged into it ("dragonflies" into "dragonfly"): near-duplicates never fill a label."""
    label_pool: int = 12
    """The keywords that separate firing from non-firing labelling texts best, among which
    the 1-3 of the label are combined."""
    max_label_keywords: int = 3
    """At most this many keywords make a label."""
    heldout_fraction: float = 0.25
    """Share of texts kept out of labelling, to score the labels on."""
    score_texts: int = 100
    """At most this many held-out firing texts, and as many non-firing, score each feature."""
    negative_pool: int = 50_000
    """Non-firing texts are looked for among at most this many texts per split."""
    batch_size: int = 256
    """Phrases per forward pass when embedding candidates."""
    block_size: int = 1024
    """Features labelled between two saves of the work so far (`feature_labels.partial.json`)."""
    seed: int = 0

    def validate(self) -> None:
        for name in ("top_texts", "negatives", "judge_texts", "candidates", "keywords", "label_pool", "max_label_keywords", "score_texts", "negative_pool", "batch_size", "block_size", "min_df"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.quantile_texts < 0:
            raise ConfigError(f"quantile_texts must be >= 0, got {self.quantile_texts!r}")
        lo, hi = self.ngram_range
        if not (1 <= lo <= hi <= 6):
            raise ConfigError(f"ngram_range must be 1 <= low <= high <= 6, got {self.ngram_range!r}")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}")
        if not 0 < self.merge_threshold <= 1:
            raise ConfigError(f"merge_threshold must be in (0, 1], got {self.merge_threshold!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:  # numpy seeds are >= 0
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")


# ------------------------------------------------------------------ n-grams
def ngram_analyzer(ngram_range: tuple[int, int]):
    """Text -> its real n-grams (contiguous words), none starting or ending with a stop word.

    "theory of relativity" is kept; "of relativity" is not; no pair of words that were not
    next to each other is ever made (removing stop words first would glue them), nor one
    across punctuation ("relativity, of course" gives no "relativity of course").
    """
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    stop = ENGLISH_STOP_WORDS
    lo, hi = ngram_range

    def word_ngrams(segment: str, out: list[str]) -> None:
        words = _WORD.findall(segment)
        edge = [len(w) > 1 and w not in stop for w in words]  # may start or end an n-gram
        if lo == 1:
            out += [w for w, ok in zip(words, edge) if ok]
        for n in range(max(lo, 2), hi + 1):
            out += [" ".join(words[i : i + n]) for i in range(len(words) - n + 1) if edge[i] and edge[i + n - 1]]

    def analyze(text: str) -> list[str]:
        out: list[str] = []
        for clause in _CLAUSE_BREAK.split(text.lower()):
            if _NO_SPACE_RUN.search(clause) is None:  # text in spaced scripts only: words, as always
                word_ngrams(clause, out)
                continue
            # Words of the spaced parts, character n-grams of each run of a script without
            # spaces (joined without spaces); no n-gram spans from one part into the next.
            start = 0
            for run in _NO_SPACE_RUN.finditer(clause):
                word_ngrams(clause[start : run.start()], out)
                out += _char_ngrams(run.group())
                start = run.end()
            word_ngrams(clause[start:], out)
        return out

    return analyze


def _units(run: str) -> list[str]:
    """A run of a script without spaces as the units its n-grams count: characters with their
    combining marks (kana voicing marks, Thai vowels and tones above and below); for Thai,
    Lao, Myanmar and Khmer, clusters, which also hold the vowel letters written before or
    after their consonant and stacked consonants (`_JOINS_NEXT`, `_JOINS_PREVIOUS`)."""
    clusters = _SOUTHEAST_ASIAN_CHAR.match(run) is not None
    units: list[str] = []
    joined = False  # the previous character takes this one into its unit
    for ch in run:
        if units and (joined or unicodedata.category(ch).startswith("M") or (clusters and ch in _JOINS_PREVIOUS)):
            units[-1] += ch
        else:
            units.append(ch)
        joined = clusters and ch in _JOINS_NEXT
    return units


def _char_ngrams(run: str) -> list[str]:
    """The n-grams of a run of a script without spaces (`_units`): of Han and kana,
    `CHAR_NGRAM_RANGE` characters, none starting or ending with hiragana (in Japanese,
    hiragana at the edge of a phrase is a particle or an inflection: の, は, を, です, what
    English stop words are to words), except a word written in hiragana alone (ひまわり,
    おにぎり): 3 or more hiragana that do not start with one that never begins a word nor hold
    an inflection or end with a particle (`_KANA_ENDINGS`), and a run of katakana longer than
    that whole (コンピューター: `_KATAKANA_RUN`); of Thai, Lao, Myanmar and Khmer, `CLUSTER_NGRAM_RANGE` clusters. Pieces of longer
    candidates are dropped later, once the corpus is counted (`FRAGMENT_SHARE`)."""
    units = _units(run)
    if _SOUTHEAST_ASIAN_CHAR.match(run) is not None:
        lo, hi = CLUSTER_NGRAM_RANGE
        return ["".join(units[i : i + n]) for n in range(lo, hi + 1) for i in range(len(units) - n + 1)]
    kana = [_HIRAGANA.match(u) is not None for u in units]
    lo, hi = CHAR_NGRAM_RANGE
    out = []
    for n in range(lo, hi + 1):
        for i in range(len(units) - n + 1):
            if not kana[i] and not kana[i + n - 1]:
                out.append("".join(units[i : i + n]))
            elif n >= 3 and all(kana[i : i + n]) and units[i][0] not in _HIRAGANA_NOT_FIRST:
                word = "".join(units[i : i + n])
                if _KANA_ENDINGS.search(word) is None:
                    out.append(word)
    out.extend(word for word in _KATAKANA_RUN.findall(run) if len(_units(word)) > hi)
    return out


def _fragments(terms: np.ndarray, counts: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Which of the `kept` `terms` (n-grams of runs without spaces only) are pieces of a longer
    kept one: those one unit shorter than it, at its start or end, that occur in at most
    1 / `FRAGMENT_SHARE` times the texts it occurs in (`counts`: texts per term)."""
    index = {}
    for i in np.flatnonzero(kept):
        term = terms[i]
        if _NO_SPACE_RUN.fullmatch(term) is not None:
            index[term] = i
    pieces = np.zeros(len(terms), dtype=bool)
    for term, i in index.items():
        units = _units(term)
        if len(units) < 3:  # its pieces would be single units, never candidates
            continue
        for piece in ("".join(units[1:]), "".join(units[:-1])):
            j = index.get(piece)
            if j is not None and counts[i] >= FRAGMENT_SHARE * counts[j]:
                pieces[j] = True
    return pieces


PARALLEL_TERMS_MIN_TEXTS = 20_000
"""Corpora at least this large are analysed into n-grams by several processes (Linux)."""


def document_terms(texts: list[str], ngram_range: tuple[int, int], min_df: int, processes: int | None = None) -> tuple[sp.csr_matrix, np.ndarray]:
    """The binary document-term matrix (n_texts, n_terms) float32 of `texts` over the n-grams
    (`ngram_analyzer`) found in at least `min_df` of them, and those n-grams, sorted: what
    sklearn's `CountVectorizer(analyzer=..., min_df=min_df, binary=True)` gives, less the
    n-grams of runs without spaces that are mostly pieces of a longer one (`_fragments`).

    The analysis is pure Python and linear in the corpus (7.8 s of labelling 100k texts on
    an H100's host): with `processes` > 1 (default: up to 8 cores for corpora of at least
    `PARALLEL_TERMS_MIN_TEXTS` texts, on Linux, where workers fork) chunks of texts are
    analysed in parallel and only their distinct n-grams come back to be merged.
    """
    import multiprocessing
    import sys
    import warnings

    import pandas as pd

    n_texts = len(texts)
    if processes is None:
        processes = usable_cores() if n_texts >= PARALLEL_TERMS_MIN_TEXTS and sys.platform == "linux" else 1
    processes = max(1, min(processes, n_texts))
    bounds = np.linspace(0, n_texts, processes * 4 + 1 if processes > 1 else 2).astype(int)
    starts = [int(a) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    chunks = [(list(texts[a:b]), ngram_range) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if processes > 1:
        with warnings.catch_warnings():
            # Python warns that forking a process with threads may deadlock the child: the
            # workers only run Python's regex and pandas, never a lock another thread holds.
            warnings.simplefilter("ignore", DeprecationWarning)
            with multiprocessing.get_context("fork").Pool(processes) as pool:
                parts = pool.starmap(_chunk_terms, chunks)
    else:
        parts = [_chunk_terms(*chunk) for chunk in chunks]
    terms_of_chunks = [part[0] for part in parts]
    if not any(len(t) for t in terms_of_chunks):
        raise DatasetError("the corpus gives no candidate keywords: no text has a word that can be one (only digits, symbols, stop words or single letters)")
    global_code, terms = pd.factorize(np.concatenate(terms_of_chunks))  # chunk-local term -> global term
    docs, codes, local_offset = [], [], 0
    for (chunk_terms, chunk_docs, chunk_codes), first_doc in zip(parts, starts):
        docs.append(chunk_docs.astype(np.int64) + first_doc)
        codes.append(global_code[local_offset + chunk_codes.astype(np.int64)])
        local_offset += len(chunk_terms)
    docs, codes = np.concatenate(docs), np.concatenate(codes)
    counts = np.bincount(codes, minlength=len(terms))
    frequent = counts >= min_df
    frequent &= ~_fragments(np.asarray(terms, dtype=object), counts, frequent)
    if not frequent.any():
        raise DatasetError(f"no candidate keyword occurs in {min_df} or more texts of the corpus: lower min_df (`sbert-sae label --min-df`), or label on a larger corpus")
    kept = np.asarray(terms, dtype=object)[frequent]
    order = np.argsort(kept)
    column = np.full(len(terms), -1, dtype=np.int64)
    column[np.flatnonzero(frequent)[order]] = np.arange(len(kept))
    column = column[codes]
    on = column >= 0
    matrix = sp.csr_matrix((np.ones(int(on.sum()), dtype=np.float32), (docs[on], column[on])), shape=(n_texts, len(kept)))
    return matrix, kept[order].astype(str)


def _chunk_terms(texts: list[str], ngram_range: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A chunk's distinct n-grams, and each (text, n-gram) pair of it once: (text, n-gram code)."""
    import pandas as pd

    analyze = ngram_analyzer(ngram_range)
    flat: list[str] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        grams = analyze(text)
        flat += grams
        lengths[i] = len(grams)
    codes, terms = pd.factorize(pd.Series(flat, dtype=object))
    pairs = np.unique(np.repeat(np.arange(len(texts), dtype=np.int64), lengths) * max(1, len(terms)) + codes)
    return np.asarray(terms, dtype=object), (pairs // max(1, len(terms))).astype(np.int32), (pairs % max(1, len(terms))).astype(np.int32)


def auroc(scores_pos, scores_neg) -> float:
    """Area under the ROC curve of positive against negative scores (ties count half)."""
    pos = torch.as_tensor(np.asarray(scores_pos, dtype=np.float64))[None, :]
    neg = torch.as_tensor(np.asarray(scores_neg, dtype=np.float64))[None, :]
    return float(batched_auroc(pos, neg, torch.ones_like(pos, dtype=torch.bool), torch.ones_like(neg, dtype=torch.bool))[0])


def batched_auroc(pos: torch.Tensor, neg: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor) -> torch.Tensor:
    """AUROC of each row of `pos` (..., P) against `neg` (..., N), counting only the entries
    where the masks (broadcastable to them) are true; ties count half; nan where a side is empty.

    Each positive wins against the negatives below it (found by binary search in the sorted
    negatives), so padded rows of many features are scored in one call.
    """
    neg_mask, pos_mask = neg_mask.expand_as(neg), pos_mask.expand_as(pos)
    ordered = neg.masked_fill(~neg_mask, float("inf")).sort(dim=-1).values.contiguous()
    pos = pos.contiguous()
    below = torch.searchsorted(ordered, pos, right=False)
    not_above = torch.searchsorted(ordered, pos, right=True)
    wins = ((below + not_above).to(pos.dtype) * 0.5).masked_fill(~pos_mask, 0.0)
    return wins.sum(-1) / (pos_mask.sum(-1) * neg_mask.sum(-1)).to(pos.dtype)


def _padded(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(len(rows), longest) int64 tensor of the rows, padded with 0, and the mask of real entries."""
    width = max([len(r) for r in rows] + [1])
    index = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        index[i, : len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
        mask[i, : len(r)] = True
    return index, mask


# ------------------------------------------------------------- examples
def _spread(rows: np.ndarray, top: int, quantile: int) -> np.ndarray:
    """The `top` first rows (strongest), plus `quantile` more spread evenly over the rest."""
    if len(rows) <= top + quantile:
        return rows
    rest = rows[top:]
    picks = np.unique(np.linspace(0, len(rest) - 1, quantile).round().astype(int))
    return np.concatenate([rows[:top], rest[picks]])


def _firing_mask(acts: SparseActivations, pool: np.ndarray, f0: int, f1: int) -> torch.Tensor:
    """(f1 - f0, len(pool)) bool: does feature f fire on pool text r."""
    values, indices = acts.values[pool], acts.indices[pool]
    hit = (indices >= f0) & (indices < f1) & (values > 0)
    r, j = np.nonzero(hit)
    mask = torch.zeros(f1 - f0, len(pool), dtype=torch.bool)
    mask[torch.from_numpy(indices[r, j].astype(np.int64) - f0), torch.from_numpy(r)] = True
    return mask


def hard_negatives(
    emb: torch.Tensor,
    centroids: torch.Tensor,
    acts: SparseActivations,
    pool: np.ndarray,
    m: int,
    chunk: int = 256,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """(n_latents, m) positions of the pool texts nearest each centroid on which its feature
    does not fire (-1 = none); the similarities and their top-m on `device` (default: CPU)."""
    out = np.full((len(centroids), m), -1, dtype=np.int64)
    if len(pool) == 0:
        return out
    device = torch.device(device or "cpu")
    pool_emb = emb[torch.from_numpy(pool)].to(device)
    centroids = centroids.to(device)
    m_eff = min(m, len(pool))
    for f0 in range(0, len(centroids), chunk):
        f1 = min(f0 + chunk, len(centroids))
        sims = centroids[f0:f1] @ pool_emb.T
        sims.masked_fill_(_firing_mask(acts, pool, f0, f1).to(device), float("-inf"))
        top = sims.topk(m_eff, dim=1)
        picked = pool[top.indices.cpu().numpy()]
        picked[~torch.isfinite(top.values).cpu().numpy()] = -1
        out[f0:f1, :m_eff] = picked
    return out


def contrast_sets(hard: np.ndarray, acts: SparseActivations, pool: np.ndarray, total: int, rng: np.random.Generator, chunk: int = 256) -> list[np.ndarray]:
    """Each feature's non-firing texts: its hard negatives (`hard`, -1 = none), then random
    pool texts on which it does not fire, up to `total` in all."""
    n_feat = len(hard)
    out: list[np.ndarray] = []
    if len(pool) == 0:
        return [h[h >= 0] for h in hard]
    draws = pool[rng.integers(0, len(pool), size=(n_feat, 3 * total))]
    for f0 in range(0, n_feat, chunk):
        f1 = min(f0 + chunk, n_feat)
        sample, h = draws[f0:f1], hard[f0:f1]
        fires = ((acts.indices[sample] == np.arange(f0, f1)[:, None, None]) & (acts.values[sample] > 0)).any(axis=2)
        # A draw is new if no hard negative and no earlier draw of its row is the same text:
        # after a stable sort of [hard, draws], a repeat sits right after its first occurrence.
        both = np.concatenate([h, sample], axis=1)
        order = both.argsort(axis=1, kind="stable")
        ordered = np.take_along_axis(both, order, axis=1)
        repeat_sorted = np.zeros_like(ordered, dtype=bool)
        repeat_sorted[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
        repeat = np.empty_like(repeat_sorted)
        np.put_along_axis(repeat, order, repeat_sorted, axis=1)
        usable = ~fires & ~repeat[:, h.shape[1] :]
        n_hard = (h >= 0).sum(axis=1)
        usable &= np.cumsum(usable, axis=1) <= np.maximum(0, total - n_hard)[:, None]
        for i in range(f1 - f0):
            out.append(np.concatenate([h[i][h[i] >= 0], sample[i][usable[i]]]).astype(np.int64))
    return out


# ----------------------------------------------------------------- KeyBERT
class _PrecomputedCandidates:
    """Stands in for KeyBERT's CountVectorizer: the candidates of each "document" (feature)
    are already chosen, so KeyBERT neither re-tokenises texts nor embeds anything twice."""

    def __init__(self, vocabulary: list[str], matrix: sp.csr_matrix):
        self.vocabulary = np.asarray(vocabulary, dtype=object)
        self.matrix = matrix

    def fit(self, docs):
        return self

    def get_feature_names_out(self):
        return self.vocabulary

    def transform(self, docs):
        return self.matrix


@dataclass
class LabelResult:
    """Labels of every feature, and a summary of their scores."""

    features: dict[int, dict]
    summary: dict
    settings: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        # The dataclass' own listed every feature's entry (keywords, examples): a notebook cell
        # ending in label_features(...) printed megabytes for runs/wiki's 6144 features.
        s = self.summary
        return (
            f"LabelResult({s.get('n_labelled')} of {s.get('n_features', len(self.features))} features labelled, "
            f"label_auroc_mean={s.get('label_auroc_mean')}; .features, .summary hold the rest)"
        )


@dataclass
class LabellingContext:
    """What labelling and scoring share: the corpus' activations, the labelling / held-out
    split, each feature's firing examples, centroids and hard negatives. Built once, so
    that labels from any method are scored on exactly the same texts."""

    args: LabelArguments
    texts: list[str]
    row_ids: np.ndarray
    acts: SparseActivations
    counts: np.ndarray
    emb: np.ndarray
    train_fi: object
    held_fi: object
    pos_rows: list[np.ndarray]
    pos_acts: list[np.ndarray]
    judge_rows: list[np.ndarray]
    weights: sp.csr_matrix
    centroids: np.ndarray
    train_pool: np.ndarray
    held_pool: np.ndarray
    hard_train: list[np.ndarray]
    contrast_train: list[np.ndarray]
    contrast_held: list[np.ndarray]
    timings: dict[str, float] = field(default_factory=dict)
    """Wall-clock seconds of the stages run so far ("examples")."""
    thread_cpu_timings: dict[str, float] = field(default_factory=dict)
    """CPU seconds of the same stages, of the thread that ran them (`time.thread_time`)."""

    @property
    def n_features(self) -> int:
        return len(self.counts)

    def negatives(self, feature: int, held_out: bool) -> np.ndarray:
        """Non-firing texts of a split for a feature: its hard negatives, then random ones."""
        return (self.contrast_held if held_out else self.contrast_train)[feature]


def prepare_labelling(
    sae: SparseAutoencoder,
    texts: list[str],
    embeddings: np.ndarray,
    args: LabelArguments | None = None,
    row_ids: np.ndarray | None = None,
    codes: SparseActivations | None = None,
) -> LabellingContext:
    """Encode the corpus once (unless its `codes` are given) and gather each feature's
    examples (see `LabellingContext`)."""
    args = args or LabelArguments()
    args.validate()
    n_texts = len(texts)
    if embeddings.shape[0] != n_texts:
        raise DatasetError(f"{n_texts} texts but {embeddings.shape[0]} embeddings: they must be the same rows")
    if embeddings.shape[1] != sae.config.d_in:
        raise ConfigError(f"embeddings are {embeddings.shape[1]}-d but the SAE reads d_in={sae.config.d_in}")
    if n_texts < 4:
        raise DatasetError(f"need at least 4 texts to label and score features, got {n_texts}")
    t0, cpu0 = time.perf_counter(), time.thread_time()
    if codes is not None and (len(codes) != n_texts or codes.n_latents != sae.config.n_latents):
        raise ConfigError(f"codes of {len(codes)} texts and {codes.n_latents} features do not fit {n_texts} texts and an SAE of {sae.config.n_latents}")
    acts = encode_corpus(sae, embeddings) if codes is None else codes
    n_feat = sae.config.n_latents
    train_pos, held_pos = split_heldout(np.arange(n_texts), args.heldout_fraction, args.seed)
    train_fi, held_fi = acts.by_feature(train_pos), acts.by_feature(held_pos)
    emb = torch.nn.functional.normalize(torch.from_numpy(np.array(embeddings, dtype=np.float32)), dim=1)

    pos_rows, pos_acts, judge_rows = [], [], []
    half = args.judge_texts // 2
    for f in range(n_feat):
        rows, a = train_fi.rows_of(f), train_fi.acts_of(f)
        keep = _spread(np.arange(len(rows)), args.top_texts, args.quantile_texts)
        pos_rows.append(rows[keep])
        pos_acts.append(a[keep])
        judge_rows.append(rows[_spread(np.arange(len(rows)), half, args.judge_texts - half)])
    weights = _row_matrix(pos_rows, [a / a.sum() if len(a) else a for a in pos_acts], n_feat, n_texts)
    centroids = torch.nn.functional.normalize(torch.from_numpy(np.asarray(weights @ emb.numpy(), dtype=np.float32)), dim=1)
    rng = np.random.default_rng(args.seed)
    train_pool = _cap(train_pos, args.negative_pool, rng)
    held_pool = _cap(held_pos, args.negative_pool, rng)
    # On the SAE's device: 2 x n_latents x 50k similarities and their top-k (9.5 s of labelling
    # 220k texts with n=9216 on 2 CPU cores).
    device = sae.W_dec.device
    hard_train = hard_negatives(emb, centroids, acts, train_pool, max(1, args.negatives // 2), device=device)
    hard_held = hard_negatives(emb, centroids, acts, held_pool, max(1, args.score_texts // 2), device=device)
    return LabellingContext(
        args=args,
        texts=list(texts),
        row_ids=np.arange(n_texts) if row_ids is None else np.asarray(row_ids),
        acts=acts,
        counts=acts.fire_counts(),
        emb=emb.numpy(),
        train_fi=train_fi,
        held_fi=held_fi,
        pos_rows=pos_rows,
        pos_acts=pos_acts,
        judge_rows=judge_rows,
        weights=weights,
        centroids=centroids.numpy(),
        train_pool=train_pool,
        held_pool=held_pool,
        hard_train=[h[h >= 0] for h in hard_train],
        contrast_train=contrast_sets(hard_train, acts, train_pool, args.negatives, np.random.default_rng([args.seed, 0])),
        contrast_held=contrast_sets(hard_held, acts, held_pool, args.score_texts, np.random.default_rng([args.seed, 1])),
        timings={"examples": round(time.perf_counter() - t0, 3)},
        thread_cpu_timings={"examples": round(time.thread_time() - cpu0, 3)},
    )


def label_features(
    sae: SparseAutoencoder,
    texts: list[str],
    embeddings: np.ndarray,
    model,
    args: LabelArguments | None = None,
    row_ids: np.ndarray | None = None,
    show_progress: bool = True,
    context: LabellingContext | None = None,
    done: dict[int, dict] | None = None,
    on_block=None,
    codes: SparseActivations | None = None,
) -> LabelResult:
    """Label and score every feature of `sae` on a corpus.

    Args:
        texts: the corpus, `texts[i]` embedded as `embeddings[i]`.
        embeddings: (n_texts, d_in) embeddings of `texts` by the SAE's base model.
        model: that sentence-transformers model (embeds the candidate keywords).
        row_ids: dataset row id of each text, stored with the examples (default: positions).
        context: a `prepare_labelling` result to reuse (then texts/embeddings are ignored).
        done: entries of features labelled by an earlier, interrupted run: kept, not redone.
        on_block: called with all entries so far after every `args.block_size` features, so
            that a caller can save them (a killed run then loses one block at most).
        codes: the corpus' top-k codes by `sae`, when already computed (`corpus_codes`).
    """
    import sklearn
    from keybert import KeyBERT
    from tqdm.auto import tqdm

    ctx = context or prepare_labelling(sae, texts, embeddings, args, row_ids, codes=codes)
    args = ctx.args
    # Each stage's wall-clock seconds, and the CPU seconds of the thread that ran it: the
    # stages overlap (the base model embeds in a worker thread while this one runs KeyBERT and
    # the label choice), so on a loaded machine a stage's wall time holds the other thread's
    # work too (see `label_stage_seconds`).
    timings = dict(ctx.timings)
    cpu = dict(ctx.thread_cpu_timings)
    clock, cpu_clock = time.perf_counter(), time.thread_time()

    def lap(name: str) -> None:
        nonlocal clock, cpu_clock
        now, cpu_now = time.perf_counter(), time.thread_time()
        timings[name] = round(now - clock, 3)
        cpu[name] = round(cpu_now - cpu_clock, 3)
        clock, cpu_clock = now, cpu_now

    def add(name: str, wall: float, thread_cpu: float | None = None) -> None:
        timings[name] = timings.get(name, 0.0) + wall
        if thread_cpu is not None:
            cpu[name] = cpu.get(name, 0.0) + thread_cpu

    n_feat, n_texts = ctx.n_features, len(ctx.texts)

    # Candidates: contrastive c-TF-IDF over real n-grams.
    doc_terms, vocab = document_terms(ctx.texts, tuple(args.ngram_range), min(args.min_df, n_texts))
    idf = np.log(n_texts / np.maximum(np.asarray(doc_terms.sum(axis=0)).ravel(), 1)).astype(np.float32)
    neg_weights = _row_matrix(ctx.hard_train, [np.full(len(h), 1.0 / max(1, len(h)), dtype=np.float32) for h in ctx.hard_train], n_feat, n_texts)
    features: dict[int, dict] = {int(f): e for f, e in (done or {}).items()}
    cand_per_feature = lexical_candidates(ctx, doc_terms, idf, neg_weights, skip=features)
    lap("candidates")

    kw_model = KeyBERT(model=model)
    neg_centroids = _normalize_rows(np.asarray(neg_weights @ ctx.emb, dtype=np.float32))
    direction = _normalize_rows(ctx.centroids - args.direction_contrast * neg_centroids)
    todo = [f for f in range(n_feat) if f not in features]
    blocks = [todo[b0 : b0 + args.block_size] for b0 in range(0, len(todo), args.block_size)]
    # Every distinct candidate is embedded once (with the base model, as KeyBERT would), block by
    # block: a block's candidates that no earlier block had.
    seen: set[int] = set()
    new_phrases: list[list[str]] = []
    for block in blocks:
        fresh = np.unique(np.concatenate([cand_per_feature[f] for f in block] + [np.zeros(0, dtype=np.int64)]))
        new_phrases.append([str(vocab[t]) for t in fresh if int(t) not in seen])
        seen.update(int(t) for t in fresh)
    known: dict[str, np.ndarray] = {}

    def embed(phrases: list[str], stage: str):
        tick, cpu_tick = time.perf_counter(), time.thread_time()  # the worker thread's own CPU time
        vectors = _embed(model, phrases, args.batch_size, show_progress=False)
        return stage, phrases, vectors, time.perf_counter() - tick, time.thread_time() - cpu_tick

    def collect(future) -> None:
        """Wait for an embedding task and keep its vectors (only this thread touches `known`)."""
        tick = time.perf_counter()
        stage, phrases, vectors, seconds, thread_cpu = future.result()
        add("wait", time.perf_counter() - tick)  # this thread idle: no CPU time to count
        add(stage, seconds, thread_cpu)
        known.update(zip(phrases, vectors))

    def finish(block: list[int], drafts: dict[int, dict]) -> None:
        tick, cpu_tick = time.perf_counter(), time.thread_time()
        features.update(_finish_labels(ctx, drafts, known))
        labels = {f: features[f]["label"] for f in block if features[f].get("label")}
        scores, _ = score_labels(ctx, labels, model, known_embeddings=known)
        for f, score in scores.items():
            features[f]["score"] = score
        add("score", time.perf_counter() - tick, time.thread_time() - cpu_tick)
        bar.update(len(block))
        if on_block is not None:
            on_block(features)

    # The model embeds in a worker thread (torch releases the GIL) while this thread runs
    # KeyBERT and the label choice: block b's candidates are embedded while block b - 1 is
    # labelled, and its combined labels while block b + 1 is.
    bar = tqdm(total=len(todo), desc="labelling", unit="feature", disable=not show_progress, mininterval=1.0)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sbert-sae-embed") as worker:
        candidates_ready = [worker.submit(embed, phrases, "embed_candidates") for phrases in new_phrases[:2]]
        pending = None
        for b, block in enumerate(blocks):
            collect(candidates_ready[b])
            tick, cpu_tick = time.perf_counter(), time.thread_time()
            alive = [f for f in block if len(cand_per_feature[f])]
            phrases = sorted({str(vocab[t]) for f in alive for t in cand_per_feature[f]})
            phrase_index = {p: i for i, p in enumerate(phrases)}
            phrase_emb = np.stack([known[p] for p in phrases]) if phrases else np.zeros((0, ctx.emb.shape[1]), dtype=np.float32)
            cand_matrix = _row_matrix([np.array([phrase_index[str(vocab[t])] for t in cand_per_feature[f]], dtype=np.int64) for f in alive], [np.ones(len(cand_per_feature[f]), dtype=np.float32) for f in alive], len(alive), len(phrases))
            # The finiteness checks and the parameter validation (signature inspection) of
            # sklearn's cosine_similarity and normalize, which KeyBERT calls once per feature, cost
            # more than the similarities; the embeddings are finite by construction.
            with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
                keybert_out = (
                    kw_model.extract_keywords(
                        [str(f) for f in alive],
                        vectorizer=_PrecomputedCandidates(phrases, cand_matrix),
                        doc_embeddings=direction[alive],
                        word_embeddings=phrase_emb,
                        top_n=args.keywords,
                    )
                    if alive
                    else []
                )
            if len(alive) == 1:  # KeyBERT returns a flat list for a single document
                keybert_out = [keybert_out]
            keywords_of = dict(zip(alive, keybert_out))
            add("keybert", time.perf_counter() - tick, time.thread_time() - cpu_tick)
            tick, cpu_tick = time.perf_counter(), time.thread_time()
            drafts = _draft_labels(ctx, block, keywords_of, phrase_emb, phrase_index)
            # The label is the string "a, b, c", whose embedding is not quite the mean of its
            # keywords': embed each combined label once (needed to score it anyway), and keep the
            # best single keyword instead where the combination separates worse.
            combined = sorted({d["label"] for d in drafts.values() if d.get("label") and d["label"] not in known})
            labels_ready = worker.submit(embed, combined, "embed_labels")
            if b + 2 < len(blocks):
                candidates_ready.append(worker.submit(embed, new_phrases[b + 2], "embed_candidates"))
            add("choose", time.perf_counter() - tick, time.thread_time() - cpu_tick)
            if pending is not None:
                collect(pending[0])
                finish(*pending[1:])
            pending = (labels_ready, block, drafts)
        if pending is not None:
            collect(pending[0])
            finish(*pending[1:])
    bar.close()
    tick, cpu_tick = time.perf_counter(), time.thread_time()
    renamed = _separate_duplicates(ctx, features, known, model)
    if renamed:
        scores, _ = score_labels(ctx, {f: features[f]["label"] for f in renamed}, model, known_embeddings=known)
        for f, score in scores.items():
            features[f]["score"] = score
    add("separate_duplicates", time.perf_counter() - tick, time.thread_time() - cpu_tick)
    for name in ("wait", "embed_candidates", "keybert", "choose", "embed_labels", "score", "separate_duplicates"):
        timings[name] = round(timings.get(name, 0.0), 3)
        if name != "wait":
            cpu[name] = round(cpu.get(name, 0.0), 3)

    summary = summarize_scores(features)
    statuses = [e["status"] for e in features.values()]
    summary.update(
        {
            "n_features": n_feat,
            "n_labelled": statuses.count("labelled"),
            "n_dead": statuses.count("dead"),
            "n_unlabelled": statuses.count("unlabelled"),
            "n_texts": n_texts,
            "n_candidates_embedded": len(seen),
            # Two figures a stage, named apart: files before these held the wall times alone,
            # as "seconds" (read both with `label_stage_seconds`).
            "wall_seconds": timings,
            "thread_cpu_seconds": cpu,
        }
    )
    return LabelResult(features=features, summary=summary, settings=asdict(args))


def lexical_candidates(
    ctx: LabellingContext,
    doc_terms: sp.csr_matrix,
    idf: np.ndarray,
    neg_weights: sp.csr_matrix,
    skip=(),
    chunk: int = 2048,
) -> list[np.ndarray]:
    """Each feature's best `args.candidates` n-grams (columns of `doc_terms`) by contrastive
    c-TF-IDF over its labelling texts; none for the features in `skip` (labelled already).

    The features go by in chunks: the (features x n-grams) products hold every n-gram of every
    feature's texts, about 20 MB per thousand features, and only each row's best few are kept
    (all features at once: 1 GB more for 49,152 features of a 20k-text corpus). Every row is
    computed alone, so the chunking changes nothing in the result."""
    args, n_feat, n_texts = ctx.args, ctx.n_features, doc_terms.shape[0]
    out: list[np.ndarray] = []
    for f0 in range(0, n_feat, chunk):
        f1 = min(f0 + chunk, n_feat)
        rows = ctx.pos_rows[f0:f1]
        # A candidate must occur in 2 or more of the feature's texts (in 1, where no n-gram is
        # in 2: a feature with a single text, or texts that share no word common enough to count).
        presence = (_row_matrix(rows, [np.ones(len(r), dtype=np.float32) for r in rows], f1 - f0, n_texts) @ doc_terms).tocsr()
        needed = np.clip(presence.max(axis=1).toarray().ravel(), 1, 2).astype(np.float32)
        presence.data = (presence.data >= np.repeat(needed, np.diff(presence.indptr))).astype(np.float32)
        lexical = ctx.weights[f0:f1] @ doc_terms
        if args.lexical_contrast:  # at 0 (the default) the negatives' product would be thrown away
            lexical = lexical - args.lexical_contrast * (neg_weights[f0:f1] @ doc_terms)
        lexical = lexical.multiply(presence).multiply(idf[None, :]).tocsr()
        lexical.eliminate_zeros()
        lexical.sort_indices()
        for f in range(f0, f1):
            if f in skip:
                out.append(np.zeros(0, dtype=np.int64))
                continue
            start, stop = lexical.indptr[f - f0], lexical.indptr[f - f0 + 1]
            terms, scores = lexical.indices[start:stop], lexical.data[start:stop]
            good = scores > 0
            terms, scores = terms[good], scores[good]
            if len(terms) > args.candidates:
                terms = terms[np.argpartition(-scores, args.candidates - 1)[: args.candidates]]
            out.append(terms)
    return out


def _separate_duplicates(ctx: LabellingContext, features: dict[int, dict], known: dict[str, np.ndarray], model, rounds: int = 3) -> list[int]:
    """Give features that share a label labels of their own.

    Of the features with one label, the one it separates best keeps it; each other swaps its
    last keyword for, or (under the keyword limit) adds, the keyword of its shortlist that
    makes the best label no feature has yet (judged like a draft, then embedded). Returns
    the features renamed.
    """
    args = ctx.args
    renamed: set[int] = set()
    for _ in range(rounds):
        groups: dict[str, list[int]] = {}
        for f, e in features.items():
            if e.get("status") == "labelled" and e.get("label"):
                groups.setdefault(e["label"], []).append(f)
        losers = [f for members in groups.values() if len(members) > 1 for f in sorted(members, key=lambda m: -(features[m].get("train_auroc") or 0.0))[1:]]
        if not losers:
            break
        taken = set(groups)
        # Keywords of features labelled by an earlier, resumed run may not be embedded yet.
        missing = sorted({k["keyword"] for f in losers for k in features[f].get("keywords", [])} - set(known))
        known.update(zip(missing, _embed(model, missing, args.batch_size, show_progress=False)))
        options: dict[int, list[list[str]]] = {}
        for f in losers:
            words = features[f]["label"].split(", ")
            if any(w not in known for w in words):
                known.update(zip(words, _embed(model, words, args.batch_size, show_progress=False)))
            shortlist = [k["keyword"] for k in features[f].get("keywords", []) if k["keyword"] not in words]
            alternatives = [words[:-1] + [k] for k in shortlist]
            if len(words) < args.max_label_keywords:
                alternatives += [words + [k] for k in shortlist]
            alternatives = [a for a in alternatives if ", ".join(a) not in taken]
            if alternatives:
                options[f] = alternatives
        if not options:
            break
        feats = list(options)
        width = max(len(o) for o in options.values())
        vectors = torch.zeros(len(feats), width, ctx.emb.shape[1])
        valid = torch.zeros(len(feats), width, dtype=torch.bool)
        for i, f in enumerate(feats):
            for j, words in enumerate(options[f]):
                vectors[i, j] = torch.from_numpy(np.mean([known[w] for w in words], axis=0))
                valid[i, j] = True
        s_pos, s_neg, pos_mask, neg_mask = _judging_scores(ctx, feats, vectors)
        sep = batched_auroc(s_pos, s_neg, pos_mask, neg_mask).nan_to_num(0.0).masked_fill(~valid, float("-inf"))
        ranked = sep.argsort(dim=1, descending=True).numpy()
        new_labels: dict[int, str] = {}
        for i, f in enumerate(feats):
            for j in ranked[i]:
                if not valid[i, j]:
                    break
                label = ", ".join(options[f][j])
                if label not in taken:
                    new_labels[f] = label
                    taken.add(label)
                    break
        fresh = sorted({label for label in new_labels.values() if label not in known})
        known.update(zip(fresh, _embed(model, fresh, args.batch_size, show_progress=False)))
        if not new_labels:
            break
        feats = list(new_labels)
        true_vectors = torch.from_numpy(np.stack([known[new_labels[f]] for f in feats]))[:, None, :]
        s_pos, s_neg, pos_mask, neg_mask = _judging_scores(ctx, feats, true_vectors)
        sep = batched_auroc(s_pos, s_neg, pos_mask, neg_mask)[:, 0].numpy()
        for i, f in enumerate(feats):
            features[f]["label"], features[f]["train_auroc"] = new_labels[f], round_figure(sep[i])
            renamed.add(f)
    return sorted(renamed)


def _entry(ctx: LabellingContext, f: int) -> dict:
    """A feature's entry before labelling: its density, or why it cannot be labelled."""
    entry: dict = {"density": float(ctx.counts[f] / len(ctx.texts)), "n_firing": int(ctx.counts[f])}
    if ctx.counts[f] == 0:
        return {**entry, "label": None, "status": "dead", "reason": "never fires on this corpus"}
    if len(ctx.pos_rows[f]) == 0:
        return {**entry, "label": None, "status": "unlabelled", "reason": "fires only on held-out texts"}
    return entry


def _judging_scores(ctx: LabellingContext, feats: list[int], vectors: torch.Tensor):
    """Cosines of each feature's `vectors` (B, V, d) with its firing and non-firing labelling
    texts, and the masks of real texts: what candidate labels are judged on."""
    emb = torch.from_numpy(ctx.emb)
    pos, pos_mask = _padded([ctx.judge_rows[f] for f in feats])
    neg, neg_mask = _padded([ctx.negatives(f, held_out=False) for f in feats])
    s_pos = torch.bmm(vectors, _gather_rows(emb, pos).transpose(1, 2))
    s_neg = torch.bmm(vectors, _gather_rows(emb, neg).transpose(1, 2))
    return s_pos, s_neg, pos_mask[:, None, :], neg_mask[:, None, :]


def _gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a 2-d index. On the CPU through numpy's take: 3.5x faster than
    torch's index_select for (256, 100) rows of 384 floats, itself faster than table[index]."""
    if table.device.type == "cpu":
        return torch.from_numpy(np.take(table.numpy(), index.numpy(), axis=0))
    return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[1])


def _draft_labels(ctx: LabellingContext, block: list[int], keywords_of: dict, phrase_emb: np.ndarray, phrase_index: dict[str, int], chunk: int = 256) -> dict[int, dict]:
    """Each feature's entry with a draft label: KeyBERT's keywords (near-duplicates merged
    into the better-ranked one), the best of them at separating the feature's firing from its
    non-firing labelling texts (AUROC), then greedily those whose addition separates better
    still, a combination judged by the mean of its keywords' vectors. Features are handled
    together in padded batches."""
    args = ctx.args
    drafts: dict[int, dict] = {}
    entries: dict[int, dict] = {}
    todo = []
    for f in block:
        entry = entries[f] = _entry(ctx, f)
        if "status" in entry:
            drafts[f] = entry
        elif not keywords_of.get(f):
            drafts[f] = {**entry, "label": None, "status": "unlabelled", "reason": "no candidate n-gram occurs in enough of its texts"}
        else:
            todo.append(f)
    table = torch.from_numpy(phrase_emb)
    for c0 in range(0, len(todo), chunk):
        feats = todo[c0 : c0 + chunk]
        kws = [keywords_of[f] for f in feats]
        index, valid = _padded([[phrase_index[k] for k, _ in kw] for kw in kws])
        vectors = table[index]
        # Merge near-duplicates: a keyword too close to a better-ranked kept one is dropped.
        sims = torch.bmm(vectors, vectors.transpose(1, 2))
        kept = valid.clone()
        for j in range(1, index.shape[1]):
            kept[:, j] &= ~((sims[:, j, :j] >= args.merge_threshold) & kept[:, :j]).any(dim=1)
        s_pos, s_neg, pos_mask, neg_mask = _judging_scores(ctx, feats, vectors)
        sep = batched_auroc(s_pos, s_neg, pos_mask, neg_mask).nan_to_num(0.0).masked_fill(~kept, float("-inf"))
        width = min(args.label_pool, index.shape[1])
        pool_sep, pool = sep.topk(width, dim=1)
        in_pool = torch.isfinite(pool_sep)
        gather = pool[:, :, None].expand(-1, -1, s_pos.shape[2])
        pool_pos = s_pos.gather(1, gather)
        pool_neg = s_neg.gather(1, pool[:, :, None].expand(-1, -1, s_neg.shape[2]))
        rows = torch.arange(len(feats))
        chosen = torch.zeros_like(in_pool)
        chosen[:, 0] = True
        order = [torch.zeros(len(feats), dtype=torch.int64)]
        best = pool_sep[:, 0].clone()
        sum_pos, sum_neg = pool_pos[:, 0].clone(), pool_neg[:, 0].clone()
        growing = torch.ones(len(feats), dtype=torch.bool)
        for _ in range(args.max_label_keywords - 1):
            # The cosine with a mean of vectors is the mean of their cosines, and AUROC ignores scale.
            trial = batched_auroc(sum_pos[:, None] + pool_pos, sum_neg[:, None] + pool_neg, pos_mask, neg_mask)
            trial = trial.nan_to_num(float("-inf")).masked_fill(chosen | ~in_pool, float("-inf"))
            gain, j = trial.max(dim=1)
            grows = growing & (gain > best + 0.005)
            chosen[rows[grows], j[grows]] = True
            best = torch.where(grows, gain, best)
            sum_pos += torch.where(grows[:, None], pool_pos[rows, j], 0.0)
            sum_neg += torch.where(grows[:, None], pool_neg[rows, j], 0.0)
            order.append(torch.where(grows, j, -1))
            growing = grows
        order_np = torch.stack(order, dim=1).numpy()
        pool_np, pool_sep_np, in_pool_np = pool.numpy(), pool_sep.numpy(), in_pool.numpy()
        for i, f in enumerate(feats):
            picks = [int(pool_np[i, j]) for j in order_np[i] if j >= 0]
            members = [int(pool_np[i, j]) for j in range(width) if in_pool_np[i, j]]
            drafts[f] = {
                **entries[f],
                "label": ", ".join(kws[i][j][0] for j in picks),
                "status": "labelled",
                "first_keyword": kws[i][picks[0]][0],
                "keywords": [{"keyword": kws[i][j][0], "similarity": round(float(kws[i][j][1]), 4), "train_auroc": round_figure(pool_sep_np[i, n])} for n, j in enumerate(members)],
                "examples": {
                    "top": ctx.row_ids[ctx.pos_rows[f][: min(args.top_texts, 10)]].tolist(),
                    "quantile": ctx.row_ids[ctx.pos_rows[f][args.top_texts :]].tolist(),
                    "hard_negative": ctx.row_ids[ctx.hard_train[f][:10]].tolist(),
                },
                "top_texts": [_snippet(ctx.texts[r]) for r in ctx.pos_rows[f][:5]],
            }
    return drafts


def _finish_labels(ctx: LabellingContext, drafts: dict[int, dict], known: dict[str, np.ndarray]) -> dict[int, dict]:
    """Keep each draft's combined label, or its first keyword where that separates the
    labelling texts better once the combined string itself is embedded."""
    out = {f: dict(d) for f, d in drafts.items()}
    firsts = {f: e.pop("first_keyword", None) for f, e in out.items()}
    feats = [f for f, e in out.items() if e.get("status") == "labelled"]
    if not feats:
        return out
    options = torch.from_numpy(np.stack([np.stack([known[out[f]["label"]], known[firsts[f]]]) for f in feats]))
    s_pos, s_neg, pos_mask, neg_mask = _judging_scores(ctx, feats, options)
    sep = batched_auroc(s_pos, s_neg, pos_mask, neg_mask).nan_to_num(0.0).numpy()
    for i, f in enumerate(feats):
        pick = 1 if sep[i, 1] > sep[i, 0] else 0
        if pick:
            out[f]["label"] = firsts[f]
        out[f]["train_auroc"] = round_figure(sep[i, pick])
    return out


def unique_label_share(labels: list[str]) -> float:
    """Share of labels that no other feature has."""
    counts = Counter(labels)
    return sum(1 for label in labels if counts[label] == 1) / max(1, len(labels))


# The figures of a labelling's summary that `metrics.json` carries beside the SAE's own.
LABEL_METRIC_PREFIXES = ("label_", "n_labelled", "distinct_label", "centroid_")


def label_stage_seconds(summary: dict) -> dict[str, dict[str, float] | None]:
    """A labelling summary's time per stage: {"wall_seconds": ..., "thread_cpu_seconds": ...}.

    "wall_seconds": wall-clock seconds of each stage. The stages overlap: the base model embeds
    ("embed_candidates", "embed_labels") in a worker thread while the main thread runs
    "keybert", "choose" and "score", so on a loaded machine a stage's wall time holds the
    other thread's work too, and grows faster than the stage's own; "wait" is the main
    thread waiting for the worker. "thread_cpu_seconds": CPU seconds of the thread that ran
    each stage (`time.thread_time`): its own work, whatever runs beside it (torch's intra-op
    threads, when it uses several, are not counted: there the embedding stages read low).
    Files written before these two held the wall times alone, as "seconds": read as
    "wall_seconds", with "thread_cpu_seconds" None."""
    wall = summary.get("wall_seconds", summary.get("seconds"))
    cpu = summary.get("thread_cpu_seconds")
    return {"wall_seconds": wall if isinstance(wall, dict) else None, "thread_cpu_seconds": cpu if isinstance(cpu, dict) else None}


def label_metrics(summary: dict) -> dict:
    """The label scores among `summary`'s figures (a labelling summary, or metrics.json)."""
    return {k: v for k, v in summary.items() if k.startswith(LABEL_METRIC_PREFIXES)}


def label_scores_disagree(labels: dict | None, metrics: dict | None) -> str | None:
    """Why `metrics.json`'s label scores are not those of `feature_labels.json`, or None.

    The labels file carries its own scores (its "summary"); `sbert-sae label` writes it, then
    copies the scores into metrics.json: a labelling stopped between the two writes leaves new
    labels beside the old scores (or none). The scores themselves are compared, not a digest of
    the file, so that a copy of the labels written again (`save_pretrained`) still agrees, and a
    run labelled before this check existed is judged alike."""
    if not isinstance(labels, dict) or not isinstance(labels.get("summary"), dict):
        return None  # no labels, or labels without scores: nothing to agree with
    want = label_metrics(labels["summary"])
    have = label_metrics(metrics) if isinstance(metrics, dict) else {}
    if want == have:
        return None
    key = next(k for k in [*want, *(k for k in have if k not in want)] if want.get(k, ...) != have.get(k, ...))
    return (
        f"metrics.json's label scores are not those of {LABELS_FILE} ({key}: {have.get(key, 'none')} in metrics.json, "
        f"{want.get(key, 'none')} in the labels): a labelling was stopped between writing the two"
    )


def summarize_scores(features: dict[int, dict]) -> dict:
    """Mean, median and share >= 0.8 of the held-out AUROC, Pearson r, share of unique labels, over labelled features."""
    scores = [e.get("score") or {} for e in features.values() if e.get("status") == "labelled"]
    aurocs = [s["auroc"] for s in scores if s.get("auroc") is not None]
    pearsons = [s["pearson"] for s in scores if s.get("pearson") is not None]
    ceilings = [s["centroid_auroc"] for s in scores if s.get("centroid_auroc") is not None]
    labels = [e["label"] for e in features.values() if e.get("status") == "labelled" and e.get("label")]
    return {
        "n_scored": len(aurocs),
        "label_auroc_mean": round_figure(np.mean(aurocs)) if aurocs else None,
        "label_auroc_median": round_figure(np.median(aurocs)) if aurocs else None,
        "label_auroc_share_above_0.8": round_figure(np.mean(np.asarray(aurocs) >= 0.8)) if aurocs else None,
        "label_pearson_mean": round_figure(np.mean(pearsons)) if pearsons else None,
        "label_pearson_median": round_figure(np.median(pearsons)) if pearsons else None,
        "centroid_auroc_mean": round_figure(np.mean(ceilings)) if ceilings else None,
        "distinct_label_share": round_figure(unique_label_share(labels)),
    }


def score_labels(
    ctx: LabellingContext,
    labels: dict[int, str],
    model,
    known_embeddings: dict[str, np.ndarray] | None = None,
    show_progress: bool = False,
    chunk: int = 256,
) -> tuple[dict[int, dict], dict]:
    """Score labels on held-out texts: the cosine between a label's embedding and a text's
    embedding predicts the feature's activation (Pearson r) and whether it fires (AUROC,
    against the feature's hardest non-firing texts plus random ones).

    Each distinct label is embedded once (those in `known_embeddings` not at all).
    Returns per-feature scores and a summary (mean, median, share >= 0.8 AUROC, ...).
    """
    known = dict(known_embeddings or {})
    missing = sorted({s for s in labels.values() if s and s not in known})
    known.update(zip(missing, _embed(model, missing, ctx.args.batch_size, show_progress)))
    scores: dict[int, dict] = {}
    half = ctx.args.score_texts // 2
    todo = []
    for f, label in labels.items():
        if not label:
            continue
        if len(ctx.held_fi.rows_of(f)) == 0:
            scores[f] = {"auroc": None, "pearson": None, "n_firing": 0, "n_not_firing": 0, "reason": "no held-out text fires"}
        else:
            todo.append(f)
    emb = torch.from_numpy(ctx.emb)
    for c0 in range(0, len(todo), chunk):
        feats = todo[c0 : c0 + chunk]
        kept = [_spread(np.arange(len(ctx.held_fi.rows_of(f))), half, ctx.args.score_texts - half) for f in feats]
        pos, pos_mask = _padded([ctx.held_fi.rows_of(f)[k] for f, k in zip(feats, kept)])
        pos_acts = torch.zeros(pos.shape, dtype=torch.float32)
        for i, (f, k) in enumerate(zip(feats, kept)):
            pos_acts[i, : len(k)] = torch.from_numpy(np.asarray(ctx.held_fi.acts_of(f)[k], dtype=np.float32))
        neg, neg_mask = _padded([ctx.negatives(f, held_out=True) for f in feats])
        # The label's vector, and the feature's own centroid: what a single direction can do.
        vectors = torch.from_numpy(np.stack([np.stack([known[labels[f]], ctx.centroids[f]]) for f in feats]))
        s_pos = torch.bmm(vectors, _gather_rows(emb, pos).transpose(1, 2))
        s_neg = torch.bmm(vectors, _gather_rows(emb, neg).transpose(1, 2))
        aucs = batched_auroc(s_pos, s_neg, pos_mask[:, None], neg_mask[:, None]).numpy()
        r = _masked_pearson(torch.cat([s_pos[:, 0], s_neg[:, 0]], dim=1), torch.cat([pos_acts, torch.zeros(neg.shape)], dim=1), torch.cat([pos_mask, neg_mask], dim=1)).numpy()
        n_pos, n_neg = pos_mask.sum(1).tolist(), neg_mask.sum(1).tolist()
        for i, f in enumerate(feats):
            scores[f] = {"auroc": round_figure(aucs[i, 0]), "pearson": round_figure(r[i]), "centroid_auroc": round_figure(aucs[i, 1]), "n_firing": int(n_pos[i]), "n_not_firing": int(n_neg[i])}
    summary = summarize_scores({f: {"status": "labelled", "label": labels[f], "score": scores.get(f)} for f in labels if labels[f]})
    return scores, summary


def _masked_pearson(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pearson r of each row of x and y over the masked-in entries (nan under 3 of them or without spread)."""
    n = mask.sum(1).to(x.dtype)
    x, y = x.double().masked_fill(~mask, 0.0), y.double().masked_fill(~mask, 0.0)
    n = n.double()
    mx, my = x.sum(1) / n, y.sum(1) / n
    dx, dy = (x - mx[:, None]).masked_fill(~mask, 0.0), (y - my[:, None]).masked_fill(~mask, 0.0)
    cov, vx, vy = (dx * dy).sum(1), (dx * dx).sum(1), (dy * dy).sum(1)
    r = cov / (vx * vy).sqrt()
    return torch.where((n >= 3) & (vx > 1e-12) & (vy > 1e-12), r, torch.full_like(r, float("nan")))


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _embed(model, phrases: list[str], batch_size: int, show_progress: bool) -> np.ndarray:
    """Unit-norm embeddings of `phrases` by `model`'s own modules, through `TextEncoder`.

    `SentenceTransformer.encode` sorts texts by their length in characters; for short
    phrases that mixes token lengths in a batch (rare words split into many word pieces)
    and nearly doubles the padded tokens. `TextEncoder` batches by token length, tokenises
    ahead in threads and runs in half precision on a GPU; one encoder per model is kept.
    """
    from tqdm.auto import tqdm

    if not phrases:
        return np.zeros((0, embedding_dimension(model) or 0), dtype=np.float32)
    encoder = _ENCODERS.get(model)
    if encoder is None or encoder.settings.max_batch_size != batch_size:
        encoder = TextEncoder(model, EncodeSettings(normalize=True, max_batch_size=batch_size))
        _ENCODERS[model] = encoder
    with tqdm(total=len(phrases), desc="embedding phrases", unit="phrase", disable=not show_progress, mininterval=1.0) as bar:
        return encoder.encode(list(phrases), progress=bar.update)


_ENCODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _row_matrix(rows: list[np.ndarray], values: list[np.ndarray], n_rows: int, n_cols: int) -> sp.csr_matrix:
    """Sparse (n_rows, n_cols) matrix with `values[i]` at columns `rows[i]` of row i."""
    # int64 even when there are no rows (a block where no feature has a candidate): np.array([])
    # is float64, which np.repeat refused with a TypeError.
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    r_idx = np.repeat(np.arange(n_rows), lengths)
    c_idx = np.concatenate(rows) if len(rows) and lengths.sum() else np.zeros(0, dtype=np.int64)
    data = np.concatenate(values).astype(np.float32) if len(values) and lengths.sum() else np.zeros(0, dtype=np.float32)
    return sp.csr_matrix((data, (r_idx, c_idx)), shape=(n_rows, n_cols))


def _cap(positions: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    if len(positions) <= cap:
        return positions
    return np.sort(rng.choice(positions, size=cap, replace=False))


def _snippet(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------ files
def feature_labels_document(result: LabelResult, sae: SparseAutoencoder, dataset: str | None = None, domain: dict | None = None) -> dict:
    """The content of `feature_labels.json`; `domain` ({"column", "value"}) where the corpus
    was one domain's texts of `dataset` (a domain's SAE), None where it was all of it."""
    return {
        "version": LABELS_VERSION,
        "method": "c-TF-IDF n-gram candidates ranked by KeyBERT against the feature's activation-weighted centroid; the 1-3 keywords that best separate firing from non-firing labelling texts (AUROC); scored on held-out texts",
        "base_model": sae.config.base_model,
        "dataset": dataset,
        "domain": domain,
        "settings": result.settings,
        "summary": result.summary,
        "features": {str(f): entry for f, entry in sorted(result.features.items())},
    }


def parse_feature_labels(data, n_latents: int, source: str = LABELS_FILE) -> dict:
    """Check a loaded `feature_labels.json` and key its features by int; ModelLoadError if malformed."""
    from .errors import ModelLoadError

    if not isinstance(data, dict) or not isinstance(data.get("features"), dict):
        raise ModelLoadError(f"{source} is malformed: expected an object with a 'features' object")
    features = {}
    for key, entry in data["features"].items():
        try:
            f = int(key)
        except (TypeError, ValueError):
            raise ModelLoadError(f"{source} is malformed: feature id {key!r} is not an integer") from None
        if not 0 <= f < n_latents:
            raise ModelLoadError(f"{source} is malformed: feature id {f} is outside 0..{n_latents - 1}")
        if not isinstance(entry, dict):
            raise ModelLoadError(f"{source} is malformed: feature {f} is not an object")
        label = entry.get("label")
        if label is not None and not isinstance(label, str):
            raise ModelLoadError(f"{source} is malformed: label of feature {f} is {type(label).__name__}, not a string")
        features[f] = entry
    return {**data, "features": features}
