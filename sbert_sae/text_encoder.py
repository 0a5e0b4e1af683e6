"""Embed many texts with a sentence-transformers model, faster than `SentenceTransformer.encode`.

`encode` tokenises each batch in the Python thread that also drives the model, so a GPU
waits on the tokenizer most of the time (about 20 of the ~780 TFLOP/s an H100 offers, for
MiniLM). Here the texts are tokenised ahead, in worker threads (the Rust tokenizer
releases the GIL and uses every core), sorted by their token length, cut into batches of
a token budget (little padding), moved to the device from pinned memory while the
previous batch runs, and embedded in half precision on a GPU. The model's own modules
(pooling, dense layers, normalisation) run unchanged, so any sentence-transformers
model that makes a sentence embedding from text works: transformers with any pooling,
dense layers or none, static (model2vec-style) embeddings. The settings of `encode` that
change the vectors are followed as `encode` follows them: the model's default prompt or
a chosen one (prepended to each text, and left out of the pooling where the model's
`Pooling(include_prompt=False)` says so, through the same `prompt_length` feature),
`truncate_dim` (the model's own or a chosen one, before normalisation), and
`normalize_embeddings`.

The fast tokenizer path copies the model's backend tokenizer and is used only when it
gives exactly what `model.preprocess` gives on probe texts (the first texts plus hard
cases: surrounding white space, over-long text, accents), prompt included; otherwise each
batch is tokenised by `model.preprocess` itself, still ahead of the device.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import logging
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError, ModelLoadError, SbertSaeError

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_PROBES = [
    "  Leading and trailing white space.  ",
    "Crème brûlée, naïve café — ÀÉÎÕÜ and ß.",
    "word " * 600,
    "x",
]


ENCODE_KWARGS = ("normalize_embeddings", "prompt_name", "prompt", "truncate_dim")
"""The `SentenceTransformer.encode` settings that change the vectors and that are followed."""


def check_encode_kwargs(encode_kwargs: dict | None) -> dict:
    """`encode_kwargs` (settings of `SentenceTransformer.encode`) checked, with unset
    (None) prompt and truncate_dim settings dropped; InputError naming the first bad one."""
    kwargs = dict(encode_kwargs or {})
    if not all(isinstance(key, str) for key in kwargs):
        raise InputError(f"encode settings must be named by strings, got {sorted(map(repr, kwargs))}")
    unsupported = sorted(set(kwargs) - set(ENCODE_KWARGS))
    if unsupported:
        raise InputError(f"encode setting(s) {unsupported} are not supported: only {list(ENCODE_KWARGS)} are followed")
    kwargs = {key: value for key, value in kwargs.items() if key == "normalize_embeddings" or value is not None}
    if "normalize_embeddings" in kwargs and not isinstance(kwargs["normalize_embeddings"], bool):
        raise InputError(f"normalize_embeddings must be true or false, got {kwargs['normalize_embeddings']!r}")
    for key in ("prompt_name", "prompt"):
        if key in kwargs and not isinstance(kwargs[key], str):
            raise InputError(f"{key} must be a string, got {kwargs[key]!r}")
    if "prompt_name" in kwargs and "prompt" in kwargs:
        raise InputError(f"give prompt or prompt_name, not both (prompt={kwargs['prompt']!r}, prompt_name={kwargs['prompt_name']!r})")
    if "truncate_dim" in kwargs:
        value = kwargs["truncate_dim"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"truncate_dim must be a positive integer, got {value!r}")
    return kwargs


def resolve_prompt(model, prompt: str | None = None, prompt_name: str | None = None) -> str | None:
    """The text `SentenceTransformer.encode(prompt=..., prompt_name=...)` prepends to each
    text: `prompt`, else the model's prompt named `prompt_name`, else the model's default
    prompt; None when that is none or empty."""
    if prompt is not None:
        return prompt or None
    prompts = getattr(model, "prompts", None) or {}
    if prompt_name is not None:
        if prompt_name not in prompts:
            raise InputError(f"prompt_name {prompt_name!r} is not one of the model's prompts {sorted(prompts)}")
        return prompts[prompt_name] or None
    default = getattr(model, "default_prompt_name", None)
    return (prompts.get(default) or None) if default is not None else None


def model_features(model, texts: Sequence[str], prompt: str | None = None) -> dict:
    """The model's own features for `texts`, `prompt` prepended, as `encode` makes them."""
    preprocess = getattr(model, "preprocess", None)
    if preprocess is not None and (not prompt or "prompt" in inspect.signature(preprocess).parameters):
        return preprocess(list(texts), prompt=prompt) if prompt else preprocess(list(texts))
    # Older sentence-transformers: encode() prepends the prompt itself and passes its token
    # count (less the closing special token) to the pooling, which may leave it out.
    features = model.tokenize([prompt + t for t in texts] if prompt else list(texts))
    if prompt:
        tokenized = model.tokenize([prompt])
        if "input_ids" in tokenized:
            features["prompt_length"] = tokenized["input_ids"].shape[-1] - 1
    return features


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: fp16 on a CUDA device (vectors within cosine 0.9999 of fp32), else fp32."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    return "fp16" if device.type == "cuda" else "fp32"


