"""The SAE's maths on synthetic vectors: shapes, sparsity, decoder constraints, AuxK, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from sbert_sae import (
    ConfigError,
    InputError,
    ModelLoadError,
    SparseAutoencoder,
    SparseAutoencoderConfig,
    SparseAutoencoderOutput,
)


def make_sae(d=16, n=64, k=4, **kw) -> SparseAutoencoder:
    torch.manual_seed(0)
    return SparseAutoencoder(SparseAutoencoderConfig(d_in=d, n_latents=n, k=k, **kw))


def data(rows=256, d=16, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d, generator=g)


def test_init_follows_the_recipe():
    sae = make_sae()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)
    assert torch.allclose(sae.W_enc, 0.1 * sae.W_dec)  # the encoder starts small (encoder_init_scale)
    assert torch.allclose(make_sae(encoder_init_scale=1.0).W_enc, sae.W_dec)
    assert torch.count_nonzero(sae.b_enc) == 0 and torch.count_nonzero(sae.b_pre) == 0
    x = data()
    sae.init_b_pre_from_data(x)
    expected = torch.nn.functional.normalize(x, dim=1).median(dim=0).values
    assert torch.allclose(sae.b_pre, expected)


def test_encode_decode_shapes_and_sparsity():
    sae = make_sae()
    x = data(10)
    z = sae.encode(x)
    assert z.shape == (10, 64)
    assert ((z != 0).sum(dim=1) <= 4).all()
    assert (z >= 0).all()
    values, indices = sae.encode_topk(x)
    assert values.shape == indices.shape == (10, 4)
    dense = torch.zeros(10, 64).scatter(1, indices, values)
    assert torch.equal(dense, z)
    assert sae.decode(z).shape == (10, 16)
    assert torch.allclose(sae.decode(z), sae.decode_topk(values, indices), atol=1e-5)


def test_repr_names_the_sizes():
    assert repr(make_sae()) == "SparseAutoencoder(d_in=16, n_latents=64, k=4, normalize='l2', dtype=torch.float32)"


def test_forward_returns_model_output():
    sae = make_sae()
    out = sae(data(32))
    assert isinstance(out, SparseAutoencoderOutput)
    assert out.reconstruction.shape == (32, 16)
    assert out.latent_values.shape == out.latent_indices.shape == (32, 4)
    assert out.loss.ndim == 0 and out.fvu.ndim == 0
    assert float(out.auxk_loss) == 0.0  # no dead mask given
    assert torch.allclose(out.loss, out.fvu)


def test_fvu_is_normalised_mse():
    sae = make_sae()
    x = data(32)
    out = sae(x)
    xn = torch.nn.functional.normalize(x, dim=1)
    expected = ((out.reconstruction - xn) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    assert torch.allclose(out.fvu, expected, rtol=1e-5)


def test_gradient_projection_removes_parallel_component():
    sae = make_sae()
    sae(data(64)).loss.backward()
    assert sae.W_dec.grad.abs().sum() > 0
    sae.remove_gradient_parallel_to_decoder()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    assert parallel.abs().max() < 1e-6


def test_decoder_stays_unit_norm_through_training():
    sae = make_sae()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = data(512)
    first = None
    for step in range(50):
        out = sae(x[(step * 64) % 512 :][:64])
        first = first if first is not None else float(out.fvu.detach())
        out.loss.backward()
        sae.remove_gradient_parallel_to_decoder()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit()
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    assert float(sae(x).fvu.detach()) < first  # it learns


def test_auxk_gives_dead_latents_a_gradient():
    """A latent that loses the top-k gets no gradient from the reconstruction loss; AuxK
    gives the dead ones a gradient towards the residual, which is what revives them."""

    def grads(auxk_coef: float):
        sae = make_sae(n=64, k=2, auxk_coef=auxk_coef)
        with torch.no_grad():
            sae.b_enc[:32] = 1.0  # the first half always wins the top-2
        dead = torch.zeros(64, dtype=torch.bool)
        dead[32:] = True
        out = sae(data(64), dead_mask=dead)
        assert not (out.latent_indices >= 32).any()
        out.loss.backward()
        return sae.W_dec.grad[32:], sae.W_enc.grad[32:], sae.b_enc.grad[32:]

    for g in grads(0.0):
        assert torch.count_nonzero(g) == 0
    for g in grads(1 / 32):
        assert torch.count_nonzero(g) > 0


def test_auxk_reaches_dead_latents_that_are_negative_on_every_input():
    """Features usually die with pre-activations below zero everywhere. Rectified, their AuxK
    values would be 0 and their gradient too, so they could never come back; trained on the
    AuxK loss, those whose direction explains the residual must rise until they fire."""
    sae = make_sae(n=64, k=2, auxk_coef=1.0)
    with torch.no_grad():
        sae.b_enc[:32] = 1.0
        sae.b_enc[32:] = -10.0  # far below zero on every input
    dead = torch.zeros(64, dtype=torch.bool)
    dead[32:] = True
    x = data(512)
    assert bool((sae.pre_activations(sae.prepare_input(x))[:, 32:] < 0).all())
    out = sae(x, dead_mask=dead)
    out.auxk_loss.backward()
    assert torch.count_nonzero(sae.b_enc.grad[32:]) > 0 and torch.count_nonzero(sae.W_enc.grad[32:]) > 0

    opt = torch.optim.Adam([sae.W_dec, sae.W_enc, sae.b_enc], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        sae(x, dead_mask=dead).auxk_loss.backward()
        sae.remove_gradient_parallel_to_decoder()
        opt.step()
        sae.set_decoder_norm_to_unit()
    revived = (sae.pre_activations(sae.prepare_input(x))[:, 32:] > 0).any(dim=0)
    assert int(revived.sum()) >= 4, f"only {int(revived.sum())} of 32 dead latents rose above zero"


def test_auxk_reduces_the_residual_of_dead_latents():
    """Trained on the residual alone, the dead latents learn to explain it."""
    sae = make_sae(n=64, k=2, auxk_coef=1.0)
    with torch.no_grad():
        sae.b_enc[:32] = 1.0
    for p in (sae.b_pre,):
        p.requires_grad_(False)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[32:] = True
    x = data(512)
    before = float(sae(x, dead_mask=dead).auxk_loss.detach())
    opt = torch.optim.Adam([sae.W_dec, sae.W_enc, sae.b_enc], lr=5e-3)
    for step in range(100):
        out = sae(x[(step * 64) % 512 :][:64], dead_mask=dead)
        out.auxk_loss.backward()
        sae.W_dec.grad[:32] = 0
        sae.W_enc.grad[:32] = 0
        sae.b_enc.grad[:32] = 0
        sae.remove_gradient_parallel_to_decoder()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit()
    after = float(sae(x, dead_mask=dead).auxk_loss.detach())
    assert after < 0.9 * before


def test_auxk_loss_is_positive_with_dead_latents():
    sae = make_sae()
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    out = sae(data(32), dead_mask=dead)
    assert float(out.auxk_loss.detach()) > 0
    assert torch.allclose(out.loss, out.fvu + sae.config.auxk_coef * out.auxk_loss)


@pytest.mark.parametrize("decoder_impl", ["sparse", "dense"])
@pytest.mark.parametrize("n_dead", [0, 3, 40])
def test_auxk_over_dead_ids_equals_auxk_over_the_mask(n_dead, decoder_impl):
    """The trainer passes dead feature ids (top-k and decoding over their columns only), padded
    with -1 to a fixed length in a captured step; loss and gradients equal those of the dead
    mask, with fewer or more dead features than k_aux, whichever way the code is decoded."""
    results = []
    for form in ("mask", "ids", "padded ids"):
        sae = make_sae(n=64, k=2)
        sae.decoder_impl = decoder_impl
        dead = torch.zeros(64, dtype=torch.bool)
        dead[torch.randperm(64, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
        ids = dead.nonzero().flatten()
        if form == "mask":
            kwargs = {"dead_mask": dead}
        elif form == "ids":
            kwargs = {"dead_features": ids}
        else:  # padding first, so that a mask that misses it would pick it
            kwargs = {"dead_features": torch.cat([torch.full((64 - n_dead,), -1), ids]) if n_dead else ids}
        out = sae(data(32), **kwargs)
        out.loss.backward()
        results.append((out.loss.detach(), out.auxk_loss.detach(), sae.W_dec.grad.clone(), sae.W_enc.grad.clone(), sae.b_enc.grad.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (float(results[0][1]) > 0) == (n_dead > 0)


def test_save_load_round_trip_is_equal(tmp_path):
    from safetensors.torch import load_file

    sae = make_sae(base_model="sentence-transformers/all-MiniLM-L6-v2")
    sae.init_b_pre_from_data(data())
    sae.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    assert set(load_file(tmp_path / "model.safetensors")) == {"W_enc", "b_enc", "W_dec", "b_pre"}
    loaded = SparseAutoencoder.from_pretrained(tmp_path)
    assert loaded.config.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert loaded.config.k_aux == 8
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    x = data(8)
    assert torch.equal(sae.encode(x), loaded.encode(x))


def test_save_pretrained_writes_one_weights_file_that_loads_back(tmp_path):
    sae = make_sae(d=64, n=4096)  # 2 MB of weights
    sae.save_pretrained(tmp_path / "large-shard", max_shard_size="50MB")
    assert sorted(p.name for p in (tmp_path / "large-shard").iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(SparseAutoencoder.from_pretrained(tmp_path / "large-shard").W_dec, sae.W_dec)
    # Shards or a variant file would be a folder from_pretrained cannot read: refused, nothing written.
    with pytest.raises(InputError, match="max_shard_size='500KB' would split this SAE's 2.1 MB"):
        sae.save_pretrained(tmp_path / "sharded", max_shard_size="500KB")
    with pytest.raises(InputError, match="variant='fp16' is not supported"):
        sae.save_pretrained(tmp_path / "variant", variant="fp16")
    assert not (tmp_path / "sharded").exists() and not (tmp_path / "variant").exists()
    with pytest.raises(ModelLoadError, match="no weight variants \\(variant='fp16'\\).*dtype=torch.float16"):
        SparseAutoencoder.from_pretrained(tmp_path / "large-shard", variant="fp16")


def test_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModel

    make_sae().save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), SparseAutoencoderConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), SparseAutoencoder)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"k": 100, "n_latents": 10}, "k=100 is larger than n_latents=10"),
        ({"k": 0}, "k must be a positive integer, got 0"),
        ({"n_latents": -3}, "n_latents must be a positive integer, got -3"),
        ({"d_in": 0}, "d_in must be a positive integer"),
        ({"normalize": "zscore"}, "normalize must be one of"),
        ({"auxk_coef": float("nan")}, "auxk_coef must be a finite number"),
        ({"encoder_init_scale": 0}, "encoder_init_scale must be a finite number > 0, got 0"),
    ],
)
def test_impossible_configs_are_refused(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        SparseAutoencoderConfig(**kwargs)


def test_config_overrides_at_load_time_are_checked(tmp_path):
    from transformers import AutoConfig

    make_sae().save_pretrained(tmp_path)
    assert SparseAutoencoder.from_pretrained(tmp_path, k=8).encode_topk(data(2))[0].shape == (2, 8)  # a valid override
    # Overrides are set after the stored values were checked: they must be checked too.
    with pytest.raises(ConfigError, match="k=100 is larger than n_latents=64"):
        SparseAutoencoder.from_pretrained(tmp_path, k=100)
    with pytest.raises(ConfigError, match="k must be a positive integer, got 0"):
        AutoConfig.from_pretrained(tmp_path, k=0)
    config = SparseAutoencoderConfig(d_in=16, n_latents=64, k=4)
    config.k = 65  # changed after it was made
    with pytest.raises(ConfigError, match="k=65 is larger than n_latents=64"):
        SparseAutoencoder(config)


@pytest.mark.parametrize(
    "tensor, fragment",
    [
        (torch.zeros(4, 15), r"shape \(batch, 16\), got \(4, 15\)"),
        (torch.zeros(16), r"shape \(batch, 16\), got \(16,\)"),
        (torch.zeros(4, 16, dtype=torch.long), "floating-point"),
        (torch.zeros(0, 16), "empty batch"),
        (torch.tensor([[float("nan")] * 16]), "NaN or inf"),
        (torch.tensor([[float("inf")] * 16]), "NaN or inf"),
    ],
)
def test_bad_inputs_are_refused(tensor, fragment):
    with pytest.raises(InputError, match=fragment):
        make_sae().encode(tensor)


def test_numpy_embeddings_and_feature_ids_are_accepted():
    import numpy as np

    sae = make_sae().requires_grad_(False)
    x = data(5)
    array = x.numpy()  # what SentenceTransformer.encode returns by default
    assert torch.equal(sae.encode(array), sae.encode(x))
    values, indices = sae.encode_topk(array)
    assert torch.equal(sae(array).reconstruction, sae(x).reconstruction)
    assert torch.equal(sae.decode(sae.encode(x).numpy()), sae.decode(sae.encode(x)))
    assert torch.equal(sae.decode_topk(values.numpy(), indices.numpy()), sae.decode_topk(values, indices))
    read_only = np.array(array)
    read_only.flags.writeable = False  # a memory-mapped cache
    assert torch.equal(sae.encode(read_only), sae.encode(x))
    assert sae.explain(array[0]) == sae.explain(x[0])
    # Feature ids as encode_topk and numpy give them.
    assert sae.describe(indices[0, 0])["feature"] == sae.describe(np.int64(indices[0, 0]))["feature"] == int(indices[0, 0])
    with pytest.raises(InputError, match=r"got \(16,\) \(one embedding is a batch of one"):
        sae.encode(array[0])
    with pytest.raises(InputError, match="torch.Tensor or numpy array"):
        sae.encode(x.tolist())
    with pytest.raises(InputError, match="floating-point"):
        sae.encode(np.zeros((2, 16), dtype=np.int64))


def test_forward_takes_return_dict_and_refuses_unknown_keywords():
    sae = make_sae().requires_grad_(False)
    x = data(4)
    out = sae(x)
    as_tuple = sae(x, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.reconstruction)
    with pytest.raises(TypeError, match="dead_mas"):
        sae(x, dead_mas=torch.zeros(sae.config.n_latents, dtype=torch.bool))  # a misspelt dead_mask


def test_from_pretrained_refuses_pickles_and_other_models(tmp_path):
    sae = make_sae()
    sae.save_pretrained(tmp_path / "ok")
    # Only a pickle: refused, never unpickled.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    torch.save(sae.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError):
        SparseAutoencoder.from_pretrained(pickled)
    with pytest.raises(ModelLoadError, match="safetensors only"):
        SparseAutoencoder.from_pretrained(tmp_path / "ok", use_safetensors=False)
    # Another model type.
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="model_type='bert'"):
        SparseAutoencoder.from_pretrained(other)
    # Weights whose shapes disagree with the config.
    bigger = tmp_path / "bigger"
    make_sae(n=128).save_pretrained(bigger)
    cfg = json.loads((bigger / "config.json").read_text())
    cfg["n_latents"] = 64
    (bigger / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError):
        SparseAutoencoder.from_pretrained(bigger)
    with pytest.raises(ModelLoadError):
        SparseAutoencoder.from_pretrained(tmp_path / "missing")
    # No config.json at all (an empty folder, a wrong subfolder): said so, not "model_type=None".
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="empty' has no config.json"):
        SparseAutoencoder.from_pretrained(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="ok' \\(subfolder 'math'\\) has no config.json"):
        SparseAutoencoder.from_pretrained(tmp_path / "ok", subfolder="math")


def test_base_model_dimension_must_match(minilm):
    sae = make_sae(d=128, base_model="sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(ConfigError, match="384-d embeddings but this SAE reads d_in=128"):
        sae.encode_texts(["a text"])


def test_encode_texts_uses_the_base_model(minilm):
    sae = make_sae(d=384, n=256, k=8, base_model="sentence-transformers/all-MiniLM-L6-v2")
    texts = ["The cell is the basic unit of life.", "A prime number has two divisors."]
    z = sae.encode_texts(texts)
    expected = sae.encode(torch.from_numpy(minilm.encode(texts)))
    assert z.shape == (2, 256)
    assert torch.allclose(z, expected, atol=1e-5)
    with pytest.raises(InputError, match="texts\\[1\\] is int"):
        sae.encode_texts(["ok", 3])


def test_texts_that_are_not_strings_are_named_before_the_model_loads():
    # encode_texts(None) said only "TypeError: 'NoneType' object is not iterable".
    sae = make_sae(d=384, n=256, k=8, base_model="sentence-transformers/all-MiniLM-L6-v2")
    for bad in (None, 3):
        with pytest.raises(InputError, match=f"texts must be a string or a sequence of strings, got {type(bad).__name__}"):
            sae.encode_texts(bad)
    assert sae._base_model is None


def test_a_run_folder_that_is_not_there_is_named(tmp_path, monkeypatch):
    # "runs/wiki" typed wrong looks like a Hub repo id (org/name): the error spoke only of
    # huggingface.co ("couldn't connect", offline), never of the folder.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"there is no folder 'runs/wkii' in .* either"):
        SparseAutoencoder.from_pretrained("runs/wkii")


def test_explain_names_an_empty_text_as_its_one_text():
    # explain("") answered "texts[0] is empty ('')": a list the caller never passed.
    sae = make_sae(d=384, n=256, k=8, base_model="sentence-transformers/all-MiniLM-L6-v2")
    for empty in ("", "  \n"):
        with pytest.raises(InputError, match=r"^text is empty \("):
            sae.explain(empty)
        with pytest.raises(InputError, match=r"^text is empty \("):
            sae.encode_texts(empty)  # one string, as explain takes it
    with pytest.raises(InputError, match=r"^text is not valid Unicode"):
        sae.explain("caf\ud800")
    with pytest.raises(InputError, match=r"^texts\[1\] is empty"):
        sae.encode_texts(["a text", ""])  # in a list: named by its index


def test_sparse_codes_of_another_kind_are_named_with_what_is_taken():
    # decode_topk takes numpy arrays too, but a list was refused as "must be torch.Tensors".
    sae = make_sae()
    values, indices = sae.encode_topk(data(2))
    with pytest.raises(InputError, match="values and indices must be torch.Tensors or numpy arrays, got list and list"):
        sae.decode_topk(values.tolist(), indices.tolist())
    with pytest.raises(InputError, match=r"got \(4,\) and \(4,\) \(one code is a batch of one: values\[None\], indices\[None\]\)"):
        sae.decode_topk(values[0], indices[0])


def test_saving_after_encoding_texts_writes_the_sae_alone(minilm, tmp_path):
    # The base model the SAE loads to embed texts is not one of its weights: a save after
    # encode_texts wrote its 90 MB into model.safetensors, which from_pretrained then refused.
    sae = make_sae(d=384, n=256, k=8, base_model="sentence-transformers/all-MiniLM-L6-v2")
    sae.encode_texts(["The cell is the basic unit of life."])
    assert sorted(sae.state_dict()) == ["W_dec", "W_enc", "b_enc", "b_pre"]
    sae.save_pretrained(tmp_path)
    loaded = SparseAutoencoder.from_pretrained(tmp_path)
    assert torch.equal(loaded.W_enc, sae.W_enc)
    assert (tmp_path / "model.safetensors").stat().st_size < 1_000_000


def test_the_workflow_is_importable_from_the_package_and_loaded_on_first_use():
    # A notebook user writes `from sbert_sae import run_training, DataArguments`, as the README
    # shows; loading an SAE alone must not import what training and labelling bring in.
    import subprocess
    import sys

    code = (
        "import sys, sbert_sae\n"
        "heavy = [m for m in ('sbert_sae.pipeline', 'sbert_sae.labels', 'sbert_sae.sweep', 'sbert_sae.hub', 'keybert') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from sbert_sae import DataArguments, LabelArguments, SaeArguments, TrainingArguments, run_training, run_labelling\n"
        "import sbert_sae.pipeline, sbert_sae.trainer, sbert_sae.labels\n"
        "assert run_training is sbert_sae.pipeline.run_training and TrainingArguments is sbert_sae.trainer.TrainingArguments\n"
        "assert LabelArguments is sbert_sae.labels.LabelArguments\n"
        "missing = [name for name in sbert_sae.__all__ if not hasattr(sbert_sae, name)]\n"
        "assert not missing, missing\n"
        "assert 'run_families' in dir(sbert_sae)\n"
        "try:\n"
        "    sbert_sae.run_trainig\n"
        "except AttributeError as err:\n"
        "    assert 'run_trainig' in str(err)\n"
        "else:\n"
        "    raise AssertionError('a misspelt name was found')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_loading_a_run_stopped_before_it_finished_says_resume_finishes_it(tmp_path):
    # A run killed before its results were written (its checkpoints, or .finishing/ being moved
    # in) loaded as "has no config.json: not an sbert-sae SAE", with no word of the run.
    from sbert_sae import ModelLoadError

    (tmp_path / "run" / "checkpoints" / "step-000000010").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match=r"stopped before it finished \(checkpoints\): `sbert-sae train \.\.\. --resume`"):
        SparseAutoencoder.from_pretrained(tmp_path / "run")
    make_sae().save_pretrained(tmp_path / "stopped" / ".finishing")
    with pytest.raises(ModelLoadError, match=r"stopped before it finished \(\.finishing\)"):
        SparseAutoencoder.from_pretrained(tmp_path / "stopped")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"not an sbert-sae SAE \(config\.json and model\.safetensors\)$"):
        SparseAutoencoder.from_pretrained(tmp_path / "empty")
