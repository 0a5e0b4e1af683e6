"""What the explorer shows, computed on demand: an SAE with its labels, metrics and families,
and its corpus, opened lazily.

Opening reads only the SAE and its JSON files, so a large corpus opens in seconds. The
corpus (dataset + cached embeddings, memory-mapped) is opened in the background; a
feature's strongest texts are then found on their own (one matrix-vector product over the
embeddings ranks the candidates, and only the best are encoded to check that the feature is
in their top-k). What needs every text's code (a feature's activation histogram, the
features that fire with it) waits for the corpus' sparse activations, encoded once in the
background and kept on disk beside the embedding cache, so the next start reads them.

Nothing here imports gradio: the app (`explorer.py`) only renders what this returns.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .activations import SparseActivations, published_activations
from .errors import DatasetError, InputError, ModelLoadError, SbertSaeError
from .families import FAMILIES_FILE, Family, parse_families
from .modeling_sbert_sae import SparseAutoencoder, _read_optional_json
from .search import DatasetTexts, FeatureMatch, LabelFinder, SteerableIndex
from .utils import clip

logger = logging.getLogger(__name__)

NOT_LABELLED = "not labelled: run `sbert-sae label` on this SAE"
MIN_SCORE_TEXTS = 5
"""Held-out firing texts a label's score needs to rank among the best-scored features."""


@dataclass
class TopText:
    """One corpus text a feature fires on."""

    position: int
    """Position in the corpus (the embedding cache's order)."""
    row: int
    """The text's row id in the dataset."""
    activation: float
    text: str


@dataclass
class TextInspection:
    """A text's sparse code and how well the SAE rebuilds it."""

    text: str
    features: list[dict]
    """Active features, strongest first: feature, activation, label."""
    cosine: float
    """cos(x, x_hat) in the SAE's input space."""
    relative_error: float
    """||x - x_hat||^2 / ||x||^2: one text's normalised MSE (an FVU needs many texts)."""
    l0: int
    tokens: int | None = None
    """The text's tokens by the base model's tokenizer (None where it has no fast tokenizer)."""
    max_tokens: int | None = None
    """The most tokens of a text the base model reads (its max_seq_length, less its special and prompt tokens)."""
    embedded_chars: int | None = None
    """Where the base model stopped reading a longer text (a character offset); None: it read all of it."""


@dataclass
class CorpusStatus:
    state: str
    """"none", "loading", "ready" or "failed"."""
    message: str
    n_texts: int | None = None


