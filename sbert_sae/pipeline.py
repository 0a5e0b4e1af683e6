"""The `train` job end to end: dataset -> cached embeddings -> held-out split -> SAE(s) -> metrics.

`--domain` trains on one knowledge domain, `--per-domain` trains one SAE per domain into
sub-folders and writes a table comparing them. Only the main process writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import platform
import shutil
import sys
import time
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .base_model import DEFAULT_MODEL
from .configuration_sbert_sae import SparseAutoencoderConfig
from .data import TextRows, column_values, dataset_source, domain_row_ids, find_text_rows, flatten_for, load_text_dataset, require_column, split_heldout
from .embeddings import EmbeddingCache, cache_path, embed_dataset
from .errors import ConfigError, DatasetError, OutputDirError, ResumeError, SettingsChangedError
from .evaluation import METRIC_DESCRIPTIONS, evaluate, plot_density
from .trainer import TrainingArguments, check_finished_run, check_resume, data_identity, list_checkpoints, make_accelerator, train
from .utils import atomic_write, check_weights_unchanged, clip, domain_slugs, markdown_cell, pause_point, read_json, run_lock, weights_stamp, write_json

logger = logging.getLogger(__name__)

MIN_TEXTS = 3
"""Fewest texts an SAE is trained on: 2 to train, 1 held out."""

FEW_HELDOUT = 20
"""Under this many held-out texts a domain's held-out figures say little: a domain of 40
Debian package descriptions (1, 5 and 2 held out) scored a held-out cosine of 0.57, 0.86 and
0.79 with three seeds, and 0.87 with a fourth, the best of its comparison table. Such a
domain is warned about before training and marked in `domains.md`."""

SEEN_WARN = 0.05
"""Above this share of held-out texts that are also training texts (duplicates in the corpus:
boilerplate, reposts) a run is warned about before training: the SAE is trained on those very
embeddings, and its held-out figures flatter it."""

SEEN_CHUNK = 65_536
"""Texts read and hashed at a time when counting held-out texts that are also training texts."""

MANY_DOMAINS_NAMED = 5
"""Above this many domains of one kind (too small to train, too few held out) a warning names
the first of them in one line, rather than a line for each."""


def _some_domains(named: list[tuple[str, object]]) -> str:
    """The first `MANY_DOMAINS_NAMED` of (domain, count) pairs, for a one-line warning."""
    shown = ", ".join(f"{clip(name, 40)!r} ({count})" for name, count in named[:MANY_DOMAINS_NAMED])
    return shown + (f" and {len(named) - MANY_DOMAINS_NAMED} more" if len(named) > MANY_DOMAINS_NAMED else "")


RUN_FILES = ("config.json", "model.safetensors", "training_args.json", "metrics.json", "checkpoints", "train_log.jsonl")
# What a new run starts afresh (its training state): removed when --overwrite starts it. The
# old run's results stay until the new run's are complete.
TRAINING_STATE = ("checkpoints", "train_log.jsonl", "logs")
LABELS_PARTIAL_FILE = "feature_labels.partial.json"  # the labels so far of a labelling that was stopped
FINISHING = ".finishing"  # where a run's results are written before they replace the folder's


@dataclass
class DataArguments:
    """Which texts to train on and how to embed them."""

    dataset: str | list[str] = ""
    """Hub id, `save_to_disk` folder, data folder, or data file(s)."""
    text_column: str = "text"
    config_name: str | None = None
    """The Hub dataset's configuration (subset)."""
    split: str = "train"
    revision: str | None = None
    """Revision of a Hub dataset."""
    json_field: str | None = None
    """The key of JSON files that are one object each under which the records sit ("data" in
    {"version": ..., "data": [...]}), or a dotted path to records nested deeper, every list on
    the way gone through ("data.paragraphs": SQuAD's paragraphs, their article's title as
    "data.title"). Recorded in training_args.json, so later stages read the same records."""
    domain_column: str | None = None
    """Column naming each text's knowledge domain."""
    domain: str | None = None
    """Train on this value of `domain_column` only."""
    per_domain: bool = False
    """Train one SAE per value of `domain_column`."""
    heldout_fraction: float = 0.05
    """Share of texts (per domain) never trained on, for the metrics."""
    on_bad_text: str = "skip"
    """skip (and count) or error on rows whose text is missing, not a string or empty."""
    max_rows: int | None = None
    """Use only the first this many rows of the dataset."""
    model: str = DEFAULT_MODEL
    """sentence-transformers model (Hub id or folder)."""
    model_revision: str | None = None
    encode_kwargs: dict = field(default_factory=dict)
    """Settings of `SentenceTransformer.encode` the texts are embedded with (`prompt_name` or
    `prompt`, `truncate_dim`, `normalize_embeddings`); recorded in the SAE's config as
    `base_model_kwargs`, so that `encode_texts` embeds new texts alike."""
    embed_batch_size: int | None = None
    """Most texts in one forward pass when embedding (None: as many as the token budget allows)."""
    embed_precision: str = "auto"
    """auto (fp16 on a GPU, else fp32), fp32, fp16 or bf16."""
    cache_dir: str | None = None
    """Where embeddings are cached (default ~/.cache/sbert-sae)."""
    device: str | None = None

    def __post_init__(self):
        # A pathlib.Path (or a list of them) as the strings every stage reads and records;
        # a Dataset or DataFrame in memory is refused by name (see dataset_source).
        self.dataset = dataset_source(self.dataset)
        if isinstance(self.domain, str):
            # As `domain_names` names the column's values: 'Café' typed composed or decomposed is one domain.
            self.domain = unicodedata.normalize("NFC", self.domain)

    def with_recorded_paths(self) -> DataArguments:
        """These arguments with the base model and the embedding cache folder as a run records
        them (`recorded_model`, `recorded_cache_dir`: a local one by its absolute path), as a
        run and every point of a sweep use them. The dataset keeps the name it was given, which
        messages show; it is recorded by its absolute path when the run is written."""
        return dataclasses.replace(self, model=recorded_model(self.model), cache_dir=recorded_cache_dir(self.cache_dir))

    @property
    def by_domain(self) -> bool:
        """Whether a run trains on domains (one, or one SAE each) rather than on the whole corpus."""
        return bool(self.domain_column) and (self.per_domain or self.domain is not None)

    @classmethod
    def of_run(cls, recorded: dict, domain: str | None = None) -> DataArguments:
        """The corpus a run was trained on, from the `data` entry of its training_args.json
        (entries this version does not know are left out): the texts of `domain` only (the
        run's recorded `domain`, that of a --domain or --per-domain SAE) when given and the
        run had a domain column, else the whole corpus. Either way the whole dataset is
        embedded (one cache for every domain) and the domain's rows are read from it."""
        known = {f.name for f in dataclasses.fields(cls)}
        data = cls(**{k: v for k, v in recorded.items() if k in known})
        domain = domain if isinstance(domain, str) and data.domain_column else None
        return dataclasses.replace(data, domain=domain, per_domain=False)

    @classmethod
    def of_training_args(cls, training_args: dict) -> DataArguments:
        """The texts the run whose training_args.json is `training_args` was trained on (a
        domain's SAE: its own domain's), which label, families, search, explore and push
        --activations read when no dataset is given."""
        return cls.of_run(training_args["data"], domain=training_args.get("domain"))


