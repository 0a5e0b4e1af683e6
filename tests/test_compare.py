"""`sbert-sae compare`: one-to-one feature matching of SAEs trained on two Wikipedia domains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sbert_sae import SparseAutoencoder
from sbert_sae.cli import main
from sbert_sae.compare import compare_saes, live_mask
from sbert_sae.errors import InputError

SMALL = ["--n-latents", "64", "-k", "4", "--epochs", "40", "--batch-size", "8", "--lr", "1e-2", "-q", "--report-to", "none"]


@pytest.fixture(scope="module")
def domains(wiki_small, tmp_path_factory):
    """Two SAEs, one on Mathematics and one on Arts, with different seeds (no shared initialisation)."""
    root = tmp_path_factory.mktemp("compare")
    runs = {}
    for seed, topic in ((1, "Mathematics"), (2, "Arts")):
        out = root / topic.lower()
        assert main([str(a) for a in ("train", "--dataset", wiki_small, "--out", out, "--domain-column", "topic", "--domain", topic, "--seed", seed, *SMALL)]) == 0
        runs[topic] = out
    return runs


def test_sae_matches_itself(domains):
    run = domains["Mathematics"]
    sae = SparseAutoencoder.from_pretrained(run)
    live = live_mask(run, sae.config.n_latents)
    assert live is not None and live.sum() > 0
    result = compare_saes(sae, sae, live_a=live, live_b=live)
    assert len(result.pairs) == live.sum() == len(result.shared)
    assert all(i == j for i, j, _ in result.pairs)
    assert np.allclose(result.matched_cosines, 1.0, atol=1e-4)
    assert result.only_a == [] and result.only_b == []


def test_two_domains_share_features_above_chance(domains):
    runs = [domains[t] for t in ("Mathematics", "Arts")]
    a, b = (SparseAutoencoder.from_pretrained(r) for r in runs)
    result = compare_saes(a, b, min_cosine=0.25, live_a=live_mask(runs[0], 64), live_b=live_mask(runs[1], 64))
    s = result.summary()
    cos, rand = result.matched_cosines, result.random_cosines
    # Chance in d=384: random unit directions match at cosine ~0.1, 0.2 at best.
    assert rand.max() < 0.25 and s["random_above_min_cosine"] == 0
    # 80 texts a domain, different seeds: a few features still point the same way, beyond any random match.
    assert s["n_shared"] >= 1 and (cos > rand.max()).sum() >= 1
    assert np.median(cos) > np.median(rand) and np.quantile(cos, 0.9) > np.quantile(rand, 0.9)
    assert s["n_shared"] + s["n_only_a"] == s["n_live_a"]
    assert [p[2] for p in result.pairs] == sorted((p[2] for p in result.pairs), reverse=True)


def test_a_comparison_shows_its_summary_not_every_pair():
    # A notebook cell ending in compare_saes(...) showed the dataclass' repr: every matched pair,
    # every random cosine and both SAEs' labels (two 6144-feature SAEs: hundreds of kB of text).
    from sbert_sae import SparseAutoencoderConfig

    torch.manual_seed(0)
    a, b = (SparseAutoencoder(SparseAutoencoderConfig(d_in=16, n_latents=32, k=4)) for _ in range(2))
    result = compare_saes(a, a, min_cosine=0.7)
    shown = repr(result)
    assert "pairs=" not in shown and "random_cosines" not in shown and "labels_a" not in shown
    assert shown.startswith("ComparisonResult(n_a=32, n_b=32, min_cosine=0.7, method='exact', matched=32, shared=32, only_a=0, only_b=0, median_cosine=1")
    assert len(compare_saes(a, b).pairs) == 32  # the pairs are all still there


def test_different_base_model_is_refused(domains, tmp_path, capsys):
    sae = SparseAutoencoder.from_pretrained(domains["Arts"])
    other = SparseAutoencoder.from_pretrained(domains["Arts"])
    other.config.base_model = "sentence-transformers/all-mpnet-base-v2"
    with pytest.raises(InputError, match="different base models"):
        compare_saes(sae, other)
    other.save_pretrained(tmp_path / "mpnet")
    assert main(["compare", str(domains["Arts"]), str(tmp_path / "mpnet"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different base models" in err[0]
    assert main(["compare", str(domains["Arts"]), str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_different_d_in_is_refused(domains):
    from sbert_sae import SparseAutoencoderConfig

    sae = SparseAutoencoder.from_pretrained(domains["Arts"])
    small = SparseAutoencoder(SparseAutoencoderConfig(d_in=16, n_latents=32, k=4, base_model=sae.config.base_model))
    with pytest.raises(InputError, match="d_in"):
        compare_saes(sae, small)


def test_cli_writes_comparison(domains, capsys):
    a, b = domains["Mathematics"], domains["Arts"]
    assert main(["compare", str(a), str(b), "--min-cosine", "0.2", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "shared at cosine >= 0.2" in out and "against random unit directions" in out
    folder = a / "compare-arts"
    doc = json.loads((folder / "comparison.json").read_text())
    assert (folder / "comparison_cosines.png").stat().st_size > 1000
    s = doc["summary"]
    assert s["n_shared"] == len(doc["shared"]) and s["n_only_a"] == len(doc["only_a"])
    assert {"feature_a", "feature_b", "cosine", "label_a", "label_b"} <= set(doc["shared"][0])
    assert len(doc["random_cosines"]) == min(s["n_live_a"], s["n_live_b"])


def test_blocked_greedy_matching_agrees_on_clear_pairs():
    from sbert_sae.compare import match

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 64, generator=gen)
    b = torch.cat([a[:200] + 0.05 * torch.randn(200, 64, generator=gen), torch.randn(100, 64, generator=gen)])
    perm = torch.randperm(300, generator=gen)
    rows, cols, cos, method = match(a, b[perm], exact_limit=100)
    assert method.startswith("greedy")
    clear = {int(r): int(c) for r, c, x in zip(rows, cols, cos) if x > 0.9}
    inverse = torch.argsort(perm)
    assert len(clear) == 200 and all(inverse[r] == c or perm[c] == r for r, c in clear.items())


def test_random_baseline_is_not_an_sae_initialisation():
    """SAE decoders start as torch.randn under the training seed; the baseline must not be that."""
    from sbert_sae import SparseAutoencoderConfig

    torch.manual_seed(0)
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=384, n_latents=256, k=4, base_model="m"))
    result = compare_saes(sae, sae)
    assert result.random_cosines.max() < 0.35 and np.median(result.random_cosines) < 0.25