class Corpus:
    """Texts and embeddings of the SAE's corpus, with its sparse codes computed once.

    Attributes:
        name: the dataset it came from.
        row_ids: (n,) dataset row id of each position.
        texts_of: positions -> texts.
        embeddings: (n, d_in) float32 (memory-mapped), or None when the corpus came with
            precomputed codes only (a Hub activations dataset).
        index: the `SteerableIndex` over it (None until one can be made; see
            `Explorer.search_index`). Its codes, kept beside the embedding cache, are the
            codes every page reads, so `sbert-sae search` and the explorer share them.
    """

    def __init__(self, name: str, row_ids: np.ndarray, texts_of, embeddings: np.ndarray | None = None, *, index=None, activations: SparseActivations | None = None):
        self.name = name
        self.row_ids = np.asarray(row_ids)
        self.texts_of = texts_of
        self.embeddings = embeddings
        self.index = index
        self._activations = activations
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self.row_ids)

    @property
    def activations_ready(self) -> bool:
        return self._activations is not None

    def start_activations(self) -> None:
        """Encode every text's top-k code in a background thread (read from disk if an earlier
        run kept them), unless that is done or under way."""
        with self._lock:
            if self._activations is not None or self.index is None or (self._thread is not None and self._thread.is_alive()):
                return
            self._error = None
            self._thread = threading.Thread(target=self._encode_all, name="sbert-sae-codes", daemon=True)
            self._thread.start()

    def _encode_all(self) -> None:
        try:
            started = time.perf_counter()
            self._activations = self.index.codes
            logger.info("codes of %d texts ready in %.1fs", len(self), time.perf_counter() - started)
        except BaseException as err:
            logger.exception("encoding the corpus failed")
            self._error = err

    def activations(self, timeout: float | None = None, progress=None) -> SparseActivations | None:
        """The corpus' sparse codes, waiting up to `timeout` seconds (None: until done);
        None when not done by then. `progress(seconds_waited)` is called while waiting."""
        if self._activations is not None:
            return self._activations
        self.start_activations()
        started = time.monotonic()
        while self._activations is None:
            if self._error is not None:
                raise DatasetError(f"encoding the corpus {self.name} failed: {self._error}") from self._error
            if timeout is not None and time.monotonic() - started >= timeout:
                return None
            if progress is not None:
                progress(time.monotonic() - started)
            time.sleep(0.1)
        return self._activations

    @lru_cache(maxsize=4096)  # noqa: B019 - one Corpus per app; features are looked at again and again
    def firing(self, feature: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions, activations) of the texts `feature` fires on, strongest first (needs the codes)."""
        acts = self._activations
        if acts is None:
            raise DatasetError("the corpus' codes are not computed yet")
        hit = (np.asarray(acts.indices) == feature) & (np.asarray(acts.values) > 0)
        positions = np.nonzero(hit.any(axis=1))[0]
        values = np.asarray(acts.values)[positions][hit[positions]]
        order = np.argsort(-values, kind="stable")
        return positions[order], values[order]


# ----------------------------------------------------------------- the explorer
class Explorer:
    """An SAE and what is known about it, for the app: labels, metrics, families, decoder
    neighbours, texts' codes, and (lazily) its corpus.

    Use `Explorer.open(folder_or_repo)`; every method takes plain ids and returns plain data.
    """

    corpus_hint = "pass --dataset"
    """How to give a corpus where the SAE names none that opens here, said with that: the
    `explore` command's option; the Space names its variable instead (it has no command line)."""

    def __init__(
        self, sae: SparseAutoencoder, source: str, *, families: list[Family] | None = None, files: dict | None = None, data=None, data_given: bool = False, query: dict | None = None
    ):
        self.sae = sae.eval()
        # How the Search tab embeds a query: SteerableIndex's query_prompt_name, query_prompt or
        # query_like_corpus (none: the base model's query prompt where the corpus is documents).
        self._query = dict(query or {})
        self.source = source
        self.families = families or []
        self.files = files or {}
        self._data = data
        self._data_given = data_given
        self._cache_dir = getattr(data, "cache_dir", None)
        self.labels = sae.feature_labels
        self.label_data = sae.label_data
        self.entries = (self.label_data or {}).get("features", {})
        self.n = sae.config.n_latents
        density = self.files.get("feature_density.json") or {}
        self.train_counts = np.asarray(density["fire_counts"], dtype=np.int64) if "fire_counts" in density else None
        self.train_texts = density.get("n_texts")
        self._corpus: Corpus | None = None
        self._corpus_error: BaseException | None = None
        self._corpus_lock = threading.Lock()
        self._corpus_thread: threading.Thread | None = None
        with torch.no_grad():
            self._directions = F.normalize(sae.W_dec.detach().float(), dim=1)
        self.label_finder = LabelFinder(sae)
        """Finds features by their labels for both the Features and the Search tab (made ready
        in the background by `start_label_finder`)."""
        self._families_of: dict[int, list[int]] = {}
        for i, fam in enumerate(self.families):
            for f in fam.features:
                self._families_of.setdefault(f, []).append(i)

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        source: str | Path,
        *,
        dataset: str | None = None,
        text_column: str | None = None,
        device: str | None = None,
        cache_dir: str | None = None,
        revision: str | None = None,
        query_prompt_name: str | None = None,
        query_prompt: str | None = None,
        query_like_corpus: bool = False,
    ) -> Explorer:
        """The explorer of an SAE folder or Hub repo (or registry short name).

        The corpus is, in order: `dataset` (with `text_column`, default the run's); for a Hub
        repo, the activations dataset it was published with; the dataset the SAE was trained
        on (its `training_args.json`) when it can be opened here; else there is none and the
        app shows what the labels hold. `query_*`: how the Search tab embeds a query
        (`SteerableIndex`'s, default the base model's query prompt where the corpus is documents).
        """
        from .base_model import pick_device
        from .registry import resolve

        source = str(source)
        path = Path(source)
        if (source.startswith((".", "/")) or path.exists()) and not path.is_dir():
            raise ModelLoadError(f"{source} is not a folder: pass an SAE folder (config.json, model.safetensors) or a Hub repo id")
        # A registry short name means its released revision: its files are read from there too.
        revision = revision or resolve(source)[1]
        kwargs = {"revision": revision} if revision else {}
        sae = SparseAutoencoder.from_pretrained(source, **kwargs)
        sae = sae.to(pick_device(device))
        name = getattr(sae, "name_or_path", source) or source
        # Its other files and plots are read from the commit its weights came from (the SAE keeps
        # it): read from `main` again, a push in between showed another SAE's families and density.
        revision = sae._extras_location()[1].get("revision") or revision
        hub_kwargs = {"revision": revision} if revision else {}
        files = {}
        for fname in ("feature_density.json", "training_args.json", FAMILIES_FILE):
            try:
                files[fname] = _read_optional_json(name, fname, hub_kwargs)
            except (OSError, ValueError) as err:
                logger.warning("cannot read %s of %s: %s", fname, source, err)
                files[fname] = None
        families = parse_families(files[FAMILIES_FILE], source=f"{source}/{FAMILIES_FILE}") if files.get(FAMILIES_FILE) else []
        data = _corpus_arguments(files.get("training_args.json"), dataset, text_column, cache_dir, device)
        query = {"query_prompt_name": query_prompt_name, "query_prompt": query_prompt, "query_like_corpus": query_like_corpus}
        if sae.config.base_model and (query_prompt_name is not None or query_prompt is not None or query_like_corpus):
            from .base_model import saved_query_encoding

            # Checked now, from the model's saved prompts, where its files are here: a prompt name
            # it lacks was refused only by the first search, after the app was up.
            saved_query_encoding(
                sae.config.base_model, sae.config.base_model_revision, sae.config.base_model_kwargs,
                prompt_name=query_prompt_name, prompt=query_prompt, like_corpus=query_like_corpus,
            )
        explorer = cls(sae, source, families=families, files=files, data=data, data_given=dataset is not None, query=query)
        explorer.name_or_path = name
        explorer.revision = revision
        return explorer

    def start_label_finder(self) -> None:
        """Load the base model and make the labels' vectors and match cut-offs in a background
        thread (the app calls this once it is built): the first Find then embeds only its
        query, where it embedded every label and 1024 reference words while its user waited
        (6144 labels on 2 CPU cores: seconds when an earlier run kept their vectors in the
        cache, most of it loading the model; minutes the first time, under load). A Find
        meanwhile waits for that work; it is done once (`benchmarks/bench_explorer_open.py`)."""
        self.label_finder.start_warm_up()

    # ---------------------------------------------------------------- corpus
    def start_corpus(self) -> None:
        """Open the corpus in a background thread (the app calls this once it is up)."""
        with self._corpus_lock:
            if self._corpus is not None or (self._corpus_thread is not None and self._corpus_thread.is_alive()):
                return
            self._corpus_error = None
            self._corpus_thread = threading.Thread(target=self._open_corpus, name="sbert-sae-corpus", daemon=True)
            self._corpus_thread.start()

    def _open_corpus(self) -> None:
        try:
            self._corpus = self._load_corpus()
            if self._corpus is not None:
                self._corpus.start_activations()
        except BaseException as err:  # noqa: BLE001 - shown by corpus_status
            logger.warning("cannot open the corpus of %s: %s", self.source, err)
            self._corpus_error = err

    def _load_corpus(self) -> Corpus | None:
        link = getattr(self.sae, "activations_link", None)
        published = bool(link and link.get("repo_id"))
        if published and not self._data_given and not Path(self.source).is_dir():
            # A Hub SAE's training_args name its author's dataset, often a local path that
            # could name another dataset here: the texts it was published with are the ones.
            return self._load_published_corpus(link)
        if self._data is not None:
            try:
                return self._load_dataset_corpus(self._data)
            except (SbertSaeError, OSError, ValueError) as err:
                # The dataset a published SAE was trained on may be a path on its author's
                # machine; the activations it was published with hold the same texts.
                if self._data_given or not (link and link.get("repo_id")):
                    raise
                logger.info("cannot open %s (%s): reading the published activations instead", self._data.dataset, err)
        if link and link.get("repo_id"):
            return self._load_published_corpus(link)
        return None

    def _load_dataset_corpus(self, data) -> Corpus:
        from .pipeline import codes_fingerprint, codes_meta, load_sae_corpus

        data, ds, cache = load_sae_corpus(self.sae, self.source, data, show_progress=False)
        texts = DatasetTexts(ds, data.text_column, cache.row_ids)
        index = SteerableIndex(self.sae, cache.embeddings, texts=texts, row_ids=cache.row_ids, codes_dir=cache.path, codes_fingerprint=codes_fingerprint(self.sae, cache), codes_meta=codes_meta(cache), **self._query)
        index.label_finder = self.label_finder  # one set of label vectors for both tabs, made ready once
        name = data.dataset if isinstance(data.dataset, str) else ",".join(data.dataset)
        domain = cache.meta.get("domain")
        if domain:  # a domain's SAE's own texts, not the whole dataset: the status line says so
            name += f" whose {domain['column']} is {domain['value']!r}"
        return Corpus(name, cache.row_ids, texts.get, cache.embeddings, index=index)

    def _load_published_corpus(self, link: dict) -> Corpus:
        """The corpus of a Hub activations dataset (`sbert-sae push --activations`): its texts
        and their codes, so nothing needs embedding until a search."""
        ds = self.sae.load_activations()
        acts = published_activations(self.sae, ds)
        row_ids = np.asarray(ds["id"], dtype=np.int64) if "id" in ds.column_names else np.arange(len(ds))
        texts = DatasetTexts(ds, "text", np.arange(len(ds)))
        return Corpus(link["repo_id"], row_ids, texts.get, None, activations=acts)

    def corpus(self, timeout: float | None = None) -> Corpus | None:
        """The corpus, waiting up to `timeout` seconds for it to open (None: until it has)."""
        self.start_corpus()
        if self._corpus_thread is not None:
            self._corpus_thread.join(timeout)
        if self._corpus_error is not None:
            raise DatasetError(f"cannot open the corpus of {self.source}: {self._corpus_error}") from self._corpus_error
        return self._corpus

    @property
    def corpus_opening(self) -> bool:
        """True while the corpus is being opened (its texts embedded, the first time: minutes
        for a large one), so what needs it would wait."""
        return self._corpus is None and self._corpus_error is None and self._corpus_thread is not None and self._corpus_thread.is_alive()

    def search_index(self):
        """The `SteerableIndex` over the corpus: the corpus' own, else (a corpus of published
        codes, without embeddings) one made by embedding its texts once through the cache."""
        corpus = self.corpus()
        if corpus is None:
            raise DatasetError(f"no corpus to search: this SAE names no dataset that can be opened here ({self.corpus_hint})")
        with self._corpus_lock:
            if corpus.index is None:
                from .pipeline import DataArguments

                data = DataArguments(dataset=corpus.name, text_column="text", cache_dir=self._cache_dir)
                index = SteerableIndex.build(self.sae, data, **self._query)
                index.label_finder = self.label_finder  # its label vectors and cut-offs, once
                # Its rows are positions in the activations dataset; a hit names the text's row
                # in the original dataset (its `id`), as the feature pages do.
                index.row_ids = corpus.row_ids[index.row_ids]
                corpus.index = index
        return corpus.index

    def corpus_status(self) -> CorpusStatus:
        if self._corpus_error is not None:
            return CorpusStatus("failed", f"the corpus could not be opened: {self._corpus_error}")
        corpus = self._corpus
        if corpus is None:
            if self._corpus_thread is not None and self._corpus_thread.is_alive():
                return CorpusStatus("loading", "opening the corpus…")
            if self._data is None and not getattr(self.sae, "activations_link", None):
                return CorpusStatus("none", f"no corpus: this SAE names no dataset that can be opened here ({self.corpus_hint})")
            return CorpusStatus("loading", "the corpus is not opened yet")
        if corpus.activations_ready:
            return CorpusStatus("ready", f"{len(corpus):,} texts of {corpus.name}", len(corpus))
        return CorpusStatus("loading", f"{len(corpus):,} texts of {corpus.name}; encoding their codes (once: they are kept on disk)…", len(corpus))

    # ---------------------------------------------------------------- summary
    @property
    def labelled(self) -> bool:
        return bool(self.entries)

    def title(self) -> str:
        c = self.sae.config
        base = (c.base_model or "unknown base model").split("/")[-1]
        return f"{base} SAE · {c.n_latents:,} features · k={c.k}"

    def summary(self) -> dict:
        """Headline facts for the overview."""
        c = self.sae.config
        summary = (self.label_data or {}).get("summary", {})
        return {
            "source": self.source,
            "base_model": c.base_model,
            "n_latents": c.n_latents,
            "k": c.k,
            "d_in": c.d_in,
            "normalize": c.normalize,
            "labelled": self.labelled,
            "n_labelled": summary.get("n_labelled", sum(1 for label in self.labels if label)),
            "n_families": len(self.families),
            "label_dataset": (self.label_data or {}).get("dataset"),
        }

    def metrics(self) -> list[tuple[str, object, str]]:
        """(name, value, description) of every figure in metrics.json."""
        metrics = dict(self.sae.metrics or {})
        descriptions = metrics.pop("descriptions", {}) or {}
        return [(k, v, descriptions.get(k, "")) for k, v in metrics.items() if not isinstance(v, (dict, list))]

    def fire_counts(self) -> tuple[np.ndarray, int] | None:
        """(n_latents,) texts each feature fired on in training and how many texts that was,
        from feature_density.json, else from the labels' densities."""
        if self.train_counts is not None and self.train_texts:
            return self.train_counts, int(self.train_texts)
        if self.labelled:
            n_texts = (self.label_data.get("summary") or {}).get("n_texts")
            if n_texts:
                counts = np.array([int(self.entries.get(f, {}).get("n_firing") or 0) for f in range(self.n)])
                return counts, int(n_texts)
        return None

    def plot(self, name: str) -> str | None:
        """Local path of a plot saved beside the SAE (density.png, family_graph.png, ...), or None."""
        folder = Path(self.source)
        if folder.is_dir():
            path = folder / name
            return str(path) if path.exists() else None
        try:
            from huggingface_hub import hf_hub_download

            return hf_hub_download(self.name_or_path, name, revision=getattr(self, "revision", None))
        except Exception:  # noqa: BLE001 - a plot that is not published is simply not shown
            return None

    # ---------------------------------------------------------------- features
    def check_feature(self, feature) -> int:
        if isinstance(feature, str) and (typed := read_feature_id(feature, self.n)) is not None:
            if typed.problem:
                raise InputError(typed.problem)
            return typed.feature
        if isinstance(feature, float) and feature.is_integer():
            feature = int(feature)
        if isinstance(feature, np.integer):
            feature = int(feature)
        if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < self.n:
            raise InputError(f"unknown feature {feature!r}: features are numbered 0..{self.n - 1}")
        return feature

    def label(self, feature: int) -> str | None:
        return self.labels[feature]

    def display_label(self, feature: int) -> str:
        """The label, or why there is none."""
        label = self.labels[feature]
        if label:
            return label
        if not self.labelled:
            return "(not labelled)"
        status = self.entries.get(feature, {}).get("status")
        return f"({status})" if status and status != "labelled" else "(no label)"

    def auroc(self, feature: int) -> float | None:
        return ((self.entries.get(feature, {}).get("score") or {}).get("auroc"))

    def _score_texts(self, feature: int) -> int:
        return int((self.entries.get(feature, {}).get("score") or {}).get("n_firing") or 0)

    def density(self, feature: int) -> float | None:
        entry = self.entries.get(feature, {})
        if entry.get("density") is not None:
            return float(entry["density"])
        if self.train_counts is not None and self.train_texts:
            return float(self.train_counts[feature] / self.train_texts)
        return None

    def density_basis(self, feature: int) -> tuple[str, int | None] | None:
        """Which texts `density` counts over: ("labelling", n) or ("training", n); None without one."""
        if self.entries.get(feature, {}).get("density") is not None:
            return "labelling", (self.label_data.get("summary") or {}).get("n_texts")
        if self.train_counts is not None and self.train_texts:
            return "training", int(self.train_texts)
        return None

    def search_features(self, query: str, limit: int = 50) -> list[dict]:
        """Features by `query`: a feature id (812 or #812); words, found as the Search tab
        finds a feature (`LabelFinder.find`: labels or keywords that hold the words, then
        labels by meaning, each with its strength: "words", "close", "near" or "weak"), best
        first; or, for an empty query, the best-scored features."""
        q = " ".join((query or "").lower().split())
        # A signed number is an id too: "-1" was taken for words, and its nearest labels offered.
        typed = read_feature_id(q, self.n)
        if typed is not None:
            return [] if typed.feature is None else [self._row(typed.feature, "id")]
        if not q:
            # An AUROC over a handful of firing texts is luck: those come after the rest.
            scored = [f for f in range(self.n) if self.auroc(f) is not None and self.labels[f]]
            scored.sort(key=lambda f: (self._score_texts(f) < MIN_SCORE_TEXTS, -(self.auroc(f) or 0), f))
            return [self._row(f, "best scored") for f in scored[:limit]]
        if not self.label_finder.labelled:
            return []
        return [self._row(m.feature, m.strength, m) for m in self.label_finder.find(q, top=limit)]

    def _row(self, f: int, match: str, found: FeatureMatch | None = None) -> dict:
        row = {"feature": f, "label": self.display_label(f), "density": self.density(f), "auroc": self.auroc(f), "match": match}
        if found is not None:
            row["cos"] = found.score
        return row

    def feature(self, feature) -> dict:
        """A feature's card: label, status, keywords with scores, held-out score, density."""
        f = self.check_feature(feature)
        entry = self.entries.get(f, {})
        counts = self.fire_counts()
        out = {
            "feature": f,
            "label": self.labels[f],
            "display_label": self.display_label(f),
            "status": entry.get("status") or ("labelled" if entry.get("label") else (NOT_LABELLED if not self.labelled else "no label")),
            "reason": entry.get("reason"),
            "keywords": [k for k in entry.get("keywords") or [] if isinstance(k, dict)],
            "score": entry.get("score") or {},
            "train_auroc": entry.get("train_auroc"),
            "density": self.density(f),
            "n_firing": entry.get("n_firing"),
            "train_count": None if self.train_counts is None else int(self.train_counts[f]),
            "train_texts": self.train_texts,
            "stored_top_texts": entry.get("top_texts") or [],
            "stored_top_rows": (entry.get("examples") or {}).get("top") or [],
        }
        if counts is not None and out["n_firing"] is None:
            out["n_firing"] = int(counts[0][f])
        return out

    def keywords_of(self, feature: int, top: int = 12) -> list[str]:
        return [k["keyword"] for k in self.feature(feature)["keywords"][:top] if k.get("keyword")]

    def neighbours(self, feature, top: int = 10) -> list[dict]:
        """The features whose decoder directions are nearest (cosine), nearest first."""
        f = self.check_feature(feature)
        cos = self._directions @ self._directions[f]
        cos[f] = -2.0
        best = torch.topk(cos, min(top, self.n - 1)).indices.tolist()
        return [{"feature": g, "label": self.display_label(g), "cosine": float(cos[g])} for g in best]

    def families_of(self, feature) -> list[Family]:
        f = self.check_feature(feature)
        return [self.families[i] for i in self._families_of.get(f, [])]

    def top_texts(self, feature, n: int = 10) -> list[TopText]:
        """The `n` texts of the corpus the feature fires on most strongly, strongest first
        (empty without a corpus). Exact: from the corpus' activations when they are done,
        else by ranking the texts on the feature's pre-activation (one product with its
        encoder row) and encoding only the best candidates, whose top-k decides whether it fires."""
        f = self.check_feature(feature)
        corpus = self.corpus()
        if corpus is None:
            return []
        if corpus.activations_ready or corpus.embeddings is None:
            corpus.activations()
            positions, values = corpus.firing(f)
            positions, values = positions[:n], values[:n]
        else:
            positions, values = self._strongest_by_scan(corpus, f, n)
        texts = corpus.texts_of(positions) if len(positions) else []
        return [TopText(int(p), int(corpus.row_ids[p]), float(v), t) for p, v, t in zip(positions, values, texts)]

    @torch.no_grad()
    def _strongest_by_scan(self, corpus: Corpus, f: int, n: int, chunk: int = 65536, batch: int = 512, max_candidates: int = 32768):
        sae, emb = self.sae, corpus.embeddings
        w = sae.W_enc[f].detach().float()
        pre = np.empty(len(emb), dtype=np.float32)
        for start in range(0, len(emb), chunk):
            x = sae.prepare_input(torch.from_numpy(np.array(emb[start : start + chunk], dtype=np.float32)), check_finite=False)
            pre[start : start + len(x)] = ((x - sae.b_pre) @ w + sae.b_enc[f]).cpu().numpy()
        candidates = np.argsort(-pre, kind="stable")[: min(max_candidates, int((pre > 0).sum()))]
        found_pos, found_val = [], []
        for start in range(0, len(candidates), batch):
            rows = np.sort(candidates[start : start + batch])
            x = torch.from_numpy(np.array(emb[rows], dtype=np.float32)).to(sae.W_dec.device)
            values, indices = sae.encode_topk(x)
            hit = (indices == f) & (values > 0)
            r, c = hit.nonzero(as_tuple=True)
            found_pos += rows[r.cpu().numpy()].tolist()
            found_val += values[r, c].float().cpu().tolist()
            if len(found_pos) >= n:
                break
        order = np.argsort(-np.asarray(found_val, dtype=np.float32), kind="stable")[:n]
        return np.asarray(found_pos, dtype=np.int64)[order], np.asarray(found_val, dtype=np.float32)[order]

    def activation_histogram(self, feature, timeout: float | None = None, progress=None, bins: int = 30) -> dict | None:
        """Activations of the feature over every corpus text it fires on, binned: counts, edges,
        n_firing, n_texts. None without a corpus, or when its activations are not done in `timeout`."""
        f = self.check_feature(feature)
        corpus = self.corpus()
        if corpus is None or corpus.activations(timeout=timeout, progress=progress) is None:
            return None
        _, values = corpus.firing(f)
        # One value alone: numpy would span value ± 0.5, an axis from a negative activation.
        span = (0.0, float(values[0])) if len(values) and values.min() == values.max() else None
        counts, edges = np.histogram(values, bins=bins, range=span) if len(values) else (np.zeros(0, dtype=np.int64), np.zeros(0))
        return {"counts": counts, "edges": edges, "values": values, "n_firing": len(values), "n_texts": len(corpus)}

    def cooccurring(self, feature, top: int = 10, timeout: float | None = None, progress=None) -> list[dict] | None:
        """The features that fire most often on the texts this one fires on: count of shared texts,
        P(other | this), P(this | other); None without a corpus or before its activations are done."""
        f = self.check_feature(feature)
        corpus = self.corpus()
        if corpus is None:
            return None
        acts = corpus.activations(timeout=timeout, progress=progress)
        if acts is None:
            return None
        positions, _ = corpus.firing(f)
        if not len(positions):
            return []
        idx = np.asarray(acts.indices[np.sort(positions)])
        on = np.asarray(acts.values[np.sort(positions)]) > 0
        together = np.bincount(idx[on].astype(np.int64), minlength=self.n)
        together[f] = 0
        best = [int(g) for g in np.argsort(-together, kind="stable")[:top] if together[g] > 0]
        return [
            {
                "feature": g,
                "label": self.display_label(g),
                "together": int(together[g]),
                "p_other_given_this": float(together[g] / len(positions)),
                "p_this_given_other": float(together[g] / max(1, len(corpus.firing(g)[0]))),
            }
            for g in best
        ]

    def feature_data(self, feature, top: int = 10) -> dict:
        """A feature's page as plain data (JSON-ready), from the same methods the page's parts
        are drawn from: `feature` (label, status, keywords, scores, density), `top_texts`,
        `activation_histogram`, `neighbours`, `cooccurring` and `families_of`. Waits for the
        corpus and its codes as the page does; without a corpus (or when it cannot be opened,
        as `corpus` says) the parts that need it are None."""
        f = self.check_feature(feature)
        top = _count(top, "top")
        d = self.feature(f)
        basis = self.density_basis(f)
        out = {
            **{key: d[key] for key in ("feature", "label", "display_label", "status", "reason", "keywords", "score", "train_auroc", "density", "n_firing")},
            "density_of": None if basis is None else {"texts": basis[0], "n_texts": basis[1]},
            "stored_top_texts": d["stored_top_texts"],
            "top_texts": None,
            "activations": None,
            "neighbours": self.neighbours(f, top),
            "cooccurring": None,
            "families": [
                {
                    "parent": fam.parent,
                    "label": fam.label,
                    "depth": 0 if fam.parent == f else fam.depth[fam.children.index(f)],
                    "children": list(fam.children),
                    "keywords": list(fam.keywords),
                }
                for fam in self.families_of(f)
            ],
        }
        try:
            if self.corpus() is not None:
                out["top_texts"] = [{"row": t.row, "activation": t.activation, "text": t.text} for t in self.top_texts(f, top)]
                hist = self.activation_histogram(f)
                out["activations"] = {key: hist[key] for key in ("n_firing", "n_texts", "counts", "edges")}
                out["cooccurring"] = self.cooccurring(f, top)
        except SbertSaeError as err:  # the corpus could not be opened or encoded: said, as the page says it
            out["top_texts"] = out["activations"] = out["cooccurring"] = None
            status = {"state": "failed", "message": str(err), "n_texts": None}
        else:
            status = dataclasses.asdict(self.corpus_status())
        out["corpus"] = status
        return json_ready(out)

    def search_data(self, query: str, k: int = 10, steer: dict | None = None, method: str = "add") -> dict:
        """The Search tab's search as plain data (JSON-ready): the query's active features, and
        its `k` nearest corpus texts, each with its row id, score (by `similarity`, the base
        model's: cosine unless it declares another), text and every feature
        firing on it; `query_prompt`, the prompt the query was embedded with (the base
        model's "query" prompt for a corpus embedded as documents, see
        `SparseAutoencoder.query_encoding`; None for none); steered by `steer` (feature id -> strength as the tab's sliders take it:
        above 0 raises the feature, below 0 lowers it) with `method` "add" or "clamp"."""
        if not isinstance(query, str) or not query.strip():
            raise InputError("the query is empty: type what to search for")
        k = _count(k, "k")
        if steer is not None and not isinstance(steer, dict):
            raise InputError(f"steer must map feature ids to strengths, e.g. {{\"12\": 1.0}}, got {type(steer).__name__}")
        strengths = {}
        for key, value in (steer or {}).items():
            f = self.check_feature(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise InputError(f"steer[{key!r}] is {value!r}: a strength is a number (above 0 raises the feature, below 0 lowers it)")
            if value:
                strengths[f] = float(value)
        index = self.search_index()
        up = {f: v for f, v in strengths.items() if v > 0}
        down = {f: -v for f, v in strengths.items() if v < 0}
        result = index.search(query, up=up, down=down, k=k, method=method)
        positions = [index.position_of(h.row) for h in result.hits]
        values, indices = index.codes_at(positions)
        hits = []
        for h, vals, ids in zip(result.hits, values, indices):
            order = np.argsort(-vals, kind="stable")
            fired = [{"feature": int(ids[j]), "activation": float(vals[j]), "label": self.display_label(int(ids[j]))} for j in order if vals[j] > 0]
            hits.append({"row": h.row, "score": h.score, "text": h.text, "features": fired})
        return json_ready(
            {
                "query": query,
                "query_prompt": index.query_encoding.prompt,
                "query_features": [{"feature": f, "activation": v, "label": self.display_label(f)} for f, v, _ in index.query_features(query)],
                "steer": {f: strengths[f] for f in strengths},
                "method": method,
                "cosine": result.cosine,
                "similarity": index.similarity,
                "hits": hits,
            }
        )

    # ---------------------------------------------------------------- texts
    @torch.no_grad()
    def inspect(self, text: str) -> TextInspection:
        """A text's active features (with labels) and the quality of its reconstruction."""
        if not isinstance(text, str) or not text.strip():
            raise InputError("the text is empty: type or paste a text to inspect")
        x = self.sae.prepare_input(self.sae.embed_texts([text]).to(self.sae.W_dec.device))
        values, indices = self.sae.encode_topk(x)
        x_hat = self.sae.decode_topk(values, indices)
        order = torch.argsort(values[0], descending=True)
        features = [
            {"feature": int(indices[0, i]), "activation": float(values[0, i]), "label": self.display_label(int(indices[0, i]))}
            for i in order.tolist()
            if values[0, i] > 0
        ]
        cosine = float(F.cosine_similarity(x, x_hat, dim=1)[0])
        error = float((x - x_hat).pow(2).sum() / x.pow(2).sum().clamp_min(1e-12))
        return TextInspection(text=text, features=features, cosine=cosine, relative_error=error, l0=len(features), **self._read_by_the_model(text))

    def inspect_data(self, text: str) -> dict:
        """The Texts tab's inspection as plain data (JSON-ready), from `inspect`: the text's
        active `features` (feature, activation, label), strongest first, `l0` of `k`, its
        reconstruction's `cosine` and `relative_error` beside the held-out means the tab shows
        (`heldout_cosine`, `heldout_relative_error`; None where the SAE has no metrics), and how
        much of it the base model read: `tokens_read` of its `tokens` (the most it reads is
        `max_tokens`), `truncated`, and `embedded_chars`, the character where it stopped (None:
        it read the whole text). The token counts are None where the model has no fast tokenizer."""
        result = self.inspect(text)
        metrics = self.sae.metrics or {}
        out = dataclasses.asdict(result)
        out.update(
            k=self.sae.config.k,
            heldout_cosine=metrics.get("heldout_cosine"),
            heldout_relative_error=metrics.get("heldout_normalized_mse"),
            tokens_read=None if result.tokens is None or result.max_tokens is None else min(result.tokens, result.max_tokens),
            truncated=result.embedded_chars is not None,
        )
        return json_ready(out)

    def _read_by_the_model(self, text: str) -> dict:
        """How much of `text` the base model reads: the model truncates a text at its
        max_seq_length without a word, so that a pasted article's features are those of its
        first paragraphs only."""
        model = self.sae.base_sentence_transformer()
        tokenizer = getattr(model, "tokenizer", None)
        max_len = model.get_max_seq_length() if hasattr(model, "get_max_seq_length") else None
        if tokenizer is None or not max_len or not getattr(tokenizer, "is_fast", False):
            return {}
        kwargs = self.sae.config.base_model_kwargs or {}
        prompt = kwargs.get("prompt") or (getattr(model, "prompts", {}) or {}).get(kwargs.get("prompt_name") or getattr(model, "default_prompt_name", None) or "", "")
        room = max_len - tokenizer.num_special_tokens_to_add(pair=False) - (len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else 0)
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
        out = {"tokens": len(offsets), "max_tokens": room}
        if len(offsets) > room > 0:
            out["embedded_chars"] = offsets[room - 1][1]
        return out


def _count(value, name: str) -> int:
    """A positive whole number given by a script (a JSON number may come as 10.0)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive whole number, got {value!r}")
    return int(value)


def json_ready(value):
    """`value` with numpy arrays and numbers made Python lists and numbers, dict keys strings,
    and NaN or infinite floats None: what JSON carries."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_ready(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


_FEATURE_ID = re.compile(r"\s*#?[-+]?\d+\s*")
"""A feature id as typed: 812, #812, a sign (-1 is an id out of range, not words), spaces around."""


@dataclass(frozen=True)
class TypedFeatureId:
    """A number typed for a feature id: `typed` as typed, less "#" and spaces ("-1", "0812");
    `feature`, the feature it names, or None and `problem` saying why there is none."""

    typed: str
    feature: int | None
    problem: str | None = None


def read_feature_id(text: str, n: int) -> TypedFeatureId | None:
    """`text` (a Find's query, ?feature=, /feature's id) read as the id of one of `n` features;
    None where it is no number (words, to find a feature by its label)."""
    if not _FEATURE_ID.fullmatch(text):
        return None
    typed = text.strip().lstrip("#")
    # More digits than any feature id has: int() of more than 4300 digits raises ValueError
    # (Python's limit), which the app showed as an unexplained error.
    if len(typed.lstrip("+-").lstrip("0")) > 18:
        return TypedFeatureId(typed, None, f"unknown feature {clip(typed, 24)}: features are numbered 0..{n - 1}")
    feature = int(typed)
    if not 0 <= feature < n:
        return TypedFeatureId(typed, None, f"unknown feature {feature}: features are numbered 0..{n - 1}")
    return TypedFeatureId(typed, feature)


def keyword_spans(text: str, keywords: list[str]) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, keyword) spans of `text` where a keyword occurs as whole
    words, case-insensitive; longer keywords win over the shorter ones inside them."""
    taken = np.zeros(len(text) + 1, dtype=bool)
    spans = []
    for kw in sorted({k.strip() for k in keywords if k and k.strip()}, key=len, reverse=True):
        pattern = r"(?<!\w)" + r"\s+".join(re.escape(part) for part in kw.split()) + r"(?!\w)"
        for m in re.finditer(pattern, text, flags=re.IGNORECASE):
            if not taken[m.start() : m.end()].any():
                taken[m.start() : m.end()] = True
                spans.append((m.start(), m.end(), kw))
    return sorted(spans)


def _corpus_arguments(training_args: dict | None, dataset: str | None, text_column: str | None, cache_dir: str | None, device: str | None):
    """The DataArguments of the corpus to open, or None when there is none to open here."""
    from .pipeline import DataArguments, run_json_field

    if dataset is None:
        if not training_args or not training_args.get("data"):
            return None
        try:
            data = DataArguments.of_training_args(training_args)  # a domain's SAE: its own domain's texts
        except DatasetError as err:
            # A recorded dataset that is no path or id (null in a hand-made training_args.json) is
            # refused by DataArguments; the app opens without a corpus, as for one not here.
            logger.info("the training dataset recorded in training_args.json cannot be opened: %s", err)
            return None
        if not _openable(data.dataset):
            logger.info("the training dataset %r cannot be opened here", data.dataset)
            return None
    else:
        # the run's own JSON file, given again, is read under the key the run read it with
        base = DataArguments(dataset=dataset, json_field=run_json_field((training_args or {}).get("data") or {}, dataset))
        if training_args and training_args.get("data", {}).get("text_column") and text_column is None:
            text_column = training_args["data"]["text_column"]
        data = dataclasses.replace(base, text_column=text_column or base.text_column)
    overrides = {"cache_dir": cache_dir, "device": device}
    if text_column:
        overrides["text_column"] = text_column
    return dataclasses.replace(data, **{k: v for k, v in overrides.items() if v is not None})


def _openable(dataset) -> bool:
    """A local dataset that exists, or what looks like a Hub dataset id."""
    names = [dataset] if isinstance(dataset, str) else list(dataset or [])
    if not names:
        return False
    for name in names:
        if Path(name).exists():
            continue
        if name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).suffix:
            return False
    return True