def run_json_field(recorded: dict, dataset: str | list[str]) -> str | None:
    """The json_field a run (the `data` entry of its training_args.json) read `dataset` with,
    when `dataset` is the run's own (the same files): another dataset need not be shaped alike."""
    field, own = recorded.get("json_field"), recorded.get("dataset")
    if not (isinstance(field, str) and field and own):
        return None
    own, given = ([x] if isinstance(x, str) else list(x) for x in (own, dataset))

    def same(a, b) -> bool:
        a, b = str(a), str(b)
        return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())

    return field if len(own) == len(given) and all(same(a, b) for a, b in zip(own, given)) else None


@dataclass
class SaeArguments:
    """The SAE's size and loss (see SparseAutoencoderConfig)."""

    n_latents: int = 6144
    k: int = 32
    k_aux: int | None = None
    auxk_coef: float = SparseAutoencoderConfig.auxk_coef
    dead_threshold: int | None = None
    normalize: str = SparseAutoencoderConfig.normalize
    encoder_init_scale: float = SparseAutoencoderConfig.encoder_init_scale

    def validate(self) -> None:
        """Raise `ConfigError` naming an impossible value: what SparseAutoencoderConfig
        refuses, and a k_aux given larger than n_latents (there are only n_latents features
        to pick the dead from). Left out, k_aux is 2k, which may exceed a small n_latents
        (n_latents=64, k=48): the AuxK loss then takes every dead feature, as it always has."""
        SparseAutoencoderConfig(**dataclasses.asdict(self), d_in=1)
        if self.k_aux is not None and self.k_aux > self.n_latents:
            raise ConfigError(f"k_aux={self.k_aux} is larger than n_latents={self.n_latents}: k_aux must be in 1..n_latents")


@dataclass
class RunResult:
    """One SAE `run_training` trained (or kept, finished): load it with
    `SparseAutoencoder.from_pretrained(out_dir)`.

    Attributes:
        name: "all" for the whole corpus, else the domain's name.
        out_dir: the run folder its model, metrics and plots were written to.
        metrics: its `metrics.json`, without the descriptions.
    """

    name: str
    out_dir: Path
    metrics: dict = field(default_factory=dict)


@dataclass
class LoadedTexts:
    """A dataset's rows to embed, before they are embedded.

    Attributes:
        ds: the dataset (its first `max_rows` rows).
        rows: its rows with usable text.
        whole: the dataset `ds` holds the first rows of, when `max_rows` cut it; else None.
    """

    ds: object
    rows: TextRows
    whole: object = None


def load_texts(data: DataArguments) -> LoadedTexts:
    """The dataset and its rows with usable text (checked, as the domain column is), not embedded yet."""
    ds = load_text_dataset(data.dataset, config_name=data.config_name, split=data.split, revision=data.revision, json_field=data.json_field)
    ds = flatten_for(ds, data.text_column, data.domain_column)  # "meta.body" names a nested field
    whole = None
    if data.max_rows is not None:
        if data.max_rows < 1:
            raise DatasetError(f"max_rows must be >= 1, got {data.max_rows}")
        # The first rows are cached as an entry of their own, which copies the rows cached
        # for the whole dataset or for another count of its first rows (see embed_dataset).
        whole, ds = ds, ds.select(range(min(data.max_rows, len(ds))))
    rows = find_text_rows(ds, data.text_column, on_bad=data.on_bad_text)
    if data.domain_column:
        require_column(ds, data.domain_column, "domain")
    return LoadedTexts(ds=ds, rows=rows, whole=whole)


def _cache_settings(data: DataArguments) -> dict:
    """The arguments that decide which embedding cache holds `data`'s vectors."""
    return {
        "revision": data.model_revision,
        "cache_dir": data.cache_dir,
        "device": data.device,
        "precision": data.embed_precision,
        "encode_kwargs": data.encode_kwargs,
    }


def embed_texts(texts: LoadedTexts, data: DataArguments, accelerator=None, show_progress: bool = True) -> EmbeddingCache:
    """The cached embeddings of `texts` (under `accelerate launch` every process embeds its share)."""
    return embed_dataset(
        texts.ds,
        data.text_column,
        data.model,
        batch_size=data.embed_batch_size,
        on_bad_text=data.on_bad_text,
        show_progress=show_progress,
        text_rows=texts.rows,
        accelerator=accelerator,
        prefix_of=texts.whole,
        source=_source(data),
        **_cache_settings(data),
    )


