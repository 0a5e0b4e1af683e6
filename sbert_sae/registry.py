"""Released SAEs: the recipes that make them (`hub/recipes/*.yaml`) and the registry that
maps short names to Hub repos (`pretrained_saes.yaml` in the package), so that
`SparseAutoencoder.from_pretrained("minilm-wiki-6k")` finds the repo.

A recipe names everything a release needs:

```yaml
name: minilm-wiki-6k            # the short name the registry gives it
repo_id: org/minilm-wiki-6k     # where it is published
base_model: sentence-transformers/all-MiniLM-L6-v2
dataset: {path: data/wiki, text_column: text, domain_column: topic, domain: null}
sae: {n_latents: 6144, k: 32}
training: {epochs: 20, batch_size: 256, lr: 0.003, heldout_fraction: 0.05, seed: 0}
labels: {}                      # LabelArguments settings, defaults if empty
activations: true               # also publish the corpus' activations
```
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import yaml

from .errors import ConfigError, SettingsChangedError

logger = logging.getLogger(__name__)

REGISTRY_ENV = "SBERT_SAE_REGISTRY"
"""A registry file to use instead of the package's own (tests, private mirrors)."""


def registry_path() -> Path:
    override = os.environ.get(REGISTRY_ENV)
    return Path(override) if override else Path(__file__).with_name("pretrained_saes.yaml")


def load_registry(path: str | Path | None = None) -> dict[str, dict]:
    """Short name -> entry (`repo_id`, `base_model`, `dataset`, `n_latents`, `k`, `metrics`)."""
    path = Path(path) if path else registry_path()
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"the SAE registry {path} is not valid YAML: {err}") from err
    entries = data.get("saes") or {}
    if not isinstance(entries, dict) or any(not isinstance(e, dict) or "repo_id" not in e for e in entries.values()):
        raise ConfigError(f"the SAE registry {path} is malformed: 'saes' must map short names to entries with a repo_id")
    return entries


def resolve(name: str) -> tuple[str, str | None]:
    """The Hub repo id and released revision of a short name in the registry; other names
    (repo ids, folders) come back as they are, with no revision."""
    if "/" in name or os.path.exists(name):
        return name, None
    entry = load_registry().get(name)
    return (entry["repo_id"], entry.get("revision")) if entry else (name, None)


def format_registry(entries: dict[str, dict]) -> str:
    if not entries:
        return f"no released SAEs in the registry yet ({registry_path()})"
    lines = [f"{'name':<24} {'repo':<40} {'base model':<40} {'n':>6} {'k':>4} {'held-out FVU':>12} {'label AUROC':>11}"]
    for name, e in sorted(entries.items()):
        m = e.get("metrics") or {}
        fvu, auroc = m.get("heldout_fvu"), m.get("label_auroc_mean")
        lines.append(
            f"{name:<24} {e['repo_id']:<40} {str(e.get('base_model', '')):<40} {e.get('n_latents', ''):>6} {e.get('k', ''):>4} "
            f"{'' if fvu is None else f'{fvu:.4f}':>12} {'' if auroc is None else f'{auroc:.4f}':>11}"
        )
    return "\n".join(lines)


def _leading_comments(path: Path) -> list[str]:
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def register(name: str, entry: dict, path: str | Path | None = None) -> None:
    """Add or replace a registry entry (written atomically)."""
    from .utils import atomic_write

    path = Path(path) if path else registry_path()
    data = {"saes": {**load_registry(path), name: entry}}
    # The file's leading comments are kept: the packaged registry says there how entries get in.
    header = _leading_comments(path) or ["# Released sbert-sae SAEs: short name -> Hub repo and headline metrics (sbert-sae list)."]
    text = "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@dataclasses.dataclass
class Recipe:
    name: str
    repo_id: str
    base_model: str
    base_model_id: str | None
    dataset: dict
    sae: dict
    training: dict
    labels: dict
    activations: bool
    source: Path


