"""Publish an SAE to the Hugging Face Hub: its weights, config, labels, metrics and plots,
with a model card rendered from the package's `MODEL_CARD.md` template.

The same code talks to the real Hub and to any Hub-compatible server (`HF_ENDPOINT`).
Tokens are never printed or logged: they go to `huggingface_hub` as they are.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from .errors import ModelLoadError, SbertSaeError
from .configuration_sbert_sae import SparseAutoencoderConfig
from .evaluation import METRIC_DESCRIPTIONS

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
)
TEMPLATE_NAME = "MODEL_CARD.md"
CARD_METRICS = ("heldout_fvu", "heldout_cosine", "heldout_l0", "dead_fraction", "dense_fraction", "neighbour_overlap_at_10", "label_auroc_mean", "label_auroc_median", "label_auroc_share_above_0.8")


class HubError(SbertSaeError, OSError):
    """A push to or a read from the Hub failed (the message says which repo and why)."""


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
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ModelLoadError(f"{path} is not valid JSON: {err}") from err


def _metrics_table(metrics: dict) -> str:
    rows = ["| metric | value | meaning |", "| --- | --- | --- |"]
    for name in CARD_METRICS:
        value = metrics.get(name)
        if value is None:
            continue
        meaning = METRIC_DESCRIPTIONS.get(name, {"label_auroc_mean": "mean AUROC of the labels predicting where their feature fires, on held-out texts", "label_auroc_median": "median of the same", "label_auroc_share_above_0.8": "share of labelled features with AUROC >= 0.8"}.get(name, ""))
        meaning = meaning.replace("|", "\\|")
        rows.append(f"| `{name}` | {value:.4g} | {meaning} |" if isinstance(value, (int, float)) else f"| `{name}` | {value} | {meaning} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def _features_table(labels: dict, top: int = 20) -> str:
    features = labels.get("features", {})
    scored = [(int(f), e) for f, e in features.items() if e.get("status") == "labelled" and (e.get("score") or {}).get("auroc") is not None]
    scored.sort(key=lambda item: -item[1]["score"]["auroc"])
    if not scored:
        return ""
    rows = ["| feature | label | held-out AUROC | density |", "| --- | --- | --- | --- |"]
    for f, e in scored[:top]:
        label = str(e["label"]).replace("|", "\\|")
        rows.append(f"| {f} | {label} | {e['score']['auroc']:.3f} | {e.get('density', 0):.4f} |")
    return "\n".join(rows)


def _is_local(dataset: str) -> bool:
    return dataset.startswith((".", "/", "~")) or Path(dataset).exists() or dataset.count("/") != 1


def _training_summary(args: dict, config: dict) -> str:
    if not args:
        return ""
    data, training = args.get("data", {}), args.get("training", {})
    dataset = data.get("dataset")
    if isinstance(dataset, str) and _is_local(dataset):
        dataset = f"a local dataset, {Path(dataset).name}"  # no local paths in a published card
    parts = [
        f"- data: `{dataset}` (column `{data.get('text_column')}`"
        + (f", domain `{args['domain']}`" if args.get("domain") else "")
        + f"), {data.get('heldout_fraction', 0):.0%} of texts held out",
        f"- SAE: n_latents={config.get('n_latents')}, k={config.get('k')}, k_aux={config.get('k_aux')}, AuxK coefficient {config.get('auxk_coef')}, inputs {config.get('normalize')}-normalised",
    ]
    if training:
        parts.append(
            f"- optimisation: {training.get('epochs')} epochs, batch {training.get('batch_size')}, Adam lr {training.get('lr')} "
            f"({training.get('lr_schedule')}, {training.get('warmup_fraction', 0):.0%} warm-up), grad clip {training.get('grad_clip')}, seed {training.get('seed')}"
        )
    return "\n".join(parts)


def render_model_card(folder: str | Path, repo_id: str, activations_repo: str | None = None, license_name: str | None = None, datasets: list[str] | None = None):
    """The `huggingface_hub.ModelCard` of the SAE in `folder`, rendered from `MODEL_CARD.md`."""
    from huggingface_hub import ModelCard, ModelCardData

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
    if activations_repo:
        datasets = [*datasets, activations_repo]
    base_model = config.get("base_model")
    card_data = ModelCardData(
        library_name="sbert-sae",
        base_model=base_model,
        datasets=datasets or None,
        license=license_name,
        tags=["sparse-autoencoder", "sbert-sae", "sentence-transformers", "interpretability"],
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
        training_summary=_training_summary(args, config),
        metrics_table=_metrics_table(metrics),
        features_table=_features_table(labels),
        activations_repo=activations_repo,
    )
    return card


def push_sae(
    folder: str | Path,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload sbert-sae SAE",
    activations_repo: str | None = None,
    license_name: str | None = None,
) -> str:
    """Upload the SAE in `folder` (and its card) to the model repo `repo_id`; returns the commit sha."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} holds no SAE to push (config.json and model.safetensors are needed)")
    card = render_model_card(folder, repo_id, activations_repo=activations_repo, license_name=license_name)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory(prefix="sbert-sae-card-") as tmp:
            card_path = Path(tmp) / "README.md"
            card.save(card_path)
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in SAE_FILES if (folder / name).is_file()]
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card_path)))
            info = api.create_commit(repo_id, operations=operations, commit_message=commit_message, revision=revision, repo_type="model")
    except HfHubHTTPError as err:
        raise HubError(f"pushing {folder} to {repo_id} failed: {err}") from err
    logger.info("pushed %s to %s (%s)", folder, repo_id, info.oid)
    return info.oid