def _recorded_dataset(dataset: str | list[str]) -> str | list[str]:
    """`dataset` as a run records it: a local file or folder by its absolute path. label,
    search, push --activations and the explorer read the run's texts from its record, and
    may be run from another folder than train was (`c/corpus.parquet` was then not found)."""
    if isinstance(dataset, str):
        return os.path.abspath(dataset) if os.path.exists(dataset) else dataset
    return [_recorded_dataset(d) for d in dataset]


def recorded_model(model: str) -> str:
    """`model` as a run records it (training_args.json, the SAE's config.json) and keys its
    embedding cache by: a local folder by its absolute path, a Hub id as it is. label, search,
    explore, `encode_texts` and push read the base model from that record, and may be run from
    another folder than train was: a relative `models/mine` was not found there (the loader
    asked the Hub for it), and push took it for a Hub id."""
    if isinstance(model, str) and not os.path.isabs(model) and Path(model).expanduser().is_dir():
        return os.path.abspath(Path(model).expanduser())
    return model


def recorded_cache_dir(cache_dir: str | None) -> str | None:
    """An embedding cache folder as a run records it: by its absolute path. label, search and
    explore read the run's embeddings from that record, and may be run from another folder
    than train was: a relative `cache` sent them to that folder's `cache`, where they embedded
    the whole corpus again."""
    return os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else cache_dir


def _source(data: DataArguments) -> dict:
    """What `data`'s texts were loaded from, as `sbert-sae cache list` shows it."""
    # A local path as an absolute one (`cache list` may be run from anywhere), as the run's
    # training_args.json records it: links kept, so both name the dataset as the user does.
    given = _recorded_dataset([data.dataset] if isinstance(data.dataset, str) else list(data.dataset))
    source = {"dataset": given[0] if len(given) == 1 else given, "split": data.split}
    for name in ("config_name", "revision", "json_field", "max_rows"):
        if getattr(data, name) is not None:
            source[name] = getattr(data, name)
    return source


def embedding_cache_name(texts: LoadedTexts, data: DataArguments, accelerator=None) -> str:
    """The name of the embedding cache `embed_texts` reads or makes for `texts`, without embedding."""
    return cache_path(texts.ds, data.text_column, data.model, accelerator=accelerator, **_cache_settings(data)).name


def load_and_embed(data: DataArguments, accelerator=None, show_progress: bool = True):
    """The dataset and its cached embeddings (under `accelerate launch` every process embeds its share)."""
    texts = load_texts(data)
    return texts.ds, embed_texts(texts, data, accelerator, show_progress=show_progress)


