"""Publish an SAE to the Hugging Face Hub: its weights, config, labels, metrics and plots,
with a model card rendered from the package's `MODEL_CARD.md` template.

The same code talks to the real Hub and to any Hub-compatible server (`HF_ENDPOINT`).
Tokens are never printed or logged: they go to `huggingface_hub` as they are.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
from pathlib import Path

from .configuration_sbert_sae import SparseAutoencoderConfig
from .errors import ConfigError, HubError, ModelLoadError, SbertSaeError
from .evaluation import METRIC_DESCRIPTIONS
from .utils import dumps_json, markdown_cell, read_json

logger = logging.getLogger(__name__)

# What a published SAE repo holds, besides README.md (the card).
SAE_FILES = (
    "config.json",
    "model.safetensors",
    "feature_labels.json",
    "metrics.json",
    "density.png",
    "feature_density.json",
    "training_args.json",
    "train_log.jsonl",
    "split.json",
    "domains.json",
    "families.json",
    "families_cooccurrence.png",
    "family_graph.png",
)
TEMPLATE_NAME = "MODEL_CARD.md"


def _hub_error(err: Exception, what: str, repo_id: str) -> HubError:
    """A HubError that says what failed and what to do; never the token."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        return HubError(f"{what} needs a Hub token with write access: set HF_TOKEN or run `hf auth login` ({repo_id}: 401 Unauthorized)")
    if status == 403:
        return HubError(f"{what}: the token has no write access to {repo_id} (403 Forbidden); push to a repo you own, or ask for access")
    if status is not None and status >= 500:
        return HubError(f"{what} failed on the Hub's side ({repo_id}: {status}); nothing local changed, run the same command again")
    return HubError(f"{what} failed ({repo_id}): {err}")


