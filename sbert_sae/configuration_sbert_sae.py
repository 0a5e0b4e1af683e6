"""Configuration of a top-k sparse autoencoder over sentence embeddings."""

from __future__ import annotations

from transformers import PretrainedConfig

from .errors import ConfigError

NORMALIZE_CHOICES = ("l2", "none")

# transformers 5.5 turned PretrainedConfig into a dataclass: the annotated class attributes below are
# its fields, and `__post_init__` runs after they are set. transformers 4.x and 5.0-5.4 have a plain
# `__init__(**kwargs)` and no `__post_init__`: there the fields are set by the `__init__` below.
_DATACLASS_CONFIG = hasattr(PretrainedConfig, "__post_init__")
_FIELDS = (
    "d_in",
    "n_latents",
    "k",
    "k_aux",
    "auxk_coef",
    "dead_threshold",
    "normalize",
    "encoder_init_scale",
    "base_model",
    "base_model_revision",
    "base_model_kwargs",
)


class SparseAutoencoderConfig(PretrainedConfig):
    r"""Hyper-parameters of a top-k SAE (Gao et al. 2024, as used by O'Neill et al. 2024).

    Args:
        d_in: dimension of the embeddings the SAE reads (384 for all-MiniLM-L6-v2).
        n_latents: number of learned features (dictionary size).
        k: active features per input (the top-k activation).
        k_aux: dead features used by the auxiliary loss; `None` means `2 * k`.
        auxk_coef: weight of the AuxK loss that revives dead features.
        dead_threshold: a feature that has not fired for this many training samples is
            dead and enters the AuxK loss; `None` lets the trainer use one epoch.
        normalize: `"l2"` rescales every input to unit length before encoding (the
            geometry of cosine search); `"none"` reads embeddings as they are.
        encoder_init_scale: norm of the encoder's rows at initialisation (the decoder's rows
            start at unit norm, the encoder as their transpose times this). Small encoder
            weights let Adam's first steps reshape them quickly: 0.1 against 1 lowered the
            held-out FVU from 0.254 to 0.203 (60k texts, n=12288, k=64, lr 3e-3 cosine,
            decoder at the same rate) and from 0.356 to 0.334 on the README's run; see
            `benchmarks/README.md`.
        base_model: Hub id or path of the sentence-transformers model whose embeddings
            the SAE reads, so that `encode_texts` can embed new texts the same way.
        base_model_revision: revision of `base_model`, when one was pinned.
        base_model_kwargs: extra keyword arguments the embeddings were made with
            (`prompt_name`, `truncate_dim`, ...); stored so texts are embedded alike.
    """

    model_type = "sbert_sae"

    d_in: int = 384
    n_latents: int = 6144
    k: int = 32
    k_aux: int | None = None
    auxk_coef: float = 1 / 32
    dead_threshold: int | None = None
    normalize: str = "l2"
    encoder_init_scale: float = 0.1
    base_model: str | None = None
    base_model_revision: str | None = None
    base_model_kwargs: dict | None = None

    if _DATACLASS_CONFIG:

        def __post_init__(self, **kwargs):
            super().__post_init__(**kwargs)
            self._finish_init()

    else:  # transformers 4.x, 5.0-5.4

        def __init__(self, **kwargs):
            values = {name: kwargs.pop(name, getattr(type(self), name)) for name in _FIELDS}
            super().__init__(**kwargs)
            for name, value in values.items():
                setattr(self, name, value)
            self._finish_init()

    def _finish_init(self) -> None:
        if self.k_aux is None:
            self.k_aux = 2 * self.k if isinstance(self.k, int) else None
        self.validate_sae()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # `from_pretrained(path, k=64)` (and AutoConfig's) set such overrides with setattr after
        # __post_init__ has validated the stored values: check again, or k=0 or k > n_latents
        # passes here and fails later (or silently gives empty codes).
        result = super().from_dict(config_dict, **kwargs)
        (result[0] if isinstance(result, tuple) else result).validate_sae()
        return result

    def validate_sae(self) -> None:
        """Raise `ConfigError` naming the first impossible value."""

        def positive_int(name: str, value) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

        positive_int("d_in", self.d_in)
        positive_int("n_latents", self.n_latents)
        positive_int("k", self.k)
        positive_int("k_aux", self.k_aux)
        if self.k > self.n_latents:
            raise ConfigError(f"k={self.k} is larger than n_latents={self.n_latents}: k must be in 1..n_latents")
        if isinstance(self.auxk_coef, bool) or not isinstance(self.auxk_coef, (int, float)) or not (
            0 <= float(self.auxk_coef) < float("inf")
        ):
            raise ConfigError(f"auxk_coef must be a finite number >= 0, got {self.auxk_coef!r}")
        if self.dead_threshold is not None:
            positive_int("dead_threshold", self.dead_threshold)
        if isinstance(self.encoder_init_scale, bool) or not isinstance(self.encoder_init_scale, (int, float)) or not (
            0 < float(self.encoder_init_scale) < float("inf")
        ):
            raise ConfigError(f"encoder_init_scale must be a finite number > 0, got {self.encoder_init_scale!r}")
        if self.normalize not in NORMALIZE_CHOICES:
            raise ConfigError(f"normalize must be one of {NORMALIZE_CHOICES}, got {self.normalize!r}")
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise ConfigError(f"base_model must be a string (Hub id or path), got {self.base_model!r}")
        if self.base_model_revision is not None and not isinstance(self.base_model_revision, str):
            raise ConfigError(f"base_model_revision must be a string, got {self.base_model_revision!r}")
        if self.base_model_kwargs is not None and not (
            isinstance(self.base_model_kwargs, dict) and all(isinstance(key, str) for key in self.base_model_kwargs)
        ):
            raise ConfigError(f"base_model_kwargs must be an object of encode settings, got {self.base_model_kwargs!r}")
