"""Embed many texts with a sentence-transformers model, faster than `SentenceTransformer.encode`.

`encode` tokenises each batch in the Python thread that also drives the model, so a GPU
waits on the tokenizer most of the time (about 20 of the ~780 TFLOP/s an H100 offers, for
MiniLM). Here the texts are tokenised ahead, in worker threads (the Rust tokenizer
releases the GIL and uses every core), sorted by their token length, cut into batches of
a token budget (little padding), moved to the device from pinned memory while the
previous batch runs, and embedded in half precision on a GPU. The model's own modules
(pooling, dense layers, normalisation) run unchanged, so any sentence-transformers
model works.

The fast tokenizer path copies the model's backend tokenizer and is used only when it
gives exactly what `model.preprocess` gives on probe texts (the first texts plus hard
cases: surrounding white space, over-long text, accents); otherwise each batch is
tokenised by `model.preprocess` itself, still ahead of the device.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_PROBES = [
    "  Leading and trailing white space.  ",
    "Crème brûlée, naïve café — ÀÉÎÕÜ and ß.",
    "word " * 600,
    "x",
]


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: fp16 on a CUDA device (vectors within cosine 0.9999 of fp32), else fp32."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    return "fp16" if device.type == "cuda" else "fp32"


@dataclass
class EncodeSettings:
    """How texts are batched and run (none of these changes the vectors beyond precision)."""

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


class _BackendTokenizer:
    """A private copy of the model's Rust tokenizer that reproduces `model.preprocess`."""

    def __init__(self, model, sample: Sequence[str]):
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

        probe = list(sample) + _PROBES
        reference = model.preprocess(probe) if hasattr(model, "preprocess") else model.tokenize(probe)
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
        encodings = self.encode_batch([t.strip() for t in texts], add_special_tokens=True)
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

    def __init__(self, model, settings: EncodeSettings | None = None, *, owns_model: bool = False):
        self.settings = settings or EncodeSettings()
        self.device = torch.device(getattr(model, "device", "cpu"))
        self.precision = resolve_precision(self.settings.precision, self.device)
        dtype = _DTYPES[self.precision]
        current = next(model.parameters()).dtype
        if dtype != current:
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

    # -------------------------------------------------------------- producer side
    def _fast_tokenizer(self, sample: Sequence[str]) -> _BackendTokenizer | None:
        if not self._checked:
            self._checked = True
            longest = sorted(sample, key=len)[-16:]
            try:
                self._backend = _BackendTokenizer(self.model, list(sample[:48]) + longest)
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
                chosen = [texts[i] for i in rows]
                features = self.model.preprocess(chosen) if hasattr(self.model, "preprocess") else self.model.tokenize(chosen)
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
        vectors = self.model(features)["sentence_embedding"].float()
        if self.settings.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=1)
        return vectors

    @property
    def dim(self) -> int:
        if not hasattr(self, "_dim"):
            from .base_model import embedding_dimension

            dim = embedding_dimension(self.model)
            if dim is None:
                dim = int(self._forward(self._probe_features()).shape[1])
            self._dim = int(dim)
        return self._dim

    def _probe_features(self) -> dict:
        return self.model.preprocess(["probe"]) if hasattr(self.model, "preprocess") else self.model.tokenize(["probe"])

    def encode(self, texts: Sequence[str], progress=None) -> np.ndarray:
        """(len(texts), dim) float32 embeddings of `texts`, in their order."""
        return next(self.stream([texts], progress=progress))