@contextlib.contextmanager
def _dropped_messages(logger_name: str, prefix: str):
    """Within the block, the records of `logger_name` whose message starts with `prefix` are dropped."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(prefix)

    logger = logging.getLogger(logger_name)
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def card_template_path() -> Path:
    """The model-card template: `MODEL_CARD.md` shipped in the package (the repository root's file)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / TEMPLATE_NAME, here.parent / TEMPLATE_NAME):
        if candidate.is_file():
            return candidate
    raise HubError(f"the model-card template {TEMPLATE_NAME} is missing from the sbert-sae installation")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return read_json(path)
    except ValueError as err:
        raise ModelLoadError(f"{path} is not valid JSON: {err}") from err


# What each figure of the card is measured on: the SAE's held-out texts, its training texts,
# or the texts its labelling kept out to score the labels on (a share of the corpus it labelled).
CARD_METRIC_TEXTS = {
    "heldout_fvu": "heldout",
    "heldout_cosine": "heldout",
    "heldout_l0": "heldout",
    "dead_fraction": "train",
    "dense_fraction": "train",
    "neighbour_overlap_at_10": "heldout",
    "heldout_seen_in_training": "heldout",
    "label_auroc_mean": "labelling",
    "label_auroc_median": "labelling",
    "label_auroc_share_above_0.8": "labelling",
}


def _count(n, what: str) -> str:
    return f"{n:,} {what}" if isinstance(n, int) and not isinstance(n, bool) else what


def _corpus_texts(labels: dict) -> str:
    """The texts a labelling was run on, counted, as `feature_labels.json` records them: a
    domain's SAE's are its own domain's texts."""
    n_texts = (labels.get("summary") or {}).get("n_texts")
    domain = labels.get("domain")
    if isinstance(domain, dict) and domain.get("value") is not None:
        return _count(n_texts, f"corpus texts of domain {str(domain['value'])!r} (column {domain.get('column')})")
    return _count(n_texts, "corpus texts")


def _labelling_texts(labels: dict) -> str:
    """The texts a labelling scored its labels on, as `feature_labels.json` records them."""
    fraction = (labels.get("settings") or {}).get("heldout_fraction")
    share = f"the {fraction:.0%} of " if isinstance(fraction, (int, float)) else "the share of "
    return share + _corpus_texts(labels) + " kept out of labelling"


def _measured_on(name: str, metrics: dict, labels: dict) -> str:
    texts = CARD_METRIC_TEXTS[name]
    if texts == "heldout":
        if not name.startswith("neighbour_"):
            return _count(metrics.get("n_heldout"), "held-out texts")
        similarity = metrics.get("neighbour_similarity")
        ranked = f", ranked by {similarity} as the base model ranks" if isinstance(similarity, str) and similarity != "cosine" else ""
        return _count(metrics.get("n_heldout"), "held-out texts") + f" (their neighbours: among all corpus texts{ranked})"
    if texts == "train":
        return _count(metrics.get("n_train"), "training texts")
    return _labelling_texts(labels)


def _metrics_table(metrics: dict, labels: dict | None = None) -> str:
    """The card's figures, each with the texts it was measured on: the dead and dense
    fractions (training texts) and the label scores (texts kept out of labelling) sat under
    a heading that said all were measured on held-out texts."""
    rows = ["| metric | value | measured on | meaning |", "| --- | --- | --- | --- |"]
    for name in CARD_METRIC_TEXTS:
        value = metrics.get(name)
        if value is None:
            continue
        meaning = METRIC_DESCRIPTIONS.get(name, {"label_auroc_mean": "mean AUROC of the labels predicting where their feature fires", "label_auroc_median": "median of the same", "label_auroc_share_above_0.8": "share of labelled features with AUROC >= 0.8"}.get(name, ""))
        if isinstance(value, float) and not value.is_integer():
            value = f"{value:#.4g}"  # 0.3100, not 0.31: four significant digits, always shown
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = int(value)
        rows.append(f"| `{name}` | {value} | {markdown_cell(_measured_on(name, metrics, labels or {}))} | {markdown_cell(meaning)} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def _features_table(labels: dict, top: int = 20, min_firing: int = 5) -> str:
    """The best-scored labelled features, among those scored on at least `min_firing` held-out
    firing texts (a perfect AUROC on one text says little)."""
    features = labels.get("features", {})
    scored = [(int(f), e) for f, e in features.items() if e.get("status") == "labelled" and (e.get("score") or {}).get("auroc") is not None]
    solid = [(f, e) for f, e in scored if (e["score"].get("n_firing") or 0) >= min_firing]
    scored = sorted(solid or scored, key=lambda item: -item[1]["score"]["auroc"])
    if not scored:
        return ""
    rows = [
        f"AUROC and firing texts are counted on {_labelling_texts(labels)}; density is the share of all {_corpus_texts(labels)} the feature fires on.",
        "",
        "| feature | label | held-out AUROC | held-out firing texts | density |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f, e in scored[:top]:
        rows.append(f"| {f} | {markdown_cell(e['label'])} | {e['score']['auroc']:.3f} | {e['score'].get('n_firing', '')} | {e.get('density', 0):.4f} |")
    return "\n".join(rows)


def _plots_section(folder: Path) -> str:
    """The card's pictures of the SAE, by their paths in the repo (the Hub shows a card's
    relative image links from the revision shown): the density histogram and, after
    `sbert-sae families`, one family as a tree and the co-occurrence of all of them. The
    plots were uploaded and the card showed none of them."""
    from .families import COOCCURRENCE_PLOT, FAMILIES_FILE, GRAPH_PLOT

    parts = []
    if (folder / "density.png").is_file():
        parts.append("### Feature density\n\nHow many texts each feature fires on (`feature_density.json` holds the counts):\n\n![Feature density histogram](density.png)")
    families = _read_json(folder / FAMILIES_FILE)
    summary, settings = families.get("summary") or {}, families.get("settings") or {}
    if summary.get("n_families"):
        eligible = "features that fire" + (f" on at most {settings['max_density']:.0%} of texts" if isinstance(settings.get("max_density"), (int, float)) else "")
        text = (
            f"### Families\n\n{summary['n_families']} feature families (a parent feature and the sparser features that fire with it, "
            f"O'Neill et al. 2024) hold {summary.get('n_features_in_families', '?')} of the {summary.get('n_eligible_features', '?')} "
            f"{eligible}; `families.json` lists them, and `SparseAutoencoder.feature_families()` reads it."
        )
        if (folder / GRAPH_PLOT).is_file():
            plotted = summary.get("plotted_family")
            text += f"\n\n{f'The family of feature {plotted}' if plotted is not None else 'One of them'} as a tree:\n\n![A feature family as a tree]({GRAPH_PLOT})"
        if (folder / COOCCURRENCE_PLOT).is_file():
            text += f"\n\nHow often the features of each family fire together: [{COOCCURRENCE_PLOT}]({COOCCURRENCE_PLOT})."
        parts.append(text)
    return "\n\n".join(parts)


_ABSOLUTE_PATH = re.compile(r"^(?:/|~|[A-Za-z]:[\\/]|\\\\)")


def _without_local_paths(value):
    """`value` (parsed JSON) with every string that is an absolute local path (/home/me/corpus,
    ~/data, C:\\corpus, \\\\server\\share) cut to its last part, as the cards name local files:
    a published repo should not tell the publisher's user name and folders, and those paths
    mean nothing on another machine anyway."""
    if isinstance(value, dict):
        return {key: _without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(item) for item in value]
    if isinstance(value, str) and _ABSOLUTE_PATH.match(value) and "\n" not in value:
        return re.split(r"[\\/]", value.rstrip("/\\"))[-1] or value
    return value


def _is_local_model(name: str) -> bool:
    """Whether a base model name is a folder of this machine rather than a Hub id, as the
    loader reads it (an existing folder first, see `base_model.resolve_model_path`)."""
    from .modeling_sbert_sae import _names_a_folder

    return _names_a_folder(name) or Path(name).expanduser().is_dir()


def _checked_hub_id(name: str, option: str) -> str:
    """`name` if it can be a Hub model id (`org/name`); ConfigError naming `option` otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or _is_local_model(name):
        raise ConfigError(f"{option} {name!r} is a local path, not a Hub model id (ORG/NAME)")
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise ConfigError(f"{option} {name!r} is not a Hub model id (ORG/NAME): {err}") from None
    return name


def published_base_model(config: dict, base_model_id: str | None = None, where: str = "the SAE was not pushed", option: str = "--base-model-id") -> tuple[str | None, str | None]:
    """The base model (a Hub id) and its revision that a published copy of the SAE with
    `config` names, in its config.json and its card: `base_model_id` when given; else the
    recorded `base_model` when it is a Hub id; else the Hub id its local folder is a copy of
    (`base_model.hub_id_of_folder`). A folder that tells none is refused (ConfigError: `where`,
    then the folder and `option`): published, its path would leak the publisher's folders and load
    nothing on another machine. The run folder itself keeps its path (resume, local loading)."""
    from .base_model import hub_id_of_folder

    recorded, revision = config.get("base_model"), config.get("base_model_revision")
    if base_model_id is not None:
        base_model_id = _checked_hub_id(base_model_id, option)
        # A revision recorded for another model (or for a folder, where it meant nothing) is not this one's.
        return base_model_id, (revision if base_model_id == recorded else None)
    if not recorded or not _is_local_model(recorded):
        return recorded, revision
    origin = hub_id_of_folder(recorded)
    if origin is not None:
        return origin, None
    raise ConfigError(
        f"{where}: the base model is the local folder {recorded}, which nobody else can load; give its Hub id with {option} ORG/NAME"
    )


def _published_file(path: Path, base_model: tuple[str | None, str | None]):
    """What is uploaded for the run file `path`: the file itself, or for its JSON files (the
    run's settings, labels, families...) their content without local paths, as bytes.
    config.json and the labels name the base model by `base_model` (its Hub id and revision,
    `published_base_model`): config.json's base model is what loads the SAE's text encoder."""
    from .labels import LABELS_FILE

    if path.suffix != ".json":
        return str(path)
    data = read_json(path)
    if path.name == "config.json":
        public = {**data, "base_model": base_model[0]}
        if "base_model_revision" in data or base_model[1] is not None:
            public["base_model_revision"] = base_model[1]
    else:
        public = _without_local_paths(data)
        if path.name == LABELS_FILE and isinstance(public, dict) and "base_model" in public:
            public["base_model"] = base_model[0]
    return str(path) if public == data else (dumps_json(public) + "\n").encode("utf-8")


def _is_local(dataset: str) -> bool:
    """Whether a dataset name is (or can only be) a local path rather than an `org/name` Hub id."""
    from .modeling_sbert_sae import _names_a_folder

    return _names_a_folder(dataset) or Path(dataset).exists() or "/" not in dataset


def _public_dataset_name(dataset) -> str:
    """A dataset (a name, or several data files) as a published card may name it, in
    Markdown: a Hub id as it is, local files and folders by their last part only."""
    names = [dataset] if isinstance(dataset, str) else [str(d) for d in dataset or []]
    if not names:
        return "an unnamed dataset"
    if any(_is_local(name) for name in names):
        return "a local dataset, " + ", ".join(f"`{Path(name).name}`" for name in names)
    return ", ".join(f"`{name}`" for name in names)


def _source_of_texts(text_column: str | None, json_field: str | None) -> str:
    """Where in the dataset the texts were read, for the cards: the column, and for a JSON
    file the records' path (`--json-field data.paragraphs`): a SQuAD file has no top-level
    column `context`, so the column alone does not say how to read the texts again."""
    return (f"records at `{json_field}`, " if json_field else "") + f"column `{text_column}`"


def _embedding_summary(config: dict, base_model: str | None) -> str:
    """The card's line saying how the SAE's inputs were embedded, for an SAE trained on
    vectors made with encode settings (a prompt, a truncate_dim: `base_model_kwargs`).
    `encode(texts)` without them makes other vectors (without the prompt, other codes and
    no error), and the card is what someone embedding with sentence-transformers reads."""
    kwargs = config.get("base_model_kwargs")
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    model = f'SentenceTransformer("{base_model}")' if base_model else "the base model"
    lines = []
    if kwargs:
        settings = ", ".join(f"{name}={value!r}" for name, value in kwargs.items())
        lines.append(f"- embeddings: `{model}.encode(texts, {settings})`, as `sae.encode_texts` makes them")
    query = _query_encoding_of(config)
    if query is not None and not query.like_corpus:
        # An asymmetric model (e5, bge, nomic, Qwen3-Embedding) embeds a search query with
        # another prompt than the texts searched: encode(query) as a text ranks worse.
        settings = ", ".join(f"{name}={value!r}" for name, value in query.kwargs.items())
        lines.append(f"- search queries: `{model}.encode(queries, {settings})`, as `sae.embed_queries` and `sbert-sae search` make them")
    return "\n".join(lines)


def _query_encoding_of(config: dict):
    """How a search query is embedded for an SAE of `config`; None where its base model's
    files are not on this machine (or cannot be read)."""
    from .base_model import saved_query_encoding

    if not config.get("base_model"):
        return None
    try:
        return saved_query_encoding(config["base_model"], config.get("base_model_revision"), config.get("base_model_kwargs"))
    except SbertSaeError:
        return None


def _training_summary(args: dict, config: dict, base_model: str | None = None) -> str:
    embedding = _embedding_summary(config, base_model)
    if not args:
        return embedding
    data, training = args.get("data", {}), args.get("training", {})
    dataset = _public_dataset_name(data.get("dataset"))
    parts = [
        f"- data: {dataset} ({_source_of_texts(data.get('text_column'), data.get('json_field'))}"
        + (f", domain `{args['domain']}`" if args.get("domain") else "")
        + f"), {data.get('heldout_fraction', 0):.0%} of texts held out",
        *([embedding] if embedding else []),
        f"- SAE: n_latents={config.get('n_latents')}, k={config.get('k')}, k_aux={config.get('k_aux')}, AuxK coefficient {config.get('auxk_coef')}, inputs {config.get('normalize')}-normalised",
    ]
    if training:
        parts.append(
            f"- optimisation: {training.get('epochs')} epochs, batch {training.get('batch_size')}, Adam lr {training.get('lr')} ("
            + (f"decoder's x{training['decoder_lr_scale']:g}, " if training.get("decoder_lr_scale", 1) != 1 else "")
            + f"{training.get('lr_schedule')}, {training.get('warmup_fraction', 0):.0%} warm-up), grad clip {training.get('grad_clip')}, seed {training.get('seed')}"
        )
    return "\n".join(parts)


def render_model_card(
    folder: str | Path,
    repo_id: str,
    activations_repo: str | None = None,
    license_name: str | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    base_model_id: str | None = None,
    activations_data=None,
):
    """The `huggingface_hub.ModelCard` of the SAE in `folder`, rendered from `MODEL_CARD.md`
    (`datasets`: the Hub ids of the data it was trained on, its metadata's `datasets:`; default:
    the run's corpus when that is a Hub id, never the activations dataset, which the card's text
    links; `tags`: more tags for its metadata, after sbert-sae's own; `base_model_id`: the base
    model's Hub id, see `published_base_model`; `activations_data`: the texts pushed to
    `activations_repo`, see `_activations_texts`)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    folder = Path(folder)
    config = _read_json(folder / "config.json")
    if config.get("model_type") != SparseAutoencoderConfig.model_type:
        raise ModelLoadError(f"{folder} is not an sbert-sae SAE (config.json model_type={config.get('model_type')!r})")
    metrics = _read_json(folder / "metrics.json")
    labels = _read_json(folder / "feature_labels.json")
    args = _read_json(folder / "training_args.json")
    dataset = (args.get("data") or {}).get("dataset")
    if datasets is None:
        # Only Hub ids belong in the card's metadata, not local paths.
        datasets = [dataset] if isinstance(dataset, str) and not _is_local(dataset) else []
    base_model, _ = published_base_model(config, base_model_id, where=f"no card for {folder}")
    # The Hub reads a model-index result's dataset `type` as a dataset id and links to it: one of
    # a local corpus' folder name ("wiki") would link to another's dataset, or to none. Without a
    # Hub dataset of its texts (the corpus, else the activations, which hold its texts) the
    # metrics are in the card's table only.
    texts_on_hub = [*datasets, activations_repo] if activations_repo else datasets
    eval_results = [
        EvalResult(task_type="feature-extraction", dataset_type=texts_on_hub[0], dataset_name=texts_on_hub[0], metric_type=metric, metric_name=title, metric_value=float(metrics[metric]))
        for metric, title in (("heldout_fvu", "held-out FVU"), ("heldout_cosine", "held-out reconstruction cosine"), ("label_auroc_mean", "label AUROC (held-out, no LLM)"))
        if texts_on_hub and isinstance(metrics.get(metric), (int, float))
    ]
    card_data = ModelCardData(
        eval_results=eval_results or None,
        library_name="sbert-sae",
        base_model=base_model,
        datasets=datasets or None,  # what it was trained on, as the Hub reads it: not the activations (linked in the text)
        license=license_name,
        tags=list(dict.fromkeys(["sparse-autoencoder", "sbert-sae", "sentence-transformers", "interpretability", *(tags or [])])),
        pipeline_tag="feature-extraction",
        model_name=repo_id.split("/")[-1],
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(card_template_path()),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        base_model=base_model,
        d_in=config.get("d_in"),
        n_latents=config.get("n_latents"),
        k=config.get("k"),
        # The features that have a label: not the dead ones, nor any of an SAE pushed unlabelled.
        n_labelled=sum(1 for entry in (labels.get("features") or {}).values() if isinstance(entry, dict) and entry.get("label")),
        training_summary=_training_summary(args, config, base_model),
        metrics_table=_metrics_table(metrics, labels),
        features_table=_features_table(labels),
        plots=_plots_section(folder),
        activations_repo=activations_repo,
        activations_texts=_activations_texts(folder, labels, activations_data) if activations_repo else "",
    )
    return card


def _activations_texts(folder: Path, labels: dict, data=None) -> str:
    """Which of the corpus' texts the activations dataset holds, for the card's sentence: a
    domain's SAE's are its own domain's texts only. Those of `data` (a `pipeline.DataArguments`,
    what `publish` pushed); without it, those `push --activations` reads by default, the
    run's own (training_args.json); for an SAE saved without its run record, those its labels
    were made on (feature_labels.json 'domain')."""
    if data is None:
        args = _read_json(folder / "training_args.json")
        if args.get("data"):
            data = training_data_arguments(folder)
    if data is not None:
        return _of_domain(data)
    domain = labels.get("domain")
    if isinstance(domain, dict) and domain.get("value") is not None and domain.get("column"):
        return f" whose `{domain['column']}` is `{domain['value']}`"
    return ""


def _check_pushable(folder: Path) -> None:
    """Refuse, before anything is sent, a folder without an SAE, or whose labels sit beside
    another labelling's scores in metrics.json (a repo must not publish that pair)."""
    from .labels import LABELS_FILE, label_scores_disagree

    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} holds no SAE to push (config.json and model.safetensors are needed)")
    disagreement = label_scores_disagree(_read_json(folder / LABELS_FILE), _read_json(folder / "metrics.json"))
    if disagreement:
        raise ModelLoadError(f"{folder} was not pushed: {disagreement}; run `sbert-sae label {folder}` again to finish it, then push")


def _file_digest(path: Path, algorithm: str) -> str:
    """The hex digest of a file as the Hub names its content: sha256 of an LFS file, or git's
    blob sha1 ("blob <size>\\0" + content) of a regular one."""
    import hashlib

    digest = hashlib.new(algorithm)
    if algorithm == "sha1":
        digest.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _holds_the_same_sae(api, repo_id: str, info, folder: Path, base_model: tuple[str | None, str | None]) -> bool:
    """Whether the repo at `info` (its model_info, with files metadata) holds the SAE of `folder`:
    the same weights and, but for the transformers version that wrote it, the same published config."""
    siblings = {s.rfilename: s for s in info.siblings or []}
    weights, config = siblings.get("model.safetensors"), siblings.get("config.json")
    if weights is None or config is None:
        return False
    lfs = weights.lfs
    if lfs is not None:
        sha256 = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        if sha256 != _file_digest(folder / "model.safetensors", "sha256"):
            return False
    elif weights.blob_id != _file_digest(folder / "model.safetensors", "sha1"):
        return False
    published = _published_file(folder / "config.json", base_model)
    ours = json.loads(published) if isinstance(published, bytes) else read_json(folder / "config.json")
    try:
        theirs = read_json(api.hf_hub_download(repo_id, "config.json", revision=info.sha))
    except ValueError:  # not JSON: not this SAE's
        return False
    return {k: v for k, v in ours.items() if k != "transformers_version"} == {k: v for k, v in theirs.items() if k != "transformers_version"}


def _files_of_a_replaced_sae(api, repo_id: str, revision: str | None, folder: Path, base_model: tuple[str | None, str | None], pushed: set[str]) -> list[str]:
    """The sbert-sae files (`SAE_FILES`, activations.json) at the repo's `revision` that a push of
    `folder` (its files `pushed`) does not replace, when the repo holds another SAE there: a commit
    keeps every file it does not name, so an unlabelled SAE pushed over a labelled one loaded back
    with the old one's labels, families, activations dataset and training record. A push of the
    same SAE (relabelled, or without --activations) leaves them: they still describe it."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return []  # a new repo, or a new branch
    present = {s.rfilename for s in info.siblings or []}
    left = [name for name in (*SAE_FILES, ACTIVATIONS_FILE) if name in present and name not in pushed]
    if not left or _holds_the_same_sae(api, repo_id, info, folder, base_model):
        return []
    return left


def push_sae(
    folder: str | Path,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload sbert-sae SAE",
    activations_repo: str | None = None,
    license_name: str | None = None,
    activations_revision: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    base_model_id: str | None = None,
    activations_data=None,
) -> str:
    """Upload the SAE in `folder` (and its card) to the model repo `repo_id`; returns the commit sha.
    With `activations_repo`, the card links the activations dataset (of the texts of
    `activations_data`, when given) and `activations.json` records it (and its revision)
    for `SparseAutoencoder.load_activations`. With `create_pr`,
    the commit opens a pull request (`refs/pr/N`) instead of moving `revision`. The published
    config.json and card name the base model by its Hub id (`base_model_id`, or see
    `published_base_model`); a base model that is a local folder with no known Hub id is
    refused before any repo is made."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    _check_pushable(folder)
    base_model = published_base_model(_read_json(folder / "config.json"), base_model_id, where=f"{folder} was not pushed")
    card = render_model_card(
        folder, repo_id, activations_repo=activations_repo, license_name=license_name, tags=tags, base_model_id=base_model[0], activations_data=activations_data
    )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory(prefix="sbert-sae-card-") as tmp:
            card_path = Path(tmp) / "README.md"
            card.save(card_path)
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=_published_file(folder / name, base_model)) for name in SAE_FILES if (folder / name).is_file()]
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card_path)))
            if activations_repo:
                link = {"repo_id": activations_repo, "revision": activations_revision, "repo_type": "dataset"}
                operations.append(CommitOperationAdd(path_in_repo=ACTIVATIONS_FILE, path_or_fileobj=json.dumps(link, indent=2).encode()))
            replaced = _files_of_a_replaced_sae(api, repo_id, revision, folder, base_model, {op.path_in_repo for op in operations})
            if replaced:
                logger.info("%s held another SAE: removing its %s", repo_id, ", ".join(replaced))
                operations.extend(CommitOperationDelete(path_in_repo=name) for name in replaced)
            info = api.create_commit(
                repo_id,
                operations=operations,
                commit_message=commit_message,
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
                repo_type="model",
            )
    except HfHubHTTPError as err:
        raise _hub_error(err, f"pushing {folder}", repo_id) from err
    logger.info("pushed %s to %s (%s)", folder, repo_id, info.oid)
    return info.oid


