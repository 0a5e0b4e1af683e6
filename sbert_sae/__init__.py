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

AutoConfig.register(SparseAutoencoderConfig.model_type, SparseAutoencoderConfig, exist_ok=True)
AutoModel.register(SparseAutoencoderConfig, SparseAutoencoder, exist_ok=True)

__all__ = [
    "ConfigError",
    "DatasetError",
    "EncodeSettings",
    "Family",
    "FamilyArguments",
    "HubError",
    "InputError",
    "ModelLoadError",
    "OutputDirError",
    "ResumeError",
    "SbertSaeError",
    "SettingsChangedError",
    "SearchResult",
    "SparseAutoencoder",
    "SparseAutoencoderConfig",
    "SparseAutoencoderOutput",
    "SteerableIndex",
    "TextEncoder",
    "__version__",
]