@dataclass
class EncodeSettings:
    """How texts are batched and run, and the `encode` settings that change the vectors."""

    precision: str = "auto"
    max_batch_tokens: int | None = None
    """Padded tokens in one batch (None: 65536 on a GPU, 2048 on a CPU, where small batches stay in cache)."""
    max_batch_size: int = 1024
    """Texts in one batch, at most."""
    super_batch: int = 4096
    """Texts tokenised together; sorted by token length inside, then cut into batches."""
    workers: int | None = None
    """Tokenizer threads (None: 2 on a CPU, 4 on a GPU)."""
    normalize: bool = False
    """L2-normalise the vectors (as `encode(normalize_embeddings=True)`)."""
    prompt_name: str | None = None
    """Prepend the model's prompt of this name to each text (as `encode(prompt_name=...)`)."""
    prompt: str | None = None
    """Prepend this text to each text (as `encode(prompt=...)`; "" for none). With neither
    set, the model's default prompt, if it has one, is prepended, as `encode` does."""
    truncate_dim: int | None = None
    """Keep the first this many dimensions (as `encode(truncate_dim=...)`); None: the model's own setting."""


class _BackendTokenizer:
    """A private copy of the model's Rust tokenizer that reproduces `model.preprocess`."""

    def __init__(self, model, sample: Sequence[str], prompt: str | None = None):
        from tokenizers import Tokenizer

        hf_tokenizer = getattr(model, "tokenizer", None)
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        max_length = getattr(model, "max_seq_length", None)
        if backend is None or not max_length:
            raise ValueError("the model has no fast tokenizer or no max_seq_length")
        self.backend = Tokenizer.from_str(backend.to_str())
        self.backend.no_padding()
        self.backend.enable_truncation(max_length=int(max_length))
        self.pad_id = hf_tokenizer.pad_token_id or 0
        self.encode_batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        self.prompt = prompt or ""

        probe = list(sample) + _PROBES
        reference = model_features(model, probe, prompt)
        self.keys = [k for k, v in reference.items() if isinstance(v, torch.Tensor)]
        self.extras = {k: v for k, v in reference.items() if not isinstance(v, torch.Tensor)}
        if not {"input_ids", "attention_mask"} <= set(self.keys) or not set(self.keys) <= {"input_ids", "attention_mask", "token_type_ids"}:
            raise ValueError(f"the model's inputs are {self.keys}")
        # One text is one segment: its type ids come from the tokenizer's post-processing
        # template, the same for every text. When that template gives zeros, as BERT's does,
        # they are not read back from each encoding (a Python list per text, under the GIL).
        self.read_types = "token_type_ids" in self.keys and bool(reference["token_type_ids"].any())
        mine = self.pad(*self.tokenize(probe), np.arange(len(probe)))
        for key in self.keys:
            theirs = reference[key]
            ours = mine[key]
            if ours.shape != theirs.shape or not torch.equal(ours, theirs.to(ours.dtype)):
                raise ValueError(f"{key} differs from the model's own tokenisation")

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Token lengths, all ids concatenated, and the type ids likewise (None when they are zeros)."""
        encodings = self.encode_batch([(self.prompt + t).strip() for t in texts], add_special_tokens=True)
        lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
        total = int(lengths.sum())
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int64, count=total)
        types = None
        if self.read_types:
            types = np.fromiter(itertools.chain.from_iterable(e.type_ids for e in encodings), dtype=np.int64, count=total)
        return lengths, ids, types

    def pad(self, lengths: np.ndarray, ids: np.ndarray, types: np.ndarray | None, rows: np.ndarray) -> dict:
        """Padded tensors for `rows` of a tokenised block."""
        row_lengths = lengths[rows]
        width = int(row_lengths.max())
        mask = np.arange(width)[None, :] < row_lengths[:, None]
        # The rows' tokens in the concatenated ids, in row order (what `mask` fills row-major).
        starts = (np.cumsum(lengths) - lengths)[rows]
        take = np.repeat(starts - (np.cumsum(row_lengths) - row_lengths), row_lengths) + np.arange(int(row_lengths.sum()))
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        input_ids[mask] = ids[take]
        out = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}
        if "token_type_ids" in self.keys:
            token_types = np.zeros((len(rows), width), dtype=np.int64)
            if types is not None:
                token_types[mask] = types[take]
            out["token_type_ids"] = torch.from_numpy(token_types)
        return {**{k: out[k] for k in self.keys}, **self.extras}


class TextEncoder:
    """Embeds lists of texts with `model`; see the module docstring for how.

    `encode(texts)` returns a (len(texts), dim) float32 array in the texts' order;
    `stream(chunks)` embeds an iterable of text lists, tokenising ahead across chunk
    boundaries, and yields each chunk's array as soon as it is finished.
    """

    def __init__(self, model, settings: EncodeSettings | None = None, *, owns_model: bool = False, name: str | None = None):
        """`name` names the model in error messages (default: its class).

        Raises ModelLoadError when the model makes no sentence embedding from a text, and
        InputError for a prompt name the model does not have or a truncate_dim above its
        dimension."""
        self.settings = settings or EncodeSettings()
        self.name = name or type(model).__name__
        self.device = torch.device(getattr(model, "device", "cpu"))
        self.precision = resolve_precision(self.settings.precision, self.device)
        self.prompt = resolve_prompt(model, self.settings.prompt, self.settings.prompt_name)
        saved_truncate_dim = getattr(model, "truncate_dim", None)
        self.truncate_dim = self.settings.truncate_dim if self.settings.truncate_dim is not None else saved_truncate_dim
        dtype = _DTYPES[self.precision]
        first = next(model.parameters(), None)
        if first is not None and dtype != first.dtype:
            # Cast a copy unless the caller handed the model over: its weights stay as they were.
            model = model if owns_model else copy.deepcopy(model)
            model.to(dtype)
        self.model = model.eval()
        cuda = self.device.type == "cuda"
        self.max_batch_tokens = self.settings.max_batch_tokens or (65536 if cuda else 2048)
        self.workers = self.settings.workers or (4 if cuda else 2)
        self.pin = cuda
        self._backend: _BackendTokenizer | None = None
        self._checked = False
        self._dim = self._probe_dimension()

    def _probe_dimension(self) -> int:
        """The dimension of the vectors, from one text run through the model: a model that
        cannot embed text is refused here, before anything is written."""
        modules = ", ".join(type(m).__name__ for m in self.model.children()) or "none"
        try:
            with torch.inference_mode():
                features = model_features(self.model, ["A probe sentence."], self.prompt)
                features = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
                out = self.model(features)
        except SbertSaeError:
            raise
        except Exception as err:  # noqa: BLE001 - whatever the modules raise, the model cannot embed text
            raise ModelLoadError(f"{self.name} cannot embed text (modules: {modules}): {type(err).__name__}: {err}") from err
        vectors = out.get("sentence_embedding") if isinstance(out, dict) else None
        if vectors is None:
            raise ModelLoadError(
                f"{self.name} makes no sentence embedding from text (modules: {modules}): a sentence-transformers model "
                "needs a module that outputs one, such as Pooling after its Transformer"
            )
        if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or vectors.shape[0] != 1 or vectors.is_sparse:
            shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
            raise ModelLoadError(f"{self.name} makes sentence embeddings of shape {shape} for one text, not one dense vector (1, dim)")
        full = int(vectors.shape[1])
        if self.settings.truncate_dim is not None and self.settings.truncate_dim > full:
            raise InputError(f"truncate_dim={self.settings.truncate_dim} is larger than the {full} dimensions {self.name} makes")
        # As encode(): a saved truncate_dim above the model's dimension keeps every dimension.
        return min(full, self.truncate_dim) if self.truncate_dim is not None else full

    # -------------------------------------------------------------- producer side
    def _fast_tokenizer(self, sample: Sequence[str]) -> _BackendTokenizer | None:
        if not self._checked:
            self._checked = True
            longest = sorted(sample, key=len)[-16:]
            try:
                self._backend = _BackendTokenizer(self.model, list(sample[:48]) + longest, self.prompt)
            except Exception as err:  # noqa: BLE001 - any mismatch means: use the model's own path
                logger.info("tokenising with model.preprocess (the fast path does not apply: %s)", err)
                self._backend = None
        return self._backend

    def _batches(self, texts: Sequence[str]) -> list[tuple[np.ndarray, dict]]:
        """Tokenise one block of texts; (positions in the block, features) per batch."""
        backend = self._backend
        if backend is not None:
            lengths, ids, types = backend.tokenize(texts)
        else:
            lengths = np.array([len(t) for t in texts], dtype=np.int64)  # characters stand in
        order = np.argsort(-lengths, kind="stable")
        out = []
        start = 0
        while start < len(order):
            width = int(lengths[order[start]]) if backend is not None else 0
            size = max(1, self.max_batch_tokens // max(width, 1)) if backend is not None else 64
            rows = order[start : start + min(size, self.settings.max_batch_size)]
            if backend is not None:
                features = backend.pad(lengths, ids, types, rows)
            else:
                features = model_features(self.model, [texts[i] for i in rows], self.prompt)
            if self.pin:
                features = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in features.items()}
            out.append((rows, features))
            start += len(rows)
        return out

    # -------------------------------------------------------------- consumer side
    def stream(self, chunks: Iterable[Sequence[str]], progress=None) -> Iterator[np.ndarray]:
        """Yield the embeddings of each chunk of `chunks`, in order."""
        pending: deque = deque()
        blocks = self._blocks(chunks)
        lookahead = self.workers + 2
        with ThreadPoolExecutor(self.workers, thread_name_prefix="tokenize") as pool:
            for item in itertools.islice(blocks, lookahead):
                pending.append((item[0], item[1], pool.submit(self._batches_at, item[2])))
            out = None
            while pending:
                chunk_len, last, future = pending.popleft()
                nxt = next(blocks, None)
                if nxt is not None:
                    pending.append((nxt[0], nxt[1], pool.submit(self._batches_at, nxt[2])))
                offset, block_texts = future.result()
                if out is None:
                    out = None if chunk_len == 0 else torch.empty((chunk_len, self.dim), dtype=torch.float32, device=self.device)
                for rows, features in block_texts:
                    vectors = self._forward(features)
                    out[torch.from_numpy(rows + offset).to(self.device, non_blocking=True)] = vectors
                    if progress is not None:
                        progress(len(rows))
                if last:
                    yield np.zeros((0, self.dim), dtype=np.float32) if out is None else out.cpu().numpy()
                    out = None

    def _blocks(self, chunks: Iterable[Sequence[str]]):
        """(chunk length, is the chunk's last block, (offset, texts)) per super-batch."""
        step = self.settings.super_batch
        for texts in chunks:
            texts = list(texts)
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    raise InputError(f"texts[{i}] is {type(t).__name__}, not a string")
            self._fast_tokenizer(texts)
            if not texts:
                yield 0, True, (0, texts)
                continue
            starts = range(0, len(texts), step)
            for s in starts:
                yield len(texts), s == starts[-1], (s, texts[s : s + step])

    def _batches_at(self, item):
        offset, texts = item
        return offset, self._batches(texts)

    @torch.inference_mode()
    def _forward(self, features: dict) -> torch.Tensor:
        features = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        vectors = self.model(features)["sentence_embedding"]
        if self.truncate_dim is not None:
            vectors = vectors[:, : self.truncate_dim]  # before normalising, as encode() does
        vectors = vectors.float()
        if self.settings.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=1)
        return vectors

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: Sequence[str], progress=None) -> np.ndarray:
        """(len(texts), dim) float32 embeddings of `texts`, in their order."""
        return next(self.stream([texts], progress=progress))