ACTIVATIONS_FILE = "activations.json"


def _of_domain(data) -> str:
    """Which of the dataset's texts `data` (a `pipeline.DataArguments`) holds, for a card's
    sentence: those of its first rows when `--max-rows` cut it, those of one domain (a domain's
    SAE is read on its own domain's texts); "" when every text."""
    first = f" in its first {data.max_rows:,} rows" if data.max_rows is not None else ""
    if data.domain is None or not data.domain_column:
        return first
    return f"{first} whose `{data.domain_column}` is `{data.domain}`"


def activation_rows(sae, data, batch_size: int = 4096, show_progress: bool = False):
    """One dict per embedded text of `data` (a `pipeline.DataArguments`): `id` (its dataset
    row), `text`, `domain` (when `data.domain_column` is set), and the SAE's firing features,
    strongest first, as `indices` and `values`. Rows are made batch by batch from the cached,
    memory-mapped embeddings, so a corpus of any size streams through."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from .data import domain_names
    from .pipeline import load_sae_corpus

    # The corpus is embedded as the SAE's own was (same model, prompt and width); an SAE
    # without a base model reads the texts as `data.model` embeds them.
    data, ds, cache = load_sae_corpus(sae, None, data, show_progress=show_progress, require_base_model=False)
    columns = [data.text_column] + ([data.domain_column] if data.domain_column else [])
    table = ds.select_columns(columns)
    device = next(sae.parameters()).device
    for start in tqdm(range(0, len(cache.row_ids), batch_size), desc="encoding corpus", unit="batch", disable=not show_progress):
        rows = cache.row_ids[start : start + batch_size]
        x = torch.from_numpy(np.array(cache.embeddings[start : start + len(rows)], dtype=np.float32)).to(device)
        with torch.no_grad():
            values, indices = sae.encode_topk(x)
        values, indices = values.float().cpu().numpy(), indices.cpu().numpy()
        order = np.argsort(-values, axis=1, kind="stable")
        values, indices = np.take_along_axis(values, order, axis=1), np.take_along_axis(indices, order, axis=1)
        batch = table.select(rows.tolist())
        texts = batch[data.text_column]
        # Domain names as training grouped them (a ClassLabel's class names, not its integers).
        domains = domain_names(ds, data.domain_column, batch[data.domain_column]) if data.domain_column else None
        for i, row in enumerate(rows):
            firing = values[i] > 0
            out = {"id": int(row), "text": texts[i], "indices": indices[i][firing].astype(np.int32).tolist(), "values": values[i][firing].astype(np.float32).tolist()}
            if domains is not None:
                out["domain"] = domains[i]
            yield out


def _own_error(err: BaseException) -> SbertSaeError | None:
    """The sbert-sae error `err` was raised from (its cause or context, however deep), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, SbertSaeError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def push_activations(
    sae,
    data,
    repo_id: str,
    sae_repo: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    max_shard_size: str = "500MB",
    show_progress: bool = False,
    base_model_id: str | None = None,
) -> str:
    """Push the corpus' sparse activations as a dataset repo (parquet, one row per text,
    written through an on-disk Arrow file and uploaded in shards), with a card that names
    the SAE, its base model (by its Hub id, see `published_base_model`) and the corpus.
    Returns the dataset repo's commit sha."""
    import datasets
    from huggingface_hub import DatasetCard, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    base_model, _ = published_base_model(sae.config.to_dict(), base_model_id, where=f"the activations of {sae_repo or 'the SAE'} were not pushed")

    features = datasets.Features(
        {
            "id": datasets.Value("int64"),
            "text": datasets.Value("string"),
            **({"domain": datasets.Value("string")} if data.domain_column else {}),
            "indices": datasets.Sequence(datasets.Value("int32")),
            "values": datasets.Sequence(datasets.Value("float32")),
        }
    )
    with tempfile.TemporaryDirectory(prefix="sbert-sae-activations-") as tmp:
        # from_generator writes to an Arrow file on disk: the rows are never all in memory.
        try:
            ds = datasets.Dataset.from_generator(
                activation_rows, gen_kwargs={"sae": sae, "data": data, "show_progress": show_progress}, features=features, cache_dir=tmp
            )
        except Exception as err:
            # datasets wraps what the rows raised in "DatasetGenerationError: An error occurred
            # while generating the dataset": the corpus' own error names the column or file.
            cause = _own_error(err)
            if cause is None:
                raise
            raise cause from err
        try:
            with _dropped_messages("datasets.arrow_dataset", "Setting num_proc from"):  # said on every one-shard push
                ds.push_to_hub(repo_id, private=private, token=token, max_shard_size=max_shard_size, commit_message="Upload sbert-sae activations")
            dataset_name = _public_dataset_name(data.dataset)
            card = DatasetCard.load(repo_id, repo_type="dataset", token=token)
            card.text = (
                f"\n# Sparse activations of {sae_repo or 'an sbert-sae SAE'}\n\n"
                f"One row per text of {dataset_name} ({_source_of_texts(data.text_column, data.json_field)}){_of_domain(data)}, encoded by the sparse autoencoder"
                + (f" [`{sae_repo}`](https://huggingface.co/{sae_repo})" if sae_repo else "")
                + f" (n_latents={sae.config.n_latents}, k={sae.config.k}) on the `{base_model}` embeddings: "
                "`indices` are the features that fire on the text, strongest first, and `values` their activations; "
                "`id` is the text's row in the corpus.\n\n"
                "```python\nfrom datasets import load_dataset\n\n"
                f'acts = load_dataset("{repo_id}", split="train")\n```\n'
            )
            # Uploaded as a file, as the SAE's own card is: huggingface_hub < 2.2 has
            # `RepoCard.push_to_hub` validate the card at https://huggingface.co whatever HF_ENDPOINT says,
            # so a push to another endpoint (a private Hub, the test Hub) failed on a connection error.
            api = HfApi(token=token)
            api.upload_file(
                path_or_fileobj=str(card).encode(), path_in_repo="README.md", repo_id=repo_id, repo_type="dataset", commit_message="Describe the activations"
            )
            sha = api.dataset_info(repo_id).sha
        except HfHubHTTPError as err:
            raise _hub_error(err, "pushing the activations", repo_id) from err
    return sha


