"""Every model-side function keeps its tensors on its inputs' device and dtype, checked without a GPU.

Two checks over one table. (1) Functions that need no real values run with the model and inputs on PyTorch's `meta`
device, which raises on a mix of devices just as CUDA does. (2) Every function runs on the CPU in float64 with `meta`
as the default device: a tensor made without naming its device lands on `meta` and fails the call, or shows up in the
output; one made without the inputs' dtype meets float64 weights and fails, or shows up as float32.
"""
import argparse
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data
import measures
import utils
from model import BetaVAE, VAEConfig

ARGS = argparse.Namespace(batch_size=8, epochs=1, loss="bce", free_bits=0.5, schedule="linear", beta_max=1.0,
                          warmup_epochs=2, cycles=1, cycle_ratio=0.5, gamma=10.0, capacity_max=5.0, lr=1e-3, precision="fp32",
                          lr_schedule="cosine", seed=0, binarize=True)


def mu(model, x):
    return model.encode(x)[0]


def losses(model, x, schedule):
    logits, m, logvar = model(x)
    terms = utils.vae_terms(logits, x, m, logvar, "bce", free_bits=0.5)
    return terms, utils.objective(*terms, 0.5, argparse.Namespace(**{**vars(ARGS), "schedule": schedule}))


def train_epoch(model, x):
    return utils.train_epoch(model, utils.make_optimizer(model, 1e-3), x, ARGS, 1, show_progress=False)


def analysis_figures(model, x):
    y = np.arange(len(x)) % 10  # two of each class: the interpolations take each class's second example
    m, logvar = utils.encode_means(model, x)
    with tempfile.TemporaryDirectory() as out:
        kl, dims, values = utils.kl_per_dim(m, logvar).mean(0), list(range(m.shape[1])), [-1.0, 0.0, 1.0]
        traversal = (utils.traversal_images(model, m[:2], dims, values), dims, values)
        factors = dict(mi=np.random.default_rng(0).random((m.shape[1], 6)).tolist(),
                       atlas=[dict(dim=0, factor="slant", rho=0.9, effect_sd=1.5)])
        measures.analysis_figures(model, x, y, m, (kl, utils.active_units(m)), np.random.default_rng(0).random(
            (len(x), 2)), y, traversal, factors, ARGS, Path(out), [str(c) for c in range(10)])
        return sorted(p.name for p in Path(out).iterdir())


# name -> (call(model, x) -> output, None if it runs on `meta`, else why it needs real values). Add new functions here.
FUNCTIONS = {
    "BetaVAE.encode": (lambda m, x: m.encode(x), None),
    "BetaVAE.reparameterize": (lambda m, x: m.reparameterize(*m.encode(x)), None),
    "BetaVAE.decode": (lambda m, x: m.decode(mu(m, x)), None),
    "BetaVAE.forward": (lambda m, x: m(x), None),
    "BetaVAE.sample": (lambda m, x: m.sample(5), None),
    "BetaVAE.sample with a generator": (
        lambda m, x: m.sample(5, generator=torch.Generator(device=x.device).manual_seed(0)),
        "a torch.Generator cannot be made on meta"),
    "utils.kl_per_dim": (lambda m, x: utils.kl_per_dim(*m.encode(x)), None),
    "utils.recon_per_image bce": (lambda m, x: utils.recon_per_image(m(x)[0], x, "bce"), None),
    "utils.recon_per_image mse": (lambda m, x: utils.recon_per_image(m(x)[0], x, "mse"), None),
    "utils.vae_terms, objective linear": (lambda m, x: losses(m, x, "linear"), None),
    "utils.vae_terms, objective capacity": (lambda m, x: losses(m, x, "capacity"), None),
    "utils.active_units": (lambda m, x: utils.active_units(mu(m, x)), None),
    "utils.reconstruct": (lambda m, x: utils.reconstruct(m, x), None),
    "utils.reconstruction_pairs": (lambda m, x: utils.reconstruction_pairs(x[:4], utils.reconstruct(m, x[:4]), 2),
                                   None),
    "utils.traversal_images": (lambda m, x: utils.traversal_images(m, mu(m, x)[:2], [0, 2], [-1.0, 0.0, 1.0]), None),
    "utils.interpolation_images": (lambda m, x: utils.interpolation_images(m, mu(m, x)[:3], mu(m, x)[3:6], 5), None),
    "utils.log_normal": (lambda m, x: utils.log_normal(mu(m, x), *m.encode(x)), None),
    "measures.aggregate_log_densities": (lambda m, x: measures.aggregate_log_densities(mu(m, x)[:4], *m.encode(x)), None),
    "measures.kl_decomposition_terms": (lambda m, x: measures.kl_decomposition_terms(*m.encode(x), max_elements=100), None),
    "measures.iw_log_weights": (lambda m, x: measures.iw_log_weights(m, x, *m.encode(x), 3, "bce", None), None),
    "utils.train_epoch": (train_epoch, ".item() for the progress bar and the NaN check's batch number, .tolist()"),
    "utils.encode_means": (lambda m, x: utils.encode_means(m, x, batch_size=7), "returns its means .cpu()"),
    "utils.evaluate": (lambda m, x: utils.evaluate(m, x, "bce", batch_size=8, draws=2),
                       "a torch.Generator cannot be made on meta; .item() of the sums"),
    "measures.iw_log_likelihood": (lambda m, x: measures.iw_log_likelihood(m, x, 3, "bce", chunk=12),
                                "a torch.Generator cannot be made on meta; returns .cpu()"),
    "utils.neg_elbo_per_image": (lambda m, x: utils.neg_elbo_per_image(m, x, "bce", batch_size=8, draws=2),
                                 "a torch.Generator cannot be made on meta; returns .cpu()"),
    "measures.kl_decomposition": (lambda m, x: measures.kl_decomposition(*(t.detach() for t in m.encode(x))),
                               "a torch.Generator cannot be made on meta; float() of the means"),
    "data.binarized": (lambda m, x: data.binarized(x, seed=0), "a torch.Generator cannot be made on meta"),
    "utils.decoded_images": (lambda m, x: utils.decoded_images(m, mu(m, x).tolist()), "returns numpy on the CPU"),
    "measures.analysis_figures": (analysis_figures, "numpy, scikit-learn and matplotlib"),
}
ON_META = [name for name, (_, needs_values) in FUNCTIONS.items() if needs_values is None]