def check_output_dir(out_dir: Path, overwrite: bool, resume: bool, clear: bool = True) -> None:
    """Refuse to write into a folder that holds another run, unless told to replace or resume
    it; with `overwrite` (and `clear`), remove the training state of the run it replaces (its
    results stay until the new run's replace them: a new run that is stopped loses nothing)."""
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not existing:
        return
    if resume:
        if (out_dir / "metrics.json").exists() and not list_checkpoints(out_dir):
            raise ResumeError(f"{out_dir} holds a finished run: nothing to resume (use --overwrite, overwrite=True from Python, to train again)")
        return
    if not overwrite:
        raise OutputDirError(f"{out_dir} already holds a run ({', '.join(existing)}): pass --overwrite to replace it or --resume to continue it (overwrite=True or resume=True from Python)")
    if not clear:
        return
    for name in TRAINING_STATE:
        if name == "train_log.jsonl" and (out_dir / "model.safetensors").exists():
            continue  # a finished run's learning curve: it stays with that run's results until the new run's replace them
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def run_training(
    data: DataArguments,
    sae_args: SaeArguments,
    train_args: TrainingArguments,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    keep_finished: bool = False,
    loaded: tuple | None = None,
) -> list[RunResult]:
    """Train one SAE (or one per domain) and write each to its output folder.

    `keep_finished`: with `resume`, a finished run trained with these very settings and data
    is kept, not refused as "nothing to resume" (as a --per-domain run keeps its finished
    domains). `loaded`: the `(dataset, cache)` of `load_and_embed(data)` when the caller has
    them (a sweep trains many SAEs on one corpus), else they are loaded here."""
    out_dir = Path(out_dir)
    train_args.validate()
    sae_args.validate()  # refuse impossible sizes before any work
    if data.per_domain and not data.domain_column:
        raise DatasetError("--per-domain needs --domain-column")
    if data.domain is not None and not data.domain_column:
        raise DatasetError("--domain needs --domain-column")

    data = data.with_recorded_paths()
    accelerator = make_accelerator(train_args, out_dir, data.device)
    main = accelerator.is_main_process
    show = train_args.show_progress and main
    # The checks below run on every process of a launched run (each must refuse what it refuses);
    # their warnings are the main process' to say, once.
    warn = logger.warning if main else _said_by_the_main_process

    # Every check that can refuse the run comes before its texts are embedded.
    texts, cache = (None, loaded[1]) if loaded is not None else (load_texts(data), None)
    ds = loaded[0] if loaded is not None else texts.ds
    if texts is not None and texts.rows.only_text is not None and len(texts.rows.row_ids) > 1:
        # Identical texts have one embedding: the SAE learns nothing (every feature dead) yet
        # reports a perfect FVU of 0. Usually the wrong column (a constant one) was chosen.
        raise DatasetError(
            f"all {len(texts.rows.row_ids)} usable texts of column {data.text_column!r} are the same text "
            f"({texts.rows.only_text[:60]!r}): there is nothing to train on; is --text-column the right column?"
        )
    row_ids = cache.row_ids if cache is not None else texts.rows.row_ids
    groups: list[tuple[str, np.ndarray, Path]] = []
    if data.by_domain:
        by_domain = domain_row_ids(ds, data.domain_column, row_ids)
        if data.domain is not None:
            if data.domain not in by_domain:
                values = [clip(v, 40) for v in sorted(by_domain)[:20]]  # not every text of a column of texts
                more = f" (and {len(by_domain) - 20} more)" if len(by_domain) > 20 else ""
                raise DatasetError(f"domain {data.domain!r} not found in column {data.domain_column!r}; values are {values}{more}")
            groups.append((data.domain, by_domain[data.domain], out_dir))
        else:
            slugs = domain_slugs(by_domain)
            groups.extend((name, rows, out_dir / slugs[name]) for name, rows in by_domain.items())
    else:
        groups.append(("all", row_ids, out_dir))

    # An SAE needs at least MIN_TEXTS texts. Under --per-domain a small domain is skipped with a
    # warning; a run left with nothing to train (the whole corpus, or the --domain asked for, is
    # too small) is refused: it used to exit 0 having written nothing.
    too_small = [(name, len(rows)) for name, rows, _ in groups if len(rows) < MIN_TEXTS]
    if len(too_small) == len(groups):
        need = f"an SAE needs at least {MIN_TEXTS} usable texts (2 to train, 1 held out)"
        if data.by_domain:
            # At most 5 domains, each name cut short: a column of distinct values (e.g. the
            # text column given as the domain column) would otherwise print every text.
            shown = [f"{clip(name, 40)!r} has {n}" for name, n in too_small[:5]]
            more = f" (and {len(too_small) - 5} more)" if len(too_small) > 5 else ""
            what = f"domains of column {data.domain_column!r}: " + (", ".join(shown) + more if shown else "none has a value")
        else:
            what = f"dataset {data.dataset!r}, text column {data.text_column!r}: {len(row_ids)} usable text(s)"
        raise DatasetError(f"nothing to train; {need}. {what}")
    if len(too_small) > MANY_DOMAINS_NAMED:
        # One line for them all: a column of many one-text values would print a line each.
        warn("%d domains have under %d texts and are skipped: %s", len(too_small), MIN_TEXTS, _some_domains(too_small))
    for name, n in too_small if len(too_small) <= MANY_DOMAINS_NAMED else ():
        warn("domain %r has only %d texts: skipped", name, n)
    groups = [group for group in groups if len(group[1]) >= MIN_TEXTS]
    skipped = [(name, n, f"skipped: {n} text(s), an SAE needs at least {MIN_TEXTS}") for name, n in too_small]
    if data.by_domain:
        # A domain whose texts are all one text (a boilerplate "No description available."), as a
        # corpus of one text is refused above: its SAE learns nothing, every feature dead, yet
        # scored a perfect held-out FVU of 0 and cosine 1, the best row of domains.md.
        one_text = {name: text for name, rows, _ in groups if (text := _only_text(ds, data.text_column, rows)) is not None}
        for name, rows, _ in groups:
            if name in one_text:
                what = f"all {len(rows)} texts of domain {name!r} (column {data.domain_column!r}) are the same text ({clip(one_text[name], 60)!r})"
                if len(one_text) == len(groups):
                    raise DatasetError(f"nothing to train; {what}" + (f", and those of the {len(groups) - 1} other domains too" if len(groups) > 1 else "") + ": an SAE learns nothing from one text")
                warn("%s: skipped, an SAE learns nothing from one text", what)
                skipped.append((name, len(rows), f"skipped: its {len(rows)} texts are all the same text"))
        groups = [group for group in groups if group[0] not in one_text]
    # (train rows, held-out rows) of each SAE, drawn with the seed as given, also for a domain of
    # a --per-domain run, whose SAE starts from a seed of its own: a domain's held-out texts are
    # then the same whether it is trained alone (--domain), with the others, or within the
    # whole corpus.
    splits = {folder: split_heldout(rows, data.heldout_fraction, train_args.seed) for _, rows, folder in groups}
    if data.by_domain:
        few = [(name, len(rows), len(splits[folder][1])) for name, rows, folder in groups if 0 < len(splits[folder][1]) < FEW_HELDOUT]
        if len(few) > MANY_DOMAINS_NAMED:
            # 200 small domains gave 200 lines of this warning before the first was trained.
            warn(
                "%d domains have under %d held-out texts, too few to compare them with other domains (domains.md marks them; a larger "
                "--heldout-fraction holds out more of every domain): %s", len(few), FEW_HELDOUT, _some_domains([(name, f"{k} of {n}") for name, n, k in few]),
            )
        for name, n, n_heldout in few if len(few) <= MANY_DOMAINS_NAMED else ():
            warn(
                "domain %r has %d texts: its held-out figures will rest on %d of them (under %d), too few to compare it with other domains "
                "(a larger --heldout-fraction holds out more of every domain)", name, n, n_heldout, FEW_HELDOUT,
            )

    results = []
    # A --per-domain run stopped part-way resumes: the domains it finished are kept (when
    # trained with these very settings and data), the others continue or start.
    finished = {folder for _, _, folder in groups if resume and (data.per_domain or keep_finished) and _is_finished_run(folder)}
    with contextlib.ExitStack() as locks:
        if main:
            for _, _, folder in groups:
                # Locked before it is looked at: a second run (even with --overwrite) must not
                # touch the files of a run that is still writing them.
                locks.enter_context(run_lock(folder))
                if folder not in finished:
                    check_output_dir(folder, overwrite, resume, clear=False)
        accelerator.wait_for_everyone()
        cache_name = None
        # With --overwrite as well, a domain whose run (finished or stopped) has other settings is
        # trained again rather than refused: after a --per-domain --overwrite was stopped part-way,
        # the domains it had not reached yet still hold the run it was replacing, and those it
        # finished are kept and the one it was training continues.
        retrain = set()
        for name, _, folder in groups if resume else ():
            # The checkpoints a resumed run continues from (or the finished run it keeps) must be
            # of these settings and this data.
            if folder in finished or list_checkpoints(folder):
                if cache_name is None:
                    cache_name = cache.path.name if cache is not None else embedding_cache_name(texts, data, accelerator)
                domain_args = _domain_training_args(data, train_args, name)
                train_rows = splits[folder][0]
                config = _sae_config(sae_args, data, cache.dim if cache is not None else 1)
                data_id = data_identity(cache_name, np.searchsorted(row_ids, train_rows))
                try:
                    if folder in finished:
                        check_finished_run(folder, config, domain_args, data_id, len(train_rows), d_in_of_run=cache is None)
                    else:
                        check_resume(folder, config, domain_args, data_id, len(train_rows), d_in_of_checkpoint=cache is None)
                except SettingsChangedError as err:
                    if overwrite and data.per_domain:
                        retrain.add(folder)
                        continue
                    raise _seeds_as_given(err, data, name) from err
        finished -= retrain
        # Counted before the texts are embedded, to warn before the long part of the run.
        seen = {folder: heldout_seen_in_training(ds, data.text_column, *splits[folder]) for _, _, folder in groups if main and folder not in finished}
        _warn_seen_in_training({name: (seen[folder], len(splits[folder][1])) for name, _, folder in groups if folder in seen}, data.by_domain)
        if cache is None and any(folder not in finished for _, _, folder in groups):
            cache = embed_texts(texts, data, accelerator, show_progress=show)
        if main and cache is not None and 2 * sae_args.k > cache.dim and any(folder not in finished for _, _, folder in groups):
            # The defaults (k=32) suit MiniLM's 384 dimensions; with k above half a small
            # model's 48 the codes say hardly less than the embeddings (86% of the features dead).
            # Said only when an SAE is trained: finished ones kept on a resume are as they are.
            logger.warning(
                "-k %d features active per text is more than half the %d dimensions of %s's embeddings: "
                "the codes are hardly sparser than the embeddings themselves; give a k well below %d",
                sae_args.k, cache.dim, data.model, cache.dim,
            )
        if main:
            for _, _, folder in groups:
                if folder not in finished:
                    check_output_dir(folder, overwrite, resume and folder not in retrain)  # with --overwrite, now removes the run it replaces
        accelerator.wait_for_everyone()
        for name, _, folder in groups:
            if folder in finished:
                logger.info("%s: finished already, with these settings: kept (%s)", name, folder)
                metrics = read_json(folder / "metrics.json")
                results.append(RunResult(name=name, out_dir=folder, metrics={k: v for k, v in metrics.items() if k != "descriptions"}))
                continue
            domain_args = _domain_training_args(data, train_args, name)
            result = _train_one(name, splits[folder], folder, cache, data, sae_args, domain_args, accelerator, resume and folder not in retrain, split_seed=train_args.seed, seen=seen.get(folder))
            if result is not None:
                results.append(result)
        if main and data.per_domain:
            write_domain_table(out_dir, results, skipped=skipped)
    return results