def training_data_arguments(folder: str | Path):
    """The `DataArguments` of the texts the run in `folder` was trained on (from
    `training_args.json`): a domain's SAE's are its own domain's texts (see `DataArguments.of_run`)."""
    from .pipeline import DataArguments

    args = _read_json(Path(folder) / "training_args.json")
    if not args.get("data"):
        raise ModelLoadError(f"{folder} has no training_args.json naming its dataset: pass the dataset to use")
    return DataArguments.of_training_args(args)


def publish(
    folder: str | Path,
    repo_id: str,
    activations: bool = False,
    activations_repo: str | None = None,
    data=None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload sbert-sae SAE",
    license_name: str | None = None,
    show_progress: bool = False,
    base_model_id: str | None = None,
    base_model_option: str = "--base-model-id",
) -> dict:
    """Push a trained run: optionally its corpus' activations first (dataset repo
    `activations_repo`, default `<repo_id>-activations`), then the SAE and its card, both
    naming the base model by its Hub id (`base_model_id`, see `published_base_model`;
    `base_model_option` is how a refusal names the setting)."""
    result = {"repo_id": repo_id}
    # Before the activations go up: a refused SAE must leave no dataset repo behind either.
    _check_pushable(Path(folder))
    base_model_id, _ = published_base_model(_read_json(Path(folder) / "config.json"), base_model_id, where=f"{folder} was not pushed", option=base_model_option)
    if activations:
        from .modeling_sbert_sae import SparseAutoencoder

        sae = SparseAutoencoder.from_pretrained(folder)
        data = data or training_data_arguments(folder)
        activations_repo = activations_repo or f"{repo_id}-activations"
        result["activations_repo"] = activations_repo
        result["activations_sha"] = push_activations(
            sae, data, activations_repo, sae_repo=repo_id, private=private, token=token, show_progress=show_progress, base_model_id=base_model_id
        )
    result["sha"] = push_sae(
        folder,
        repo_id,
        private=private,
        token=token,
        revision=revision,
        commit_message=commit_message,
        activations_repo=result.get("activations_repo"),
        activations_revision=result.get("activations_sha"),
        activations_data=data if activations else None,
        license_name=license_name,
        base_model_id=base_model_id,
    )
    return result