def model_and_batch(device, dtype):
    """A small seeded model and 20 images (two per class for the figures) on `device` in `dtype`."""
    utils.set_seed(0)
    model = BetaVAE(VAEConfig(hidden=(16, 8), latent_dim=3)).to(device=device, dtype=dtype)
    x = torch.rand(20, 784, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    return model, x


def leaves(out):
    """Every tensor and array in a (nested) output."""
    if isinstance(out, (tuple, list)):
        return [leaf for o in out for leaf in leaves(o)]
    if isinstance(out, dict):
        return leaves(list(out.values()))
    return [out] if isinstance(out, (torch.Tensor, np.ndarray)) else []


class GeneratorNamingItsDevice(torch.Generator):
    """torch.Generator() is a CPU generator whatever the data's device, so here it must be given one."""

    def __new__(cls, device=None):
        assert device is not None, "torch.Generator() without a device: a CPU generator on any device"
        return super().__new__(cls, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ON_META)
def test_runs_on_the_meta_device(name, dtype):
    model, x = model_and_batch("meta", dtype)
    out = leaves(FUNCTIONS[name][0](model, x))
    assert out and all(t.device.type == "meta" for t in out)
    assert all(t.dtype == dtype for t in out if t.is_floating_point())


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_no_tensor_is_made_on_the_default_device(name, monkeypatch):
    model, x = model_and_batch("cpu", torch.float64)
    monkeypatch.setattr(torch, "Generator", GeneratorNamingItsDevice)
    with torch.device("meta"):  # the default device from here on: what names no device is made there
        out = FUNCTIONS[name][0](model, x)
    assert out is not None
    for t in leaves(out):
        assert isinstance(t, np.ndarray) or t.device.type == "cpu"
        assert t.dtype in (torch.float64, np.float64) or not (np.issubdtype(t.dtype, np.floating)
                                                                if isinstance(t, np.ndarray) else t.is_floating_point())


def test_the_default_device_check_catches_a_tensor_made_without_a_device():
    def made_on_the_default_device(model, x):
        return x * torch.linspace(0, 1, x.shape[1], dtype=x.dtype)
    model, x = model_and_batch("cpu", torch.float64)
    with torch.device("meta"), pytest.raises(RuntimeError, match="meta"):
        made_on_the_default_device(model, x)


# ----------------------------------------------------------------------------- GPU generators in checkpoints, mocked

def small_state(on_mps=False):
    """checkpoint_state of a small CPU model; on_mps: as if its parameters were on an Apple GPU."""
    model = BetaVAE(VAEConfig(hidden=(8,), latent_dim=2))
    opt = utils.make_optimizer(model, 1e-3)
    if on_mps:
        model.parameters = lambda: iter([SimpleNamespace(device=torch.device("mps"))])  # all checkpoint_state reads
    return utils.checkpoint_state(model, opt, 1, {}, [])


def test_a_run_asks_cuda_for_no_generator_before_cuda_starts_and_resumes_on_fewer_gpus(monkeypatch):
    def never():
        raise AssertionError("asked before CUDA started: that starts it, a context per process of a CPU run")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with a GPU, which this run leaves alone
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", never)
    state = small_state()
    assert state["cuda_rng"] == []
    restored, two_gpus = {}, [torch.full((4,), i, dtype=torch.uint8) for i in (1, 2)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.__setitem__(i, s))
    utils.restore_rng({**state, "cuda_rng": two_gpus})  # written on two GPUs, resumed on one: its own restored
    assert list(restored) == [0] and torch.equal(restored[0], two_gpus[0])


def test_the_mps_generator_is_saved_and_restored_for_a_model_on_mps_only(monkeypatch):
    mps_state, restored = torch.arange(8, dtype=torch.uint8), []
    monkeypatch.setattr(utils, "has_mps", lambda: True)
    monkeypatch.setattr(torch.mps, "set_rng_state", restored.append)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: pytest.fail("a CPU run on a Mac asked MPS for its state"))
    assert small_state()["mps_rng"] is None
    monkeypatch.setattr(torch.mps, "get_rng_state", mps_state.clone)
    state = small_state(on_mps=True)
    utils.restore_rng(state)
    assert torch.equal(state["mps_rng"], mps_state) and len(restored) == 1 and torch.equal(restored[0], mps_state)
    utils.restore_rng({k: v for k, v in state.items() if k != "mps_rng"})  # written before MPS states were saved
    assert len(restored) == 1