def _said_by_the_main_process(*args, **kwargs) -> None:
    """A warning of a process other than the main one of a launched run: not said (the main
    process says it)."""


def _text_digests(ds, text_column: str, rows: np.ndarray) -> np.ndarray:
    """A 64-bit digest of each of `rows`' texts, read `SEEN_CHUNK` at a time: 8 bytes a text
    rather than the texts themselves, for a corpus of millions."""
    import hashlib

    digests = np.empty(len(rows), dtype=np.uint64)
    for start in range(0, len(rows), SEEN_CHUNK):
        values = column_values(ds, text_column, rows[start : start + SEEN_CHUNK])
        digests[start : start + len(values)] = [
            int.from_bytes(hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little") for value in values
        ]
    return digests


def heldout_seen_in_training(ds, text_column: str, train_rows: np.ndarray, heldout_rows: np.ndarray) -> int:
    """How many of `heldout_rows` hold a text that one of `train_rows` holds too, word for word:
    the split draws rows, not texts, so a corpus' duplicates fall on both sides, and the SAE is
    trained on the very embedding of such a held-out text. Texts are compared rather than
    embeddings: one text embedded in two batches (padded to other lengths) may differ in its
    last float bits."""
    if not len(heldout_rows) or not len(train_rows):
        return 0
    return int(np.isin(_text_digests(ds, text_column, heldout_rows), _text_digests(ds, text_column, train_rows)).sum())


def _warn_seen_in_training(seen: dict[str, tuple[int, int]], by_domain: bool) -> None:
    """Warn about each SAE (name -> (held-out texts also among its training texts, held-out
    texts)) whose share of them is above `SEEN_WARN`."""
    many = [(name, k, n) for name, (k, n) in seen.items() if n and k / n > SEEN_WARN]
    advice = "the SAE is trained on their very embeddings, so its held-out figures flatter it; deduplicate the corpus (keep one row of each text) for a fair measure"
    if not by_domain:
        for _, k, n in many:
            logger.warning("%d of the %d held-out texts (%.1f%%) are also training texts, word for word (duplicates in the corpus): %s", k, n, 100 * k / n, advice)
        return
    if len(many) > MANY_DOMAINS_NAMED:
        logger.warning(
            "%d domains have over %.0f%% of their held-out texts among their training texts, word for word (duplicates in the corpus): %s; %s",
            len(many), 100 * SEEN_WARN, _some_domains([(name, f"{k} of {n}") for name, k, n in many]), advice,
        )
        return
    for name, k, n in many:
        logger.warning(
            "domain %r: %d of its %d held-out texts (%.1f%%) are also its training texts, word for word (duplicates in the corpus): %s",
            name, k, n, 100 * k / n, advice,
        )


def _only_text(ds, text_column: str, rows: np.ndarray) -> str | None:
    """The text of `rows` when they all hold the same one, else None; read in growing chunks
    until two differ, so that a domain of distinct texts costs a few of them."""
    first, start, size = None, 0, 64
    while start < len(rows):
        for value in column_values(ds, text_column, rows[start : start + size]):
            if first is None:
                first = value
            elif value != first:
                return None
        start, size = start + size, min(size * 4, 65_536)
    return first


def _is_finished_run(folder: Path) -> bool:
    return (folder / "metrics.json").exists() and (folder / "model.safetensors").exists() and not list_checkpoints(folder)


def _domain_training_args(data: DataArguments, train_args: TrainingArguments, name: str) -> TrainingArguments:
    if not data.per_domain:
        return train_args
    # Each domain's SAE starts from its own random decoder: with one seed for all, the SAEs of
    # different domains share their initial directions and look alike to `compare`.
    return dataclasses.replace(train_args, seed=(train_args.seed + _domain_seed_offset(name)) % 2**32)


def _domain_seed_offset(name: str) -> int:
    return zlib.crc32(name.encode()) % 100_003


def _seeds_as_given(err: SettingsChangedError, data: DataArguments, name: str) -> SettingsChangedError:
    """`err` with a domain's recorded seeds (`_domain_training_args`) as the seed given for
    the whole run: a changed --seed 0 -> 3 read as the domain's 52716 -> 52719."""
    if not data.per_domain:
        return err
    # --overwrite alone trains every domain again, those finished with these settings too.
    err = SettingsChangedError(err.template + " (or --overwrite with --resume, to keep the domains finished with these settings and continue a stopped one)", err.changes, err.names)

    def given(key: str, value):
        if key != "training_args.seed" or isinstance(value, bool) or not isinstance(value, int):
            return value
        return (value - _domain_seed_offset(name)) % 2**32

    return err.naming({}, values=given)


def _sae_config(sae_args: SaeArguments, data: DataArguments, d_in: int) -> SparseAutoencoderConfig:
    return SparseAutoencoderConfig(
        **dataclasses.asdict(sae_args),
        d_in=d_in,
        base_model=data.model,
        base_model_revision=data.model_revision,
        base_model_kwargs=dict(data.encode_kwargs) or None,
    )


def _train_one(name, split, folder, cache, data, sae_args, train_args, accelerator, resume, split_seed: int, seen: int | None = None) -> RunResult | None:
    """Train and evaluate one SAE on `split`, its (train rows, held-out rows), drawn with
    `split_seed` (recorded in split.json; see `run_training`); `seen` of its held-out texts are
    also training texts (`heldout_seen_in_training`, counted on the main process)."""
    main = accelerator.is_main_process
    train_rows, heldout_rows = split
    train_pos, heldout_pos = cache.positions(train_rows), cache.positions(heldout_rows)
    config = _sae_config(sae_args, data, cache.dim)
    if main:
        logger.info("training %s: %d texts, %d of them held out -> %s", name, len(train_rows) + len(heldout_rows), len(heldout_rows), folder)
    # A run replacing a finished one (--overwrite) keeps its learning curve with its checkpoints:
    # the folder's train_log.jsonl stays the finished run's, beside that run's model, until the new
    # run's results replace them all (a stopped overwrite would otherwise lose it, and leave the
    # new run's partial curve beside the old model, for `push` to publish as its own).
    # The file is made before training, so that a --resume tells such a run's curve by it being
    # there (a run stopped as its results moved in has its model in place and its curve in the folder).
    pending_log = folder / "checkpoints" / "train_log.jsonl"
    if not resume and main and (folder / "model.safetensors").exists():
        pending_log.parent.mkdir(parents=True, exist_ok=True)
        pending_log.touch()
    accelerator.wait_for_everyone()
    log_file = pending_log if pending_log.exists() else None
    t0 = time.perf_counter()
    result = train(
        config,
        dataclasses.replace(train_args),
        cache.embeddings,
        train_pos,
        heldout_pos,
        folder,
        data_id=data_identity(cache.path.name, train_pos),
        row_ids=cache.row_ids,
        resume=resume,
        accelerator=accelerator,
        log_file=log_file,
    )
    accelerator.wait_for_everyone()
    if not main:
        return None
    sae = result.sae
    # A domain's SAE finds a held-out text's neighbours among its own domain's texts, as its
    # search and explorer do (the cache holds every domain's).
    domain_corpus = np.concatenate([train_pos, heldout_pos]) if _domain_name(data, name) is not None else None
    metrics, counts = evaluate(sae, cache.embeddings, train_pos, heldout_pos, corpus_positions=domain_corpus)
    metrics.update(
        {
            "epoch_dead_fraction": result.epoch_dead_fraction,
            "n_train": int(len(train_pos)),
            "n_heldout": int(len(heldout_pos)),
            "steps": result.steps,
            "train_seconds": result.seconds,
            "train_samples_per_second": result.samples_per_second,
            "total_seconds": time.perf_counter() - t0,
        }
    )
    if len(heldout_pos) and seen is not None:
        metrics["heldout_seen_in_training"] = seen / len(heldout_pos)
    sae.config.architectures = [type(sae).__name__]
    # The results are written aside, then moved in together: until then the folder holds the
    # run this one replaces (--overwrite), or nothing, never half of each.
    finishing = folder / FINISHING
    shutil.rmtree(finishing, ignore_errors=True)
    sae.save_pretrained(finishing)
    if log_file is not None and log_file.exists():
        shutil.copyfile(log_file, finishing / "train_log.jsonl")  # copied: kept for a --resume until the checkpoints go
    write_json(
        finishing / "training_args.json",
        {
            "sbert_sae_version": __version__,
            "command": [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else [],  # the program name, not its path
            "domain": _domain_name(data, name),
            "data": dataclasses.asdict(dataclasses.replace(data, dataset=_recorded_dataset(data.dataset))),
            "sae": dataclasses.asdict(_resolved_sae_args(config)),
            "training": train_args.to_dict(),
            "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "embedding_cache": str(cache.path),
            "embedding_dataset_fingerprint": cache.meta.get("dataset_fingerprint"),
            "skipped_rows": cache.meta.get("skipped", {}),
            "versions": _versions(),
            "run_signature": result.signature,
        },
    )
    write_json(
        finishing / "split.json",
        {
            "heldout_fraction": data.heldout_fraction,
            "seed": split_seed,
            "n_train": int(len(train_rows)),
            "n_heldout": int(len(heldout_rows)),
            "heldout_row_ids": heldout_rows.tolist(),
        },
    )
    write_json(finishing / "metrics.json", {**metrics, "descriptions": METRIC_DESCRIPTIONS})
    title = f"{data.model.split('/')[-1]} SAE n={config.n_latents} k={config.k}" + ("" if _domain_name(data, name) is None else f" ({name})")
    plot_density(counts, len(train_pos), finishing / "density.png", title=title)
    write_json(finishing / "feature_density.json", {"n_texts": int(len(train_pos)), "fire_counts": counts.tolist()})
    _move_results_in(finishing, folder)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the finished model supersedes them
    return RunResult(name=name, out_dir=folder, metrics=metrics)


def _move_results_in(finishing: Path, folder: Path) -> None:
    """Replace the results in `folder` by the complete ones in `finishing`: the old run's labels
    and families go (they describe its SAE), then each new file is renamed into place. The
    checkpoints are removed only after this, so a run stopped here finishes with --resume."""
    from .families import COOCCURRENCE_PLOT, FAMILIES_FILE, GRAPH_PLOT
    from .hub import ACTIVATIONS_FILE
    from .labels import LABELS_FILE
    from .utils import fsync_directory, fsync_folder

    fsync_folder(finishing)
    # Made from the old SAE after its training (labels, families, the activations' link): they
    # would be read as the new SAE's.
    for name in (LABELS_FILE, LABELS_PARTIAL_FILE, FAMILIES_FILE, COOCCURRENCE_PLOT, GRAPH_PLOT, ACTIVATIONS_FILE):
        (folder / name).unlink(missing_ok=True)
    for path in sorted(finishing.iterdir(), key=lambda p: p.name == "model.safetensors"):
        path.replace(folder / path.name)  # the weights last: what loads is the new run only once all of it is there
    finishing.rmdir()
    fsync_directory(folder)


def _domain_name(data: DataArguments, name: str) -> str | None:
    """The domain a run trained on, None for the whole corpus (whose group is called "all": a
    domain that is itself named "all" was recorded as no domain)."""
    return name if data.by_domain else None


def _resolved_sae_args(config: SparseAutoencoderConfig) -> SaeArguments:
    return SaeArguments(**{f.name: getattr(config, f.name) for f in dataclasses.fields(SaeArguments)})


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "sentence-transformers", "accelerate", "datasets"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def write_domain_table(out_dir: Path, results: list[RunResult], skipped: list[tuple] = ()) -> None:
    """`domains.json` and `domains.md`: one row per domain's SAE, side by side, each with a note
    where its figures cannot be compared with the others' (too few held-out texts); then the
    domains `skipped`, (name, texts) as too small to train or (name, texts, why), so that none
    is missing unsaid."""
    keys = ("n_train", "n_heldout", "heldout_fvu", "heldout_cosine", "heldout_l0", "dead_fraction", "dense_fraction", "neighbour_overlap_at_10")
    rows = [{"domain": r.name, "folder": r.out_dir.name, **{k: r.metrics.get(k) for k in keys}, "note": _domain_note(r.metrics)} for r in results]
    for name, n, *why in skipped:
        rows.append({"domain": name, "folder": None, **dict.fromkeys(keys), "note": why[0] if why else f"skipped: {n} text(s), an SAE needs at least {MIN_TEXTS}"})
    write_json(out_dir / "domains.json", rows)
    lines = ["| domain | folder | " + " | ".join(keys) + " | note |", "|" + "---|" * (len(keys) + 3)]
    for row in rows:
        # A figure that could not be measured (NaN: neighbour overlap@10 of a domain of under 11 texts) is "-", as domains.json's null.
        cells = [("-" if math.isnan(row[k]) else f"{row[k]:.4f}") if isinstance(row[k], float) else "-" if row[k] is None else str(row[k]) for k in keys]
        lines.append(f"| {markdown_cell(row['domain'])} | {row['folder'] or '-'} | " + " | ".join(cells) + f" | {markdown_cell(row['note'] or '')} |")
    text = "\n".join(lines) + "\n"
    atomic_write(out_dir / "domains.md", lambda tmp: Path(tmp).write_text(text))


def _domain_note(metrics: dict) -> str | None:
    n, seen = metrics.get("n_heldout"), metrics.get("heldout_seen_in_training")
    notes = []
    if isinstance(n, int) and 0 < n < FEW_HELDOUT:
        notes.append(f"held-out figures from {n} text(s) only (under {FEW_HELDOUT}): they change with the seed, do not compare them")
    if isinstance(seen, float) and seen > SEEN_WARN:
        notes.append(f"{seen:.0%} of its held-out texts are also its training texts (duplicates): its held-out figures flatter it")
    return "; ".join(notes) or None


def _labelling_id(sae_path: Path, cache: EmbeddingCache, label_args) -> str:
    """Identifies a labelling run: the SAE's weights, the corpus and the settings."""
    import hashlib

    digest = hashlib.sha256()
    with open(sae_path / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    domain = cache.meta.get("domain")  # a domain's rows of the cache are another corpus
    corpus = cache.path.name + (f"|domain={domain['column']}={domain['value']}" if domain else "")
    digest.update(f"{corpus}|{sorted(dataclasses.asdict(label_args).items())}".encode())
    return digest.hexdigest()


def load_sae_corpus(sae, sae_path, data: DataArguments, show_progress: bool = True, require_base_model: bool = True):
    """`data` embedded (or read from the cache) with the SAE's own base model, prompt and
    width: the data arguments used, the dataset and its `EmbeddingCache`. Refuses an SAE
    whose base model makes embeddings of another dimension, and one without a base model
    unless `require_base_model` is False (then `data.model` embeds the texts)."""
    from .errors import ConfigError

    where = f"the SAE in {sae_path}" if sae_path else "the SAE"
    if sae.config.base_model:
        data = dataclasses.replace(
            data, model=sae.config.base_model, model_revision=sae.config.base_model_revision, encode_kwargs=dict(sae.config.base_model_kwargs or {})
        )
    elif require_base_model:
        raise ConfigError(f"{where} has no base_model in its config: its texts cannot be embedded alike")
    ds, cache = load_and_embed(data, show_progress=show_progress)
    if cache.dim != sae.config.d_in:
        raise ConfigError(f"{data.model} makes {cache.dim}-d embeddings but {where} reads d_in={sae.config.d_in}")
    if data.domain is not None and data.domain_column:
        cache = domain_rows(ds, cache, data)
    return data, ds, cache


def domain_rows(ds, cache: EmbeddingCache, data: DataArguments) -> EmbeddingCache:
    """The rows of `cache` (the whole dataset's embeddings) whose `data.domain_column` is
    `data.domain`, chosen as training chose them (`domain_row_ids`): a domain's SAE is read
    on its own domain's texts, from the cache every domain shares (nothing is embedded
    again). Its `meta["domain"]` names the column and value."""
    groups = domain_row_ids(ds, data.domain_column, cache.row_ids)
    if data.domain not in groups:
        values = [clip(v, 40) for v in sorted(groups)[:20]]
        raise DatasetError(f"domain {data.domain!r} not found in column {data.domain_column!r} of {_source(data)['dataset']}; values are {values}")
    rows = groups[data.domain]
    positions = cache.positions(rows)
    meta = {**cache.meta, "domain": {"column": data.domain_column, "value": data.domain}}
    return dataclasses.replace(cache, embeddings=np.asarray(cache.embeddings[positions]), row_ids=rows, meta=meta)


def codes_fingerprint(sae, cache: EmbeddingCache) -> str | None:
    """The name `corpus_codes` keeps the SAE's codes of `cache`'s texts under in its folder:
    None (the encoder's fingerprint) for the whole dataset, a name of their own for a domain's
    rows (`domain_rows`), so that the two do not replace each other."""
    import hashlib
    import json

    from .activations import encoder_fingerprint

    domain = cache.meta.get("domain")
    if not domain:
        return None
    return f"{encoder_fingerprint(sae)}-domain-{hashlib.sha256(json.dumps(domain, sort_keys=True).encode()).hexdigest()[:12]}"


def codes_meta(cache: EmbeddingCache) -> dict | None:
    """What `corpus_codes` writes beside a domain's codes, for `sbert-sae cache list` to say
    which rows their hashed name holds: `{"domain": {column, value}}`; None for the whole dataset."""
    domain = cache.meta.get("domain")
    return {"domain": domain} if domain else None


def cache_codes(sae, cache: EmbeddingCache, show_progress: bool = False):
    """`corpus_codes` of `cache`'s texts, kept in its folder (see `codes_fingerprint`)."""
    from .activations import corpus_codes

    return corpus_codes(sae, cache.embeddings, cache.path, show_progress=show_progress, fingerprint=codes_fingerprint(sae, cache), meta=codes_meta(cache))


def run_labelling(sae_path: str | Path, data: DataArguments | None = None, label_args=None, show_progress: bool = True) -> dict:
    """Label every feature of the SAE at `sae_path` on a dataset (`data`; default: the one the run
    was trained on, as `sbert-sae label RUN` does) with `label_args` (default `LabelArguments()`);
    write `feature_labels.json` and add the label scores to `metrics.json`. Returns the labelling
    summary."""
    import torch

    from .base_model import load_sentence_transformer
    from .families import corpus_arguments
    from .labels import LABELS_FILE, LabelArguments, feature_labels_document, label_features, label_metrics
    from .modeling_sbert_sae import SparseAutoencoder
    from .utils import read_json

    sae_path = Path(sae_path)
    label_args = label_args or LabelArguments()
    label_args.validate()  # before any work
    data = corpus_arguments(sae_path, data)
    stamp = weights_stamp(sae_path)
    sae = SparseAutoencoder.from_pretrained(sae_path)
    data, ds, cache = load_sae_corpus(sae, sae_path, data, show_progress=show_progress)
    texts = column_values(ds, data.text_column, cache.row_ids)
    # Candidate labels are embedded as the corpus was (prompt, truncate_dim), to be compared with it.
    model = load_sentence_transformer(data.model, revision=data.model_revision, device=data.device, encode_kwargs=data.encode_kwargs)
    # The corpus is encoded by the SAE once (every text, every feature): on the GPU where there is one.
    sae = sae.to(data.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    partial_path = sae_path / LABELS_PARTIAL_FILE
    run_id = _labelling_id(sae_path, cache, label_args)
    done = {}
    if partial_path.exists():
        partial = read_json(partial_path)
        if partial.get("run_id") == run_id:
            done = {int(f): e for f, e in partial["features"].items()}
            logger.info("resuming labelling: %d features already done in %s", len(done), partial_path)
        else:
            logger.info("%s is from other settings or data: starting again", partial_path)

    blocks_saved = 0

    def save_partial(features: dict[int, dict]) -> None:
        nonlocal blocks_saved
        write_json(partial_path, {"run_id": run_id, "features": {str(f): e for f, e in features.items()}}, depth=2)
        blocks_saved += 1
        pause_point("block", blocks_saved)

    with run_lock(sae_path):
        check_weights_unchanged(sae_path, stamp, "labels")
        result = label_features(
            sae, texts, cache.embeddings, model, label_args, row_ids=cache.row_ids, show_progress=show_progress, done=done, on_block=save_partial,
            codes=cache_codes(sae, cache, show_progress=show_progress),
        )
        dataset_name = data.dataset if isinstance(data.dataset, str) else ",".join(data.dataset)
        # Two files, each replaced whole, one after the other: a run stopped between them leaves
        # the new labels beside metrics.json's old scores, which `label_scores_disagree` tells
        # (loading warns, push refuses) and a rerun (resumed from the partial file) mends.
        write_json(sae_path / LABELS_FILE, feature_labels_document(result, sae, dataset=dataset_name, domain=cache.meta.get("domain")), depth=2)  # a feature a line
        pause_point("labels", 1)
        metrics_path = sae_path / "metrics.json"
        metrics = read_json(metrics_path) if metrics_path.exists() else {}
        metrics = {k: v for k, v in metrics.items() if k not in label_metrics(metrics)} | label_metrics(result.summary)
        write_json(metrics_path, metrics)
        partial_path.unlink(missing_ok=True)
    return result.summary