def _stale_module_files(api, repo_id: str, revision: str | None, pushed: set[str]) -> list[str]:
    """The files at the repo's `revision` under the module folders its modules.json names
    (sentence-transformers' `1_Pooling/`, `3_SparseAutoEncoder/` ...), that a push of the files
    `pushed` does not carry: a commit keeps every file it does not name, so a SparseEncoder of
    another layout (a truncate_dim's `Dense` more or less) pushed over one left the old layout's
    folders, weights and all, beside the new. A module folder belongs to the module saved in it,
    so all of it goes; files outside those folders (the root module's, the card, a user's own
    files) are left, as modules.json cannot tell the previous push's from anyone else's.
    A repo without a readable modules.json is no SparseEncoder's: nothing is taken from it."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = api.model_info(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return []  # a new repo, or a new branch
    present = {s.rfilename for s in info.siblings or []}
    if "modules.json" not in present:
        return []
    try:
        modules = read_json(api.hf_hub_download(repo_id, "modules.json", revision=info.sha))
    except (ValueError, EntryNotFoundError):
        return []
    if not isinstance(modules, list):
        return []
    folders = set()
    for module in modules:
        path = module.get("path") if isinstance(module, dict) else None
        if isinstance(path, str) and path.strip("/") and ".." not in path.split("/"):
            folders.add(path.strip("/") + "/")  # "" is the root module: its files share the root with others
    return sorted(name for name in present if name not in pushed and name.startswith(tuple(folders))) if folders else []


def push_sparse_encoder(
    folder: str | Path,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload SparseEncoder made with sbert-sae",
    base_model_id: str | None = None,
) -> str:
    """Publish the SAE in `folder` as a sentence-transformers `SparseEncoder` (base model +
    the SAE's encoder) to its own model repo, loadable with `SparseEncoder(repo_id)` and no
    sbert-sae; its card names the base model's Hub id (`base_model_id`, see
    `published_base_model`) when there is one. Returns the commit sha."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .modeling_sbert_sae import SparseAutoencoder

    sae = SparseAutoencoder.from_pretrained(folder)
    encoder = sae.to_sparse_encoder(device="cpu")
    # sentence-transformers' card reads these: without them its usage snippet loads
    # SparseEncoder("sparse_encoder_model_id") and the base model is "Unknown".
    encoder.model_card_data.model_id = repo_id
    try:
        base_model, base_model_revision = published_base_model(sae.config.to_dict(), base_model_id, where=f"{folder} was not pushed")
    except ConfigError:
        if base_model_id is not None:
            raise
        # The SparseEncoder holds the base model's weights: it loads without the folder, and
        # its card names no base model rather than a path of this machine.
        base_model = base_model_revision = None
    if base_model:
        encoder.model_card_data.base_model = base_model
        encoder.model_card_data.base_model_revision = base_model_revision
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory(prefix="sbert-sae-st-") as tmp:
            encoder.save_pretrained(tmp)
            files = sorted(p.relative_to(tmp).as_posix() for p in Path(tmp).rglob("*") if p.is_file())
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(tmp) / name)) for name in files]
            stale = _stale_module_files(api, repo_id, revision, set(files))
            if stale:
                logger.info("%s held module files this SparseEncoder does not have: removing %s", repo_id, ", ".join(stale))
                operations.extend(CommitOperationDelete(path_in_repo=name) for name in stale)
            info = api.create_commit(repo_id, operations=operations, revision=revision, commit_message=commit_message)
    except HfHubHTTPError as err:
        raise _hub_error(err, f"pushing {folder} as a SparseEncoder", repo_id) from err
    return info.oid