RECIPE_KEYS = ("name", "repo_id", "base_model", "base_model_id", "dataset", "sae", "training", "labels", "activations")
RECIPE_DATASET_KEYS = ("path", "hub_id", "text_column", "config_name", "split", "revision", "json_field", "domain_column", "domain")


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read the recipe {path}: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"the recipe {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"the recipe {path} must be a mapping")
    unknown = sorted(set(raw) - set(RECIPE_KEYS), key=str)
    if unknown:
        raise ConfigError(f"the recipe {path}: unknown key(s) {', '.join(map(str, unknown))} (a recipe has {', '.join(RECIPE_KEYS)})")
    for key in ("name", "repo_id", "base_model", "dataset", "sae"):
        if not raw.get(key):
            raise ConfigError(f"the recipe {path} has no {key!r}")
    dataset = raw["dataset"]
    if not isinstance(dataset, dict) or not (dataset.get("path") or dataset.get("hub_id")):
        raise ConfigError(f"the recipe {path}: dataset needs a 'path' (folder or files) or a 'hub_id'")
    unknown = sorted(set(dataset) - set(RECIPE_DATASET_KEYS), key=str)
    if unknown:
        raise ConfigError(f"the recipe {path}: unknown dataset setting(s) {', '.join(map(str, unknown))} (dataset takes {', '.join(RECIPE_DATASET_KEYS)})")
    for key in ("sae", "training", "labels"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ConfigError(f"the recipe {path}: {key!r} must be a mapping of settings, got {raw[key]!r}")
    if not isinstance(raw.get("activations", True), bool):
        raise ConfigError(f"the recipe {path}: 'activations' must be true or false, got {raw['activations']!r}")
    return Recipe(
        name=str(raw["name"]),
        repo_id=str(raw["repo_id"]),
        base_model=str(raw["base_model"]),
        base_model_id=None if raw.get("base_model_id") is None else str(raw["base_model_id"]),
        dataset=dataset,
        sae=dict(raw["sae"]),
        training=dict(raw.get("training") or {}),
        labels=dict(raw.get("labels") or {}),
        activations=bool(raw.get("activations", True)),
        source=path,
    )


def _only_known(cls, values: dict, where: str) -> dict:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    return values


def _label_scores_disagree(run_dir: Path) -> str | None:
    from .labels import LABELS_FILE, label_scores_disagree
    from .utils import read_json

    metrics = run_dir / "metrics.json"
    return label_scores_disagree(read_json(run_dir / LABELS_FILE), read_json(metrics) if metrics.exists() else None)


def release(recipe_path: str | Path, out_dir: str | Path, push: bool = True, overwrite: bool = False, show_progress: bool = True, registry: str | Path | None = None, resume: bool = False) -> dict:
    """Train, label and (with `push`) publish the SAE a recipe describes, then register it.
    `resume`: continue the interrupted training in `out_dir` from its last checkpoint (labelling
    resumes from its last saved block by itself); a run already trained with the recipe's
    settings (and labelled) is not trained (or labelled) again: a release whose push failed
    goes on from there."""
    from .configuration_sbert_sae import SparseAutoencoderConfig
    from .hub import publish
    from .labels import LabelArguments
    from .pipeline import DataArguments, SaeArguments, run_labelling, run_training
    from .trainer import TrainingArguments

    recipe = load_recipe(recipe_path)
    ds = recipe.dataset
    data = DataArguments(
        dataset=ds.get("hub_id") or ds["path"],
        text_column=ds.get("text_column", "text"),
        config_name=ds.get("config_name"),
        split=ds.get("split", "train"),
        revision=ds.get("revision"),
        json_field=ds.get("json_field"),
        domain_column=ds.get("domain_column"),
        domain=ds.get("domain"),
        model=recipe.base_model,
        heldout_fraction=recipe.training.get("heldout_fraction", 0.05),
    )
    sae_args = SaeArguments(**_only_known(SaeArguments, recipe.sae, f"{recipe.source} sae"))
    training = {k: v for k, v in recipe.training.items() if k != "heldout_fraction"}
    train_args = TrainingArguments(**{**_only_known(TrainingArguments, training, f"{recipe.source} training"), "show_progress": show_progress})
    label_args = LabelArguments(**_only_known(LabelArguments, recipe.labels, f"{recipe.source} labels"))
    # Every setting is checked before the training: a bad label setting stopped the release
    # only once the SAE was trained, and an error named the setting but not the recipe.
    for section, check in (
        ("sae", lambda: SparseAutoencoderConfig(**dataclasses.asdict(sae_args), d_in=1)),
        ("training", train_args.validate),
        ("labels", label_args.validate),
    ):
        try:
            check()
        except ConfigError as err:
            raise ConfigError(f"the recipe {recipe.source}: {section}: {err}") from err
    base_model_id = recipe.base_model_id
    if push:
        from .hub import published_base_model

        # Before the training: a base model the push would refuse (a local folder with no Hub id) must not cost a run first.
        base_model_id, _ = published_base_model(
            {"base_model": recipe.base_model}, recipe.base_model_id, where=f"the recipe {recipe.source}: refused before training", option="base_model_id:"
        )
    out_dir = Path(out_dir)
    try:
        results = run_training(data, sae_args, train_args, out_dir, overwrite=overwrite, resume=resume, keep_finished=True)
    except SettingsChangedError as err:
        # Named as the recipe names them ("sae: k: 4 -> 8"), not as the run records them ("config.k").
        names = {f"config.{f.name}": f"sae: {f.name}" for f in dataclasses.fields(SaeArguments)}
        names.update({f"training_args.{f.name}": f"training: {f.name}" for f in dataclasses.fields(TrainingArguments)})
        names.update({"config.base_model": "base_model", "data": "the training texts (of the dataset, heldout_fraction and seed)"})
        # A setting the recipe leaves out that follows another (k_aux is 2k) is not one to write in.
        for field, derived in (("k_aux", "2k"), ("dead_threshold", "one epoch")):
            if getattr(sae_args, field) is None:
                names[f"config.{field}"] += f" (not given: {derived})"
        raise err.naming(names, prefix=f"the recipe {recipe.source}: ") from err
    run_dir = results[0].out_dir
    if resume and (run_dir / "feature_labels.json").exists() and not _label_scores_disagree(run_dir):
        # A run that replaces an SAE removes its labels: these are this SAE's. A labelling
        # stopped before it copied their scores into metrics.json is run again (it resumes).
        logger.warning("%s is labelled already: not labelled again", run_dir)
        summary = None
    else:
        summary = run_labelling(run_dir, data, label_args, show_progress=show_progress)
    from .utils import read_json

    metrics = read_json(run_dir / "metrics.json")
    outcome = {"name": recipe.name, "out_dir": str(run_dir), "metrics": metrics, "label_summary": summary}
    if push:
        outcome.update(
            publish(
                run_dir,
                recipe.repo_id,
                activations=recipe.activations,
                data=data if recipe.activations else None,
                show_progress=show_progress,
                base_model_id=base_model_id,
                base_model_option="base_model_id:",
            )
        )
        register(
            recipe.name,
            {
                "repo_id": recipe.repo_id,
                "base_model": base_model_id,
                "dataset": str(ds.get("hub_id") or Path(ds["path"]).name),
                "domain": ds.get("domain"),
                "n_latents": sae_args.n_latents,
                "k": sae_args.k,
                "revision": outcome["sha"],
                "activations_repo": outcome.get("activations_repo"),
                "metrics": {k: metrics.get(k) for k in ("heldout_fvu", "heldout_cosine", "dead_fraction", "label_auroc_mean") if metrics.get(k) is not None},
            },
            registry,
        )
    return outcome
