"""sbert-sae: sparse autoencoders on Sentence-BERT embeddings, with features named without an LLM."""

__version__ = "0.1.0"

from transformers import AutoConfig, AutoModel

from .configuration_sbert_sae import SparseAutoencoderConfig
from .errors import (
    ConfigError,
    DatasetError,
    HubError,
    InputError,
    ModelLoadError,
    OutputDirError,
    ResumeError,
    SbertSaeError,
    SettingsChangedError,
)
from .families import Family, FamilyArguments
from .modeling_sbert_sae import SparseAutoencoder, SparseAutoencoderOutput
from .search import SearchResult, SteerableIndex
from .text_encoder import EncodeSettings, TextEncoder

# The workflow's functions and their arguments, as `sbert-sae train`, `label`, `families`,
# `sweep`, `compare` and `push` run them: importable from the package, but loaded on first
# use, since they bring in datasets, accelerate and KeyBERT, which loading an SAE needs not.
_WORKFLOW = {
    "DataArguments": "pipeline",
    "SaeArguments": "pipeline",
    "RunResult": "pipeline",
    "run_training": "pipeline",
    "run_labelling": "pipeline",
    "TrainingArguments": "trainer",
    "LabelArguments": "labels",
    "run_families": "families",
    "run_sweep": "sweep",
    "compare_saes": "compare",
    "publish": "hub",
}


def __getattr__(name: str):
    if name in _WORKFLOW:
        import importlib

        value = getattr(importlib.import_module(f".{_WORKFLOW[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_WORKFLOW})


AutoConfig.register(SparseAutoencoderConfig.model_type, SparseAutoencoderConfig, exist_ok=True)
AutoModel.register(SparseAutoencoderConfig, SparseAutoencoder, exist_ok=True)

__all__ = [
    "ConfigError",
    "DataArguments",
    "DatasetError",
    "EncodeSettings",
    "Family",
    "FamilyArguments",
    "HubError",
    "InputError",
    "LabelArguments",
    "ModelLoadError",
    "OutputDirError",
    "ResumeError",
    "RunResult",
    "SaeArguments",
    "SbertSaeError",
    "SettingsChangedError",
    "SearchResult",
    "SparseAutoencoder",
    "SparseAutoencoderConfig",
    "SparseAutoencoderOutput",
    "SteerableIndex",
    "TextEncoder",
    "TrainingArguments",
    "__version__",
    "compare_saes",
    "publish",
    "run_families",
    "run_labelling",
    "run_sweep",
    "run_training",
]
