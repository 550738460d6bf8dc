"""torch.hub: hubconf.py's entry points are the committed checkpoints, and loading them needs nothing beyond torch."""
import inspect
import subprocess
import sys

import pytest
import torch

import data
import utils
from conftest import ROOT
from model import BetaVAE, VAEConfig


def hub_load(entry, **kwargs):
    """An entry point of this checkout's hubconf.py, the way a user loads it."""
    return torch.hub.load(str(ROOT), entry, source="local", **kwargs)


def direct(checkpoint):
    """The checkpoint loaded the project's own way, into a BetaVAE."""
    state = utils.load_checkpoint(ROOT / checkpoint)
    model = BetaVAE(VAEConfig(hidden=tuple(state["config"]["hidden"]), latent_dim=state["config"]["latent_dim"]))
    model.load_state_dict(state["model"])
    return model


@pytest.fixture(scope="module")
def mnist_test_images(mnist_dir):
    """The first 16 real MNIST test images, (16, 784) in [0, 1]."""
    return data.load_dataset(mnist_dir, "mnist")[2][:16]


@pytest.mark.parametrize("entry, kwargs, checkpoint", [
    ("beta_vae", {}, "checkpoint.pt"),
    ("binarized_vae", {"latent_dim": 10}, "likelihood/z10/checkpoint.pt"),
    ("binarized_vae", {"latent_dim": 10.0}, "likelihood/z10/checkpoint.pt"),  # a float that equals 10 is 10
    ("binarized_vae", {}, "likelihood/z50/checkpoint.pt")])  # its default: the 50-d model
def test_hub_models_are_the_committed_checkpoints_in_eval_mode(entry, kwargs, checkpoint, mnist_test_images):
    m = hub_load(entry, **kwargs)
    assert type(m).__name__ == "BetaVAE" and inspect.getfile(type(m)) == str(ROOT / "model.py") and not m.training
    with torch.no_grad():
        mu, _ = m.encode(mnist_test_images.view(-1, 784))
    assert torch.equal(mu, utils.encode_means(direct(checkpoint), mnist_test_images)[0])
    assert m.sample(2).shape == (2, 784)


def test_pretrained_false_is_the_same_network_untrained():
    trained, untrained = hub_load("beta_vae"), hub_load("beta_vae", pretrained=False)
    assert untrained.config == trained.config and not untrained.training
    assert not torch.equal(untrained.encoder[-1].weight, trained.encoder[-1].weight)


def test_bad_entry_point_and_latent_size_are_named():
    with pytest.raises(RuntimeError, match="no_such_model"):
        hub_load("no_such_model")
    with pytest.raises(ValueError, match="10 or 50"):
        hub_load("binarized_vae", latent_dim=7)


# Run in a fresh interpreter (this one has imported utils, data and what they pull in): import hubconf, load both
# models, then print the modules it should not have needed: the repo's own beyond model.py, and the heavy packages.
FRESH_IMPORT = """
import sys
from pathlib import Path
root = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(root))
import hubconf
hubconf.beta_vae(), hubconf.binarized_vae(10)
files = {name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())}
ours = {name for name, f in files.items() if f and Path(f).resolve().is_relative_to(root)}
ours -= {"hubconf", "beta_vae_mnist_model"}  # the latter is model.py
heavy = {"sklearn", "matplotlib", "scipy", "torchvision", "pandas"} & {name.split(".")[0] for name in files}
print(sorted(ours | heavy))
"""


def test_hubconf_needs_nothing_beyond_torch():
    out = subprocess.run([sys.executable, "-c", FRESH_IMPORT, str(ROOT)], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_hub_lists_only_the_entry_points():
    import hubconf  # torch.hub.list lists every public callable of hubconf.py (torch/hub.py, list())
    assert sorted(f for f in dir(hubconf) if callable(getattr(hubconf, f)) and not f.startswith("_")) == [
        "beta_vae", "binarized_vae"]


# A user's own model.py imported first, the way a notebook next to it would: loading must neither fail on it nor
# replace it in sys.modules.
SHADOWED = """
import sys, types, torch
sys.modules["model"] = theirs = types.ModuleType("model")
m = torch.hub.load(sys.argv[1], "beta_vae", source="local")
print(type(m).__name__, sys.modules["model"] is theirs)
"""


def test_a_users_own_model_module_neither_breaks_nor_is_replaced():
    out = subprocess.run([sys.executable, "-c", SHADOWED, str(ROOT)], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["BetaVAE", "True"]
