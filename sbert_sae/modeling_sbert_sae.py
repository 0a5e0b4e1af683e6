"""A top-k sparse autoencoder over sentence embeddings, as a `transformers.PreTrainedModel`.

The recipe is Gao et al. (2024) as used by O'Neill et al. (2024) on text embeddings:

    z     = ReLU(TopK_k(W_enc (x - b_pre) + b_enc))
    x_hat = W_dec^T z + b_pre

with `W_enc` initialised to `W_dec`, decoder rows kept at unit norm (the gradient part
parallel to each row is removed before every step and rows renormalised after it),
`b_pre` set to the coordinate-wise median of the data, and the loss

    FVU(x_hat, x) + auxk_coef * FVU(e_hat, e),   e = x - x_hat (detached),

where `e_hat` is decoded (without bias) from the top-`k_aux` pre-activations of the dead
latents only, rectified with a straight-through gradient (so that features whose
pre-activations are negative on every input still get a gradient towards the residual).
Sparse codes travel as (values, indices) pairs of shape (batch, k).
"""

from __future__ import annotations

import json
import logging
import operator
import os
import re
import threading
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_sbert_sae import SparseAutoencoderConfig
from .errors import ConfigError, InputError, ModelLoadError

logger = logging.getLogger(__name__)

_BASE_MODEL_LOADING = threading.Lock()


def _unfinished_run_hint(name, hub_kwargs: dict) -> str:
    """What to add to "no config.json" where `name` is a local run folder whose training was
    stopped before its results were written (its checkpoints, or the results being moved in)."""
    folder = os.path.join(str(name), hub_kwargs.get("subfolder") or "")
    if not os.path.isdir(folder):
        return ""
    left = [part for part in ("checkpoints", ".finishing") if os.path.isdir(os.path.join(folder, part))]
    if not left:
        return ""
    return f"; it holds a training run that was stopped before it finished ({', '.join(left)}): `sbert-sae train ... --resume` with the same --out finishes it"


def _names_a_folder(name: str) -> bool:
    """Whether `name` can only be a path: a Hub repo id is `name` or `org/name`, never absolute,
    never starting with '.' or '~', never with two slashes."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.replace(os.sep, "/").count("/") > 1


@dataclass
class SparseAutoencoderOutput(ModelOutput):
    """What `SparseAutoencoder.forward` returns.

    Attributes:
        loss: `fvu + auxk_coef * auxk_loss` (scalar).
        reconstruction: (batch, d_in) reconstruction, in the SAE's (normalised) input space.
        latent_values: (batch, k) non-negative activations of the active features.
        latent_indices: (batch, k) ids of the active features.
        fvu: fraction of variance unexplained of the batch (scalar).
        auxk_loss: the AuxK loss on dead features (scalar; 0 when none is dead).
    """

    loss: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    latent_values: torch.Tensor | None = None
    latent_indices: torch.Tensor | None = None
    fvu: torch.Tensor | None = None
    auxk_loss: torch.Tensor | None = None


def fraction_of_variance_unexplained(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`sum ||x - x_hat||^2 / sum ||x - mean(x)||^2` over a (batch, d) pair.

    This is the paper's normalised MSE. A batch of one row has no variance, so its
    error is normalised by its squared norm instead.
    """
    x = x.float()
    x_hat = x_hat.float()
    residual = (x - x_hat).pow(2).sum()
    if x.shape[0] > 1:
        total = (x - x.mean(dim=0, keepdim=True)).pow(2).sum()
    else:
        total = x.pow(2).sum()
    return residual / total.clamp_min(torch.finfo(torch.float32).tiny)


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _from_numpy(array):
    """A numpy array as a tensor (what `SentenceTransformer.encode` returns by default); anything
    else as it is, for the callers' own type checks."""
    import numpy as np

    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiub":
        return array
    # torch.from_numpy warns on read-only arrays (a memory-mapped embedding cache): copy those.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _optional_file(name_or_path: str, filename: str, hub_kwargs: dict) -> str | None:
    """The local path of a file beside the weights (folder, or downloaded from the Hub repo), or
    None when it is not there."""
    folder = os.path.join(name_or_path, hub_kwargs.get("subfolder") or "")
    if os.path.isdir(folder):
        path = os.path.join(folder, filename)
        return path if os.path.exists(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(name_or_path, filename, **{k: v for k, v in hub_kwargs.items() if v is not None})
    except EntryNotFoundError:
        return None


def _read_optional_json(name_or_path: str, filename: str, hub_kwargs: dict):
    """A JSON file beside the weights (folder or Hub repo), or None when it is not there."""
    path = _optional_file(name_or_path, filename, hub_kwargs)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as err:
        raise ModelLoadError(f"{filename} of {name_or_path!r} is not valid JSON: {type(err).__name__}: {err}") from err


# What `save_pretrained(..., push_to_hub=True, **options)` hands on to `push_to_hub`.
PUSH_OPTIONS = ("token", "private", "revision", "commit_message", "commit_description", "create_pr", "tags", "activations_repo", "license_name", "base_model_id")

# The pickle formats PyTorch and others write: unpickling can run any code, so they are never read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WEIGHTS_DTYPES = ("F64", "F32", "F16", "BF16")


def _weights_file(name_or_path: str, hub_kwargs: dict) -> str:
    """The path of `model.safetensors` in a folder or (downloaded from) a Hub repo."""
    folder = os.path.join(name_or_path, hub_kwargs.get("subfolder") or "")
    if os.path.isdir(folder):
        path = os.path.join(folder, "model.safetensors")
        if os.path.isfile(path):
            return path
        pickles = sorted(f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES))
        only = f": it holds only {', '.join(pickles)}, pickle files that sbert-sae never loads (unpickling can run code)" if pickles else ""
        raise ModelLoadError(f"{name_or_path!r} has no model.safetensors{only}")
    from huggingface_hub import hf_hub_download, list_repo_files
    from huggingface_hub.errors import EntryNotFoundError

    kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    try:
        return hf_hub_download(name_or_path, "model.safetensors", **kwargs)
    except EntryNotFoundError:
        try:
            files = list_repo_files(name_or_path, revision=kwargs.get("revision"), token=kwargs.get("token"))
        except Exception:  # noqa: BLE001 - only to say what the repo holds
            files = []
        pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        only = f": it holds only {', '.join(pickles)}, pickle files that sbert-sae never loads (unpickling can run code)" if pickles else ""
        raise ModelLoadError(f"{name_or_path!r} has no model.safetensors{only}") from None
    except Exception as err:  # noqa: BLE001 - network, auth, offline: one message naming the repo
        raise ModelLoadError(f"cannot download model.safetensors of {name_or_path!r}: {type(err).__name__}: {err}") from err


def _snapshot_commit(name_or_path: str, weights_path: str, hub_kwargs: dict) -> str | None:
    """The commit sha of the Hub snapshot `weights_path` was downloaded to (the cache keeps each
    commit's files under `snapshots/<sha>/`), or None for a folder's file."""
    if os.path.isdir(os.path.join(name_or_path, hub_kwargs.get("subfolder") or "")):
        return None
    match = re.search(r"[\\/]snapshots[\\/]([0-9a-f]{40})[\\/]", weights_path)
    return match.group(1) if match else None


def _check_weights_file(path: str, config: SparseAutoencoderConfig, name: str) -> None:
    """Read only the header of `model.safetensors` (nothing is allocated) and refuse a file that is
    damaged, or whose tensors are not the four of an SAE of the config's sizes."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            header = {key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"model.safetensors of {name!r} is damaged or not a safetensors file: {err}") from err
    n, d = config.n_latents, config.d_in
    expected = {"W_enc": (n, d), "b_enc": (n,), "W_dec": (n, d), "b_pre": (d,)}
    if header.keys() != expected.keys():
        raise ModelLoadError(
            f"model.safetensors of {name!r} holds tensors {sorted(header)}, not an SAE's {sorted(expected)}"
        )
    wrong = [f"{key} is {list(header[key][0])}, not {list(shape)}" for key, shape in expected.items() if header[key][0] != shape]
    if wrong:
        raise ModelLoadError(f"model.safetensors of {name!r} disagrees with its config.json (n_latents={n}, d_in={d}): {'; '.join(wrong)}")
    bad = [f"{key} is {dtype}" for key, (_, dtype) in header.items() if dtype not in WEIGHTS_DTYPES]
    if bad:
        raise ModelLoadError(f"model.safetensors of {name!r} holds non-float weights: {', '.join(bad)}")


class SparseAutoencoderPreTrainedModel(PreTrainedModel):
    config_class = SparseAutoencoderConfig
    base_model_prefix = "sae"
    main_input_name = "embeddings"
    supports_gradient_checkpointing = False


class SparseAutoencoder(SparseAutoencoderPreTrainedModel):
    """Top-k SAE: `encode`, `encode_topk`, `decode`, `forward`, `encode_texts`.

    Parameters: `W_enc` (n_latents, d_in), `b_enc` (n_latents), `W_dec` (n_latents, d_in)
    whose rows are the features' unit-norm directions, `b_pre` (d_in).

    Load one with `from_pretrained(folder, Hub repo id or registry short name)`; its labels
    (`sbert-sae label`) and metrics come with it: `feature_labels`, `describe(feature)`,
    `explain(text)` (a text's active features with their labels), `metrics`,
    `feature_families()`. `embed_texts` embeds texts with the base model; `save_pretrained`,
    `push_to_hub` and `to_sparse_encoder` write it out. Tensors and numpy arrays are taken as
    inputs; `encode`, `decode` and `forward` keep autograd's graph (`torch.no_grad()` for plain use).
    """

    decoder_impl: str = "auto"
    """How `decode_topk` adds up decoder rows: "sparse" (embedding_bag), "dense" (scatter the
    code, one matrix product) or "auto" (dense on a GPU, sparse elsewhere); same result."""

    def __init__(self, config: SparseAutoencoderConfig):
        # The config may have been changed since it was made (`config.k = ...`): an impossible
        # value is named here, not by a failed top-k on the first batch.
        config.validate_sae()
        super().__init__(config)
        n, d = config.n_latents, config.d_in
        try:
            self.W_enc = nn.Parameter(torch.empty(n, d))
            self.b_enc = nn.Parameter(torch.zeros(n))
            self.W_dec = nn.Parameter(torch.empty(n, d))
            self.b_pre = nn.Parameter(torch.zeros(d))
        except (RuntimeError, MemoryError, OverflowError) as err:
            gib = 4 * (2 * n * d + n + d) / 2**30
            raise ConfigError(f"an SAE of n_latents={n} and d_in={d} needs {gib:,.1f} GiB for its weights, more than can be allocated: {err}") from err
        self._base_model = None
        self.label_data: dict | None = None
        self.metrics: dict = {}
        self.activations_link: dict | None = None
        self.post_init()

    def extra_repr(self) -> str:
        # print(sae) showed "SparseAutoencoder()", as if it had no weights.
        c = self.config
        return f"d_in={c.d_in}, n_latents={c.n_latents}, k={c.k}, normalize={c.normalize!r}, dtype={self.W_enc.dtype}"

    # ------------------------------------------------------------------ init
    def _init_weights(self, module):
        if module is not self:
            return
        if all(getattr(p, "_is_hf_initialized", False) for p in (self.W_enc, self.b_enc, self.W_dec, self.b_pre)):
            # Loaded from a checkpoint: transformers 5.0 calls _init_weights after loading and
            # leaves it to skip the weights it flagged as loaded (these writes are in place).
            return
        # Random unit-norm decoder rows; the encoder starts as their transpose, scaled down
        # (`encoder_init_scale`): small encoder weights are reshaped quickly by Adam's first steps.
        W = torch.randn(self.config.n_latents, self.config.d_in, device=self.W_dec.device)
        W = W / W.norm(dim=1, keepdim=True)
        self.W_dec.data.copy_(W)
        self.W_enc.data.copy_(W * self.config.encoder_init_scale)
        self.b_enc.data.zero_()
        self.b_pre.data.zero_()

    @torch.no_grad()
    def init_b_pre_from_data(self, embeddings: torch.Tensor) -> None:
        """Set `b_pre` to the coordinate-wise median of (a sample of) the training data."""
        x = self.prepare_input(embeddings)
        self.b_pre.data.copy_(x.float().median(dim=0).values.to(self.b_pre.dtype))

    # ---------------------------------------------------------------- inputs
    def prepare_input(self, embeddings: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
        """Validate a (batch, d_in) tensor (or numpy array) and bring it to the SAE's input space."""
        embeddings = _from_numpy(embeddings)
        if not isinstance(embeddings, torch.Tensor):
            raise InputError(f"embeddings must be a torch.Tensor or numpy array of shape (batch, {self.config.d_in}), got {type(embeddings).__name__}")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.config.d_in:
            one = " (one embedding is a batch of one: x[None])" if embeddings.dim() == 1 and len(embeddings) == self.config.d_in else ""
            raise InputError(
                f"embeddings must have shape (batch, {self.config.d_in}), got {tuple(embeddings.shape)}{one}"
            )
        if embeddings.dtype not in FLOAT_DTYPES:
            raise InputError(f"embeddings must be a floating-point tensor (float16, bfloat16, float32 or float64), got dtype {embeddings.dtype}")
        if embeddings.device.type == "meta":
            raise InputError("embeddings are on the meta device: they hold no values")
        if embeddings.shape[0] == 0:
            raise InputError("embeddings is an empty batch (0 rows)")
        if check_finite and not torch.isfinite(embeddings).all():
            bad = (~torch.isfinite(embeddings)).any(dim=1).nonzero().flatten()[:5].tolist()
            raise InputError(f"embeddings contain NaN or inf (rows {bad}...)")
        x = embeddings.to(device=self.W_enc.device, dtype=self.W_enc.dtype)
        if self.config.normalize == "l2":
            x = F.normalize(x, dim=-1)
        return x

    # ---------------------------------------------------------------- encode
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n_latents) encoder outputs before the top-k, for prepared inputs."""
        return F.linear(x - self.b_pre, self.W_enc, self.b_enc)

    def _topk(self, pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = pre.topk(k, dim=-1, sorted=False)
        return F.relu(values), indices

    def encode_topk(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse code of (batch, d_in) embeddings: (values, indices), each (batch, k).

        Values are >= 0; an entry whose value is 0 did not fire.
        """
        x = self.prepare_input(embeddings)
        return self._topk(self.pre_activations(x), self.config.k)

    def encode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Dense code (batch, n_latents) with at most k non-zeros per row."""
        values, indices = self.encode_topk(embeddings)
        z = values.new_zeros(values.shape[0], self.config.n_latents)
        return z.scatter_(1, indices, values)

    # ---------------------------------------------------------------- decode
    def decode_topk(self, values: torch.Tensor, indices: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        """Reconstruction (batch, d_in) from a sparse code (values, indices) of shape (batch, k)."""
        values, indices = _from_numpy(values), _from_numpy(indices)
        if not isinstance(values, torch.Tensor) or not isinstance(indices, torch.Tensor):
            raise InputError(f"values and indices must be torch.Tensors or numpy arrays, got {type(values).__name__} and {type(indices).__name__}")
        if values.shape != indices.shape or values.dim() != 2:
            one = " (one code is a batch of one: values[None], indices[None])" if values.shape == indices.shape and values.dim() == 1 else ""
            raise InputError(f"values and indices must both be (batch, k), got {tuple(values.shape)} and {tuple(indices.shape)}{one}")
        if values.dtype not in FLOAT_DTYPES:
            raise InputError(f"values must be a floating-point tensor (float16, bfloat16, float32 or float64), got dtype {values.dtype}")
        if indices.dtype not in (torch.int32, torch.int64):
            raise InputError(f"indices must be an int32 or int64 tensor, got dtype {indices.dtype}")
        if "meta" in (values.device.type, indices.device.type):
            raise InputError("values and indices must hold values, not be on the meta device")
        if indices.numel() and not bool(((indices >= 0) & (indices < self.config.n_latents)).all()):
            bad = indices[(indices < 0) | (indices >= self.config.n_latents)][:5].tolist()
            raise InputError(f"indices must be feature ids in 0..{self.config.n_latents - 1}, got {bad}")
        if not bool(torch.isfinite(values).all()):
            raise InputError("values contain NaN or inf")
        return self._decode_topk(values.to(self.W_dec.device), indices.to(self.W_dec.device).long(), add_bias)

    def _decode_topk(self, values: torch.Tensor, indices: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        """`decode_topk` without its checks, which read values on the host (and stall a GPU)."""
        if self.decoder_impl == "dense" or (self.decoder_impl == "auto" and values.is_cuda):
            # On a GPU a dense product with the scattered code runs on the tensor cores and
            # beats the gather-and-add of embedding_bag (and its atomic backward).
            code = torch.zeros(values.shape[0], self.config.n_latents, dtype=values.dtype, device=values.device)
            out = code.scatter(1, indices, values) @ self.W_dec.to(values.dtype)
        else:
            out = F.embedding_bag(indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum")
        return out + self.b_pre if add_bias else out

    def _decode_columns(self, values: torch.Tensor, positions: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Decoding (no bias) of a code over the features `columns` only: `positions` index
        into `columns`. On a GPU the code is scattered into (batch, len(columns)), not into
        all n_latents (AuxK's code over a few dead features: 16384 x 24576 bf16 is 0.8 GB)."""
        if self.decoder_impl == "dense" or (self.decoder_impl == "auto" and values.is_cuda):
            code = torch.zeros(values.shape[0], len(columns), dtype=values.dtype, device=values.device)
            return code.scatter(1, positions, values) @ self.W_dec.index_select(0, columns).to(values.dtype)
        return self._decode_topk(values, columns[positions], add_bias=False)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Reconstruction (batch, d_in) from a dense code (batch, n_latents)."""
        latents = _from_numpy(latents)
        if not isinstance(latents, torch.Tensor):
            raise InputError(f"latents must be a torch.Tensor or numpy array of shape (batch, {self.config.n_latents}), got {type(latents).__name__}")
        if latents.dim() != 2 or latents.shape[1] != self.config.n_latents:
            raise InputError(f"latents must have shape (batch, {self.config.n_latents}), got {tuple(latents.shape)}")
        if latents.dtype not in FLOAT_DTYPES:
            raise InputError(f"latents must be a floating-point tensor (float16, bfloat16, float32 or float64), got dtype {latents.dtype}")
        if latents.device.type == "meta":
            raise InputError("latents are on the meta device: they hold no values")
        if not bool(torch.isfinite(latents).all()):
            raise InputError("latents contain NaN or inf")
        return latents.to(device=self.W_dec.device, dtype=self.W_dec.dtype) @ self.W_dec + self.b_pre

    # --------------------------------------------------------------- forward
    def forward(
        self,
        embeddings: torch.Tensor,
        dead_mask: torch.Tensor | None = None,
        check_finite: bool = True,
        dead_features: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> SparseAutoencoderOutput:
        """Encode, decode and compute the training loss.

        Args:
            embeddings: (batch, d_in).
            dead_mask: optional bool (n_latents,) marking dead features for the AuxK loss.
            check_finite: refuse NaN/inf inputs (the trainer checks its data once instead).
            dead_features: the dead features' ids instead of `dead_mask` (what the trainer
                passes: turning a mask into ids reads it on the host, which stalls a GPU).
                Ids below 0 are padding and ignored (a fixed-size list for a captured step).
            return_dict: False gives the output as a tuple, as transformers' models do.
        """
        x = self.prepare_input(embeddings, check_finite=check_finite)
        if dead_mask is not None and (not isinstance(dead_mask, torch.Tensor) or dead_mask.dtype != torch.bool or dead_mask.shape != (self.config.n_latents,)):
            got = f"{dead_mask.dtype} {tuple(dead_mask.shape)}" if isinstance(dead_mask, torch.Tensor) else type(dead_mask).__name__
            raise InputError(f"dead_mask must be a bool tensor of shape ({self.config.n_latents},), got {got}")
        if dead_features is not None:
            if not isinstance(dead_features, torch.Tensor) or dead_features.dtype not in (torch.int32, torch.int64) or dead_features.dim() != 1:
                got = f"{dead_features.dtype} {tuple(dead_features.shape)}" if isinstance(dead_features, torch.Tensor) else type(dead_features).__name__
                raise InputError(f"dead_features must be a 1-D tensor of feature ids, got {got}")
            # The range is read on the host: only where inputs are checked (not by the trainer).
            if check_finite and len(dead_features) and not bool((dead_features < self.config.n_latents).all()):
                raise InputError(f"dead_features must be feature ids in 0..{self.config.n_latents - 1}, got {dead_features[:5].tolist()}...")
        pre = self.pre_activations(x)
        values, indices = self._topk(pre, self.config.k)
        x_hat = self._decode_topk(values, indices)
        fvu = fraction_of_variance_unexplained(x_hat, x)

        auxk_loss = fvu.new_zeros(())
        if dead_features is None and dead_mask is not None:
            dead_features = dead_mask.to(x.device).nonzero().flatten()
        if dead_features is not None and len(dead_features):
            # The top-k and the decoding run over the dead features' columns only: a few
            # percent of the work. Padding (ids < 0) is masked out of the top-k; where it is
            # picked anyway (fewer dead features than k_aux), its value is set to 0.
            dead = dead_features.to(x.device)
            columns = dead.clamp_min(0)
            k_aux = min(self.config.k_aux, len(dead))
            candidates = pre.index_select(1, columns).masked_fill((dead < 0).unsqueeze(0), float("-inf"))
            raw, positions = candidates.topk(k_aux, dim=-1, sorted=False)
            raw = raw.masked_fill(torch.isneginf(raw), 0.0)
            # Rectified forward, straight-through backward. A dead feature's pre-activation is
            # usually below zero on every input: ReLU's gradient there is 0, so it could never
            # come back (7.2% of the README run's features stayed dead). Its gradient now
            # raises it where its direction would explain the residual: 0.0% dead, held-out
            # FVU 0.2-0.6% higher over three seeds. Unrectified values (SAELens') revive them too, but their large
            # negative values made the AuxK loss jump 17x and the held-out FVU rise mid-run.
            aux_values = raw + (F.relu(raw) - raw).detach()
            residual = (x - x_hat).detach()
            residual_hat = self._decode_columns(aux_values, positions, columns)
            auxk_loss = torch.nan_to_num(fraction_of_variance_unexplained(residual_hat, residual), 0.0)
        loss = fvu + self.config.auxk_coef * auxk_loss
        out = SparseAutoencoderOutput(
            loss=loss,
            reconstruction=x_hat,
            latent_values=values,
            latent_indices=indices,
            fvu=fvu,
            auxk_loss=auxk_loss,
        )
        return out.to_tuple() if return_dict is False else out

    # --------------------------------------------------- decoder constraints
    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        """Renormalise every decoder row to unit length (after each optimiser step)."""
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder(self) -> None:
        """Project out of each decoder row's gradient its component along the row (before each step)."""
        if self.W_dec.grad is None:
            return
        W = self.W_dec.data
        parallel = (self.W_dec.grad * W).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel * W

    # ------------------------------------------------------------------ text
    def base_sentence_transformer(self, device: str | None = None):
        """The sentence-transformers model named by `config.base_model`, loaded once."""
        # One model for threads that ask at once (the explorer's label search made ready in
        # the background while a text is inspected): each would load its own copy.
        with _BASE_MODEL_LOADING:
            if self._base_model is None:
                if not self.config.base_model:
                    raise ConfigError("this SAE has no base_model in its config: embed the texts yourself and call encode()")
                from .base_model import embedding_dimension, load_sentence_transformer

                # Set up with the recorded encode settings, so that its dimension is checked after any truncate_dim.
                model = load_sentence_transformer(
                    self.config.base_model, revision=self.config.base_model_revision, device=device, encode_kwargs=self.config.base_model_kwargs
                )
                dim = embedding_dimension(model)
                if dim is not None and dim != self.config.d_in:
                    raise ConfigError(
                        f"base model {self.config.base_model!r} makes {dim}-d embeddings but this SAE reads d_in={self.config.d_in}"
                    )
                # Kept outside the module tree: as a submodule its weights would be the SAE's
                # (state_dict, save_pretrained, push_to_hub, .half()).
                object.__setattr__(self, "_base_model", model)
        return self._base_model

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(len(texts), d_in) embeddings of `texts` by the base model, made as the training data was."""
        return self._embed(texts, self.config.base_model_kwargs, batch_size)

    def query_encoding(self, prompt_name: str | None = None, prompt: str | None = None, like_corpus: bool = False):
        """How `embed_queries` embeds a search query (`base_model.QueryEncoding`): with the base
        model's "query" prompt where it has one and the SAE's texts were embedded as documents
        (sentence-transformers' `encode_query` / `encode_document`), else as the SAE's texts
        were; or with the model's prompt `prompt_name`, the literal `prompt`, or exactly as
        the SAE's texts were (`like_corpus`), when asked. InputError for a prompt name the
        model does not have."""
        from .base_model import model_query_encoding

        return model_query_encoding(
            self.base_sentence_transformer(), self.config.base_model_kwargs, prompt_name=prompt_name, prompt=prompt, like_corpus=like_corpus
        )

    def embed_queries(
        self, queries: Sequence[str], batch_size: int = 64, *, prompt_name: str | None = None, prompt: str | None = None, like_corpus: bool = False
    ) -> torch.Tensor:
        """(len(queries), d_in) embeddings of search queries, to be compared with the SAE's
        texts: as `query_encoding` says (a symmetric model's are `embed_texts`')."""
        queries = self._texts_to_embed(queries)  # checked before the base model loads
        encoding = self.query_encoding(prompt_name=prompt_name, prompt=prompt, like_corpus=like_corpus)
        return self._embed(queries, encoding.kwargs, batch_size)

    def _embed(self, texts: Sequence[str], encode_kwargs: dict | None, batch_size: int) -> torch.Tensor:
        texts = self._texts_to_embed(texts)
        model = self.base_sentence_transformer()
        vectors = model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False, **(encode_kwargs or {}))
        if vectors.shape[1] != self.config.d_in:
            raise ConfigError(f"base model made {vectors.shape[1]}-d embeddings but this SAE reads d_in={self.config.d_in}")
        return vectors.float()

    @staticmethod
    def _texts_to_embed(texts) -> list[str]:
        """`texts` as a list of non-empty strings (a string: a list of one); InputError naming the first
        that is not (a string given alone as "text", not as a list the caller never passed)."""
        one = isinstance(texts, str)
        if one:
            texts = [texts]
        try:
            texts = list(texts)
        except TypeError:  # None, a number: list() said only "'NoneType' object is not iterable"
            raise InputError(f"texts must be a string or a sequence of strings, got {type(texts).__name__}") from None
        for i, t in enumerate(texts):
            where = "text" if one else f"texts[{i}]"
            if not isinstance(t, str):
                raise InputError(f"{where} is {type(t).__name__}, not a string")
            if not t.strip():
                raise InputError(f"{where} is empty ({t!r}): it has nothing to embed")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as err:
                raise InputError(f"{where} is not valid Unicode ({err.reason} at position {err.start}: {t[err.start:err.end]!r})") from None
        if not texts:
            raise InputError("texts is empty")
        return texts

    def to_sparse_encoder(self, device: str | None = None):
        """This SAE as a sentence-transformers `SparseEncoder`: the base model's modules, a
        `Dense` that keeps the first `truncate_dim` dimensions where the SAE reads truncated
        embeddings, an L2 `Normalize` where the SAE normalises its inputs (and the modules
        before do not), and sentence-transformers' own `SparseAutoEncoder` module holding this
        SAE's encoder (`pre_bias` = b_pre, `encoder` = W_enc, `latent_bias` = b_enc, the same
        top-k). It carries the prompts the SAE embeds with (`base_model_kwargs` or the base
        model's default), so its `encode` equals `encode_texts`; users of it need
        sentence-transformers only.

        That module's decoder is tied to its encoder, whereas this SAE's decoder is trained
        on its own: reconstructions (`decode`) stay with sbert-sae.
        """
        import copy

        import sentence_transformers

        try:
            from sentence_transformers import SparseEncoder
        except ImportError:  # sentence-transformers < 5.0 has no SparseEncoder
            raise ConfigError(
                f"to_sparse_encoder needs sentence-transformers >= 5.0 (SparseEncoder); this is "
                f"{sentence_transformers.__version__}: pip install 'sentence-transformers>=5'"
            ) from None
        try:  # sentence-transformers >= 5.4
            from sentence_transformers.sentence_transformer.modules import Dense, Normalize
            from sentence_transformers.sparse_encoder.modules import SparseAutoEncoder as SentenceTransformersSAE
        except ImportError:  # sentence-transformers 5.0-5.3
            from sentence_transformers.models import Dense, Normalize
            from sentence_transformers.sparse_encoder.models import SparseAutoEncoder as SentenceTransformersSAE

        base = self.base_sentence_transformer(device)  # set up with base_model_kwargs: its prompt and truncate_dim
        modules = [copy.deepcopy(module) for module in base]
        truncate_dim = getattr(base, "truncate_dim", None)
        if truncate_dim is not None:
            # SparseEncoder's own truncate_dim would cut the sparse codes, not the embeddings;
            # a bias-free identity slice is a stock module, so loading it needs no remote code.
            from .base_model import embedding_dimension

            with base.truncate_sentence_embeddings(None):
                full_dim = embedding_dimension(base)
            modules.append(
                Dense(full_dim, truncate_dim, bias=False, activation_function=torch.nn.Identity(), init_weight=torch.eye(full_dim)[:truncate_dim].clone())
            )
        if self.config.normalize == "l2" and not isinstance(modules[-1], Normalize):
            modules.append(Normalize())
        sae_module = SentenceTransformersSAE(input_dim=self.config.d_in, hidden_dim=self.config.n_latents, k=self.config.k, k_aux=self.config.k_aux, normalize=False)
        with torch.no_grad():
            sae_module.pre_bias.copy_(self.b_pre.detach().float().cpu())
            sae_module.encoder.weight.copy_(self.W_enc.detach().float().cpu())
            sae_module.latent_bias.copy_(self.b_enc.detach().float().cpu())
        prompts = dict(getattr(base, "prompts", None) or {})
        default_prompt_name = getattr(base, "default_prompt_name", None)
        return SparseEncoder(
            modules=[*modules, sae_module], device=device or str(base.device), prompts=prompts, default_prompt_name=default_prompt_name
        )

    def feature_families(self, embeddings=None, *, activations=None, args=None, show_progress: bool = False):
        """Feature families (O'Neill et al. 2024): a parent feature and the sparser features under it
        in the co-occurrence spanning tree, largest first, with labels. Computed from `activations`
        or `embeddings` (n_texts, d_in); with neither, read from the families.json beside the SAE
        (`sbert-sae families`), else computed on its training run's corpus, else on the
        activations dataset it was published with."""
        from .families import feature_families

        return feature_families(self, embeddings, activations=activations, args=args, show_progress=show_progress)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Dense codes (len(texts), n_latents) of texts, embedded with the base model."""
        return self.encode(self.embed_texts(texts, batch_size=batch_size))

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load an SAE from a folder or a Hub repo: safetensors weights only, nothing unpickled.

        Raises `ModelLoadError` when the folder is not an sbert-sae SAE, its weights are
        not safetensors, or they disagree with its config.
        """
        if kwargs.get("use_safetensors") is False:
            raise ModelLoadError("sbert-sae loads weights from safetensors only (use_safetensors=False is refused)")
        kwargs["use_safetensors"] = True
        kwargs.pop("trust_remote_code", None)
        if kwargs.get("variant"):
            # save_pretrained refuses variants: an SAE is one model.safetensors, of any dtype.
            raise ModelLoadError(
                f"sbert-sae SAEs have no weight variants (variant={kwargs['variant']!r}): the weights are one model.safetensors; "
                "load it and pick the dtype with dtype=torch.float16 (or .half())"
            )
        want_info = kwargs.pop("output_loading_info", False)
        from .registry import resolve

        name, released = resolve(str(pretrained_model_name_or_path))
        if released and not kwargs.get("revision"):
            kwargs["revision"] = released  # a short name means that release
        if _names_a_folder(name) and not os.path.exists(name):
            # transformers takes any missing path for a repo id and answers "Repo id must use
            # alphanumeric chars" (or, offline, "couldn't connect to huggingface.co").
            raise ModelLoadError(f"no such folder: {name!r} (an SAE folder holds config.json and model.safetensors)")
        # force_download reaches the config and the weights' header check too: else a damaged
        # cached copy (the reason to force a download) was refused before anything was fetched.
        hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "subfolder", "force_download") if k in kwargs}
        try:
            config_dict, _ = SparseAutoencoderConfig.get_config_dict(name, **hub_kwargs)
        except TypeError as err:
            # transformers 4.x indexes config.json as an object before returning it: a JSON list or
            # number fails there (5.x returns it and it is refused below as not an SAE's config).
            raise ModelLoadError(
                f"{name!r} is not an sbert-sae SAE: its config.json is not a JSON object ({type(err).__name__}: {err})"
            ) from err
        except (OSError, ValueError, AttributeError, RecursionError) as err:
            hint = ""
            if "/" not in name and not os.path.exists(name):
                # A bare name is looked up as a released short name first (registry.resolve).
                from .registry import registry_path

                hint = f" ({name!r} is no released SAE's short name either: `sbert-sae list` shows those of {registry_path()})"
            elif not os.path.exists(name):
                # A run folder typed wrong ("runs/wkii") reads as a Hub repo id: the error was the Hub's alone.
                hint = f" (there is no folder {name!r} in {os.getcwd()} either)"
            raise ModelLoadError(f"cannot read config.json of {name!r}: {type(err).__name__}: {err}{hint}") from err
        where = f"{name!r}" + (f" (subfolder {hub_kwargs['subfolder']!r})" if hub_kwargs.get("subfolder") else "")
        if config_dict == {}:
            # What transformers gives for a folder or repo (or subfolder) without config.json; it
            # was reported as "its config.json has model_type=None".
            raise ModelLoadError(f"{where} has no config.json (or an empty one): not an sbert-sae SAE (config.json and model.safetensors){_unfinished_run_hint(name, hub_kwargs)}")
        if not isinstance(config_dict, dict) or config_dict.get("model_type") != SparseAutoencoderConfig.model_type:
            found = config_dict.get("model_type") if isinstance(config_dict, dict) else f"<a JSON {type(config_dict).__name__}>"
            raise ModelLoadError(
                f"{where} is not an sbert-sae SAE: its config.json has model_type={found!r}, "
                f"expected {SparseAutoencoderConfig.model_type!r}"
            )
        try:
            config = SparseAutoencoderConfig.from_dict(config_dict)
        except ConfigError as err:
            raise ConfigError(f"config.json of {name!r} is impossible: {err}") from err
        except (TypeError, ValueError) as err:
            raise ModelLoadError(f"config.json of {name!r} is malformed: {type(err).__name__}: {err}") from err
        # The weights' header is checked against the config before the model is built: a config
        # claiming 10^12 features must not allocate them, a damaged file must name itself.
        weights = _weights_file(name, hub_kwargs)
        _check_weights_file(weights, config, name)
        kwargs.pop("force_download", None)  # fetched afresh just now: not a second time
        commit = _snapshot_commit(name, weights, hub_kwargs)
        if commit is not None:
            # The rest (the weights through transformers, the labels and metrics, the families read
            # later) comes from the commit these weights came from: a branch that moves on (a new
            # push to `main`) gave the SAE another SAE's labels and families.
            kwargs["revision"] = hub_kwargs["revision"] = commit
        from .base_model import MODEL_LOAD_LOCK

        try:
            with MODEL_LOAD_LOCK:  # see MODEL_LOAD_LOCK: loads in two threads broke transformers 4.x
                model, info = super().from_pretrained(name, *model_args, output_loading_info=True, **kwargs)
        except ConfigError:
            raise
        except (OSError, ValueError, RuntimeError) as err:
            raise ModelLoadError(f"cannot load SAE weights of {name!r}: {err}") from err
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            raise ModelLoadError(f"weights of {name!r} do not match its config: {problems}")
        not_finite = [key for key, tensor in model.state_dict().items() if not torch.isfinite(tensor).all()]
        if not_finite:
            raise ModelLoadError(f"model.safetensors of {name!r} holds NaN or inf in {', '.join(not_finite)}")
        model.load_extras(name, **hub_kwargs)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the labels and metrics the SAE carries."""
        from .labels import LABELS_FILE
        from .utils import follow_umask, write_json

        push = kwargs.pop("push_to_hub", False)
        repo_id = kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(save_directory))
        # The push options go to `push_to_hub`: left in kwargs, PreTrainedModel.save_pretrained would
        # drop them silently (private=True made a public repo, create_pr=True committed to main).
        push_options = {key: kwargs.pop(key) for key in PUSH_OPTIONS if key in kwargs}
        # The weights are always one model.safetensors: the loader, `sbert-sae push` and the
        # trainer read only that file, so shards (max_shard_size smaller than the weights) or a
        # variant (model.fp16.safetensors) would make a folder that nothing loads back.
        if kwargs.get("variant") is not None:
            raise InputError(f"variant={kwargs['variant']!r} is not supported: an SAE is saved as one model.safetensors (convert with .to(dtype) instead)")
        if kwargs.get("max_shard_size") is not None:
            from transformers.utils.hub import convert_file_size_to_int

            size = sum(p.numel() * p.element_size() for p in self.parameters())
            if convert_file_size_to_int(kwargs["max_shard_size"]) < size:
                raise InputError(
                    f"max_shard_size={kwargs['max_shard_size']!r} would split this SAE's {size / 1e6:,.1f} MB of weights: "
                    "an SAE is saved as one model.safetensors, which is what from_pretrained reads"
                )
        kwargs["max_shard_size"] = 2**62  # one file, however large
        result = super().save_pretrained(save_directory, *args, **kwargs)
        follow_umask(os.path.join(save_directory, "model.safetensors"))
        if getattr(self, "label_data", None) is not None:
            data = self.label_data
            write_json(os.path.join(save_directory, LABELS_FILE), {**data, "features": {str(f): e for f, e in sorted(data["features"].items())}}, depth=2)
        if getattr(self, "metrics", None):
            write_json(os.path.join(save_directory, "metrics.json"), self.metrics)
        if getattr(self, "activations_link", None):
            from .hub import ACTIVATIONS_FILE

            write_json(os.path.join(save_directory, ACTIVATIONS_FILE), self.activations_link)
        self._copy_families(save_directory)
        if push:
            self.push_to_hub(repo_id, **push_options)
        return result

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str | None = "Upload sbert-sae SAE",
        commit_description: str | None = None,
        create_pr: bool = False,
        tags: list[str] | None = None,
        activations_repo: str | None = None,
        license_name: str | None = None,
        base_model_id: str | None = None,
    ) -> str:
        """Push the weights, config, labels, metrics and a model card to a Hub model repo;
        returns the commit sha. `PreTrainedModel.push_to_hub`'s options mean what they mean
        there (`create_pr` opens a pull request; `tags` are added to the card's). The published
        config and card name the base model by its Hub id: `base_model_id`, needed when
        `config.base_model` is a local folder that does not tell its Hub id (this SAE keeps
        the folder). (`sbert-sae push FOLDER REPO` also uploads a trained run's plots and
        training settings.)"""
        import tempfile

        from .hub import published_base_model, push_sae

        # An SAE published with its activations dataset keeps linking it (load_activations).
        link = getattr(self, "activations_link", None) or {}
        activations_revision = link.get("revision") if activations_repo is None else None
        activations_repo = activations_repo or link.get("repo_id")
        from .labels import label_scores_disagree

        # Named here, by where the SAE was loaded from: push_sae would name the temporary copy.
        disagreement = label_scores_disagree(getattr(self, "label_data", None), getattr(self, "metrics", None))
        if disagreement:
            source = (getattr(self, "_extras_source", None) or ("this SAE",))[0]
            raise ModelLoadError(f"{source} was not pushed: {disagreement}; run `sbert-sae label` on it again to finish it, then push")
        # Refused here, before the copy is saved, naming where the SAE came from and the keyword.
        where = (getattr(self, "_extras_source", None) or ("this SAE",))[0]
        base_model_id, _ = published_base_model(self.config.to_dict(), base_model_id, where=f"{where} was not pushed", option="base_model_id=")
        with tempfile.TemporaryDirectory(prefix="sbert-sae-push-") as tmp:
            self.save_pretrained(tmp)
            return push_sae(
                tmp,
                repo_id,
                private=private,
                token=token,
                revision=revision,
                commit_message=commit_message or "Upload sbert-sae SAE",
                commit_description=commit_description,
                create_pr=create_pr,
                tags=tags,
                activations_repo=activations_repo,
                activations_revision=activations_revision,
                license_name=license_name,
                base_model_id=base_model_id,
            )

    def _copy_families(self, save_directory) -> None:
        """Copy the families (`sbert-sae families`: families.json and its plots) from where this
        SAE was loaded to `save_directory`, so that the saved SAE (and a push of it) gives the same
        `feature_families()`; they were left behind, and the copy's families had to be recomputed
        from a corpus it no longer knew."""
        import shutil

        from .families import COOCCURRENCE_PLOT, FAMILIES_FILE, GRAPH_PLOT

        name, hub_kwargs = self._extras_location()
        if not name:
            return
        try:
            found = _optional_file(name, FAMILIES_FILE, hub_kwargs)
            if found is None:
                return  # no families: no plots of them either
            paths = {FAMILIES_FILE: found, **{plot: _optional_file(name, plot, hub_kwargs) for plot in (COOCCURRENCE_PLOT, GRAPH_PLOT)}}
        except Exception as err:  # noqa: BLE001 - a Hub source out of reach (offline, a private repo's token is not kept)
            if os.path.isdir(os.path.join(name, hub_kwargs.get("subfolder") or "")):
                raise
            logger.warning("the families of %s were not saved with the SAE (%s: %s)", name, type(err).__name__, err)
            return
        for filename, path in paths.items():
            target = os.path.join(save_directory, filename)
            if path is not None and not (os.path.exists(target) and os.path.samefile(path, target)):
                shutil.copyfile(path, target)

    # ------------------------------------------------------- labels and metrics
    def load_extras(self, name_or_path: str, **hub_kwargs) -> None:
        """Read `feature_labels.json` and `metrics.json` from a folder or Hub repo, when present."""
        from .labels import LABELS_FILE, label_scores_disagree, parse_feature_labels

        # Files read later (families.json) must come from the revision the weights came from;
        # the token is not kept on the model.
        self._extras_source = (name_or_path, {k: v for k, v in hub_kwargs.items() if k in ("revision", "subfolder", "cache_dir", "local_files_only")})
        labels = _read_optional_json(name_or_path, LABELS_FILE, hub_kwargs)
        self.label_data = parse_feature_labels(labels, self.config.n_latents, source=f"{name_or_path}/{LABELS_FILE}") if labels is not None else None
        metrics = _read_optional_json(name_or_path, "metrics.json", hub_kwargs)
        if metrics is not None and not isinstance(metrics, dict):
            raise ModelLoadError(f"metrics.json of {name_or_path!r} is malformed: expected a JSON object, got a {type(metrics).__name__}")
        self.metrics = metrics or {}
        disagreement = label_scores_disagree(self.label_data, self.metrics)
        if disagreement:
            local = os.path.isdir(name_or_path)
            logger.warning("%s: %s; %s", name_or_path, disagreement, f"`sbert-sae label {name_or_path}` run again writes both anew" if local else f"the labels' own scores are in the summary of {LABELS_FILE}")
        link = _read_optional_json(name_or_path, "activations.json", hub_kwargs)
        if link is not None and not (isinstance(link, dict) and isinstance(link.get("repo_id"), str)):
            raise ModelLoadError(f"activations.json of {name_or_path!r} is malformed: expected an object with a 'repo_id' string")
        self.activations_link = link
        if not os.path.isdir(os.path.join(name_or_path, hub_kwargs.get("subfolder") or "")):
            from .families import FAMILIES_FILE

            # Read only when asked for (feature_families), but downloaded now, with the rest: an SAE
            # loaded once from the Hub has its families offline too (and from a private repo, whose
            # token is not kept on the SAE). One that cannot be fetched now is looked for again then.
            try:
                _optional_file(name_or_path, FAMILIES_FILE, hub_kwargs)
            except Exception as err:  # noqa: BLE001 - the SAE is loaded; its families are asked for later, if ever
                logger.debug("families.json of %s not fetched with the SAE: %s: %s", name_or_path, type(err).__name__, err)

    def _extras_location(self) -> tuple[str, dict]:
        """Where the files beside the weights are read: the folder or Hub repo (and revision)
        this SAE was loaded from, else its `name_or_path` ("" when it was made in memory)."""
        return getattr(self, "_extras_source", None) or (getattr(self, "name_or_path", "") or "", {})

    def read_extra_json(self, filename: str):
        """A JSON file beside the weights this SAE was loaded from (folder, or Hub repo at the
        same revision), or None when it is not there or the SAE was not loaded from anywhere."""
        name, hub_kwargs = self._extras_location()
        return _read_optional_json(name, filename, hub_kwargs) if name else None

    def load_activations(self, split: str = "train", **kwargs):
        """The corpus' sparse activations (a `datasets.Dataset`: id, text, domain, indices,
        values) from the dataset repo this SAE was published with (`sbert-sae push --activations`)."""
        link = getattr(self, "activations_link", None)
        if not link or not link.get("repo_id"):
            raise ModelLoadError("this SAE was not published with an activations dataset (sbert-sae push --activations)")
        from datasets import load_dataset

        return load_dataset(link["repo_id"], split=split, revision=kwargs.pop("revision", link.get("revision")), **kwargs)

    @property
    def feature_labels(self) -> list[str | None]:
        """Label of every feature (None where a feature has none: dead, unlabelled, or not labelled yet)."""
        data = getattr(self, "label_data", None)
        if not data:
            return [None] * self.config.n_latents
        return [data["features"].get(f, {}).get("label") for f in range(self.config.n_latents)]

    def describe(self, feature: int) -> dict:
        """Everything known about one feature: label, keywords with scores, density, score, top texts."""
        if not isinstance(feature, bool):
            try:  # a numpy integer or an integer tensor of one element (an id from encode_topk)
                feature = operator.index(feature)
            except TypeError:
                pass
        if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < self.config.n_latents:
            raise InputError(f"feature must be an integer in 0..{self.config.n_latents - 1}, got {feature!r}")
        data = getattr(self, "label_data", None)
        entry = dict(data["features"].get(feature, {})) if data else {}
        entry.setdefault("label", None)
        if not data:
            entry["status"] = "not labelled: run `sbert-sae label` on this SAE"
        return {"feature": feature, **entry}

    @torch.no_grad()
    def explain(self, text: str | torch.Tensor) -> list[dict]:
        """The active features of one text (or one embedding), strongest first, with their labels."""
        text = _from_numpy(text)
        if isinstance(text, str):
            x = self.embed_texts(text)  # one string: a bad one is named "text", not "texts[0]"
        elif isinstance(text, torch.Tensor):
            if text.dim() not in (1, 2):
                raise InputError(f"explain takes one embedding of shape ({self.config.d_in},) or (1, {self.config.d_in}), got {tuple(text.shape)}")
            x = text.reshape(1, -1) if text.dim() == 1 else text
            if x.shape[0] != 1:
                raise InputError(f"explain takes one text or one embedding, got {x.shape[0]} rows")
        else:
            raise InputError(f"explain takes a string or an embedding (tensor or numpy array), got {type(text).__name__}")
        values, indices = self.encode_topk(x)
        labels = self.feature_labels
        out = [
            {"feature": int(i), "activation": float(v), "label": labels[int(i)]}
            for v, i in zip(values[0].tolist(), indices[0].tolist())
            if v > 0
        ]
        return sorted(out, key=lambda row: -row["activation"])
