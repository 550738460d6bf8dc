"""torch.hub entry points: the trained Beta-VAEs committed with this repo, loaded with nothing but torch.

    m = torch.hub.load(".", "beta_vae", source="local")   # from a clone of the repo
    m = torch.hub.load("OWNER/REPO", "beta_vae")          # from GitHub; torch.hub.help("OWNER/REPO", "beta_vae")
"""
import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path  # names torch.hub.list would show as entry points stay private

import torch

dependencies = ["torch"]

HERE = _Path(__file__).resolve().parent


def _network():
    """-> this repo's model.py as a module (it imports only torch; utils.py would pull in sklearn and matplotlib)."""
    # Loaded by path under a name of its own: `import model` would find a user's model.py, or another hub repo's,
    # already in sys.modules, and would leave ours there to shadow theirs.
    name = "beta_vae_mnist_model"
    if name not in _sys.modules:
        spec = _importlib_util.spec_from_file_location(name, HERE / "model.py")
        module = _importlib_util.module_from_spec(spec)
        _sys.modules[name] = module  # before running it: @dataclass looks its module up there
        spec.loader.exec_module(module)
    return _sys.modules[name]


def _load(checkpoint, pretrained):
    """Committed checkpoint (relative to this folder) -> its BetaVAE in eval mode, untrained if not pretrained."""
    # weights_only: the slim checkpoints hold tensors and plain containers only, so nothing else gets unpickled.
    state = torch.load(HERE / checkpoint, map_location="cpu", weights_only=True)
    cfg, network = state["config"], _network()  # the run's argparse dict
    model = network.BetaVAE(network.VAEConfig(hidden=tuple(cfg["hidden"]), latent_dim=cfg["latent_dim"]))
    if pretrained:
        model.load_state_dict(state["model"])
    return model.eval()


def beta_vae(pretrained=True):
    """The reference Beta-VAE (784-512-256-10, grey-level MNIST, 30 epochs), from `checkpoint.pt`.

    Test -ELBO 99.87 ± 0.01 ± 0.29 nats (Monte Carlo error ± test-set error; beta = 1, 10k test images), the
    `test_neg_elbo` of metrics.json; grey levels under a Bernoulli decoder, so it compares only within this repo.

        m = torch.hub.load(".", "beta_vae", source="local")
        with torch.no_grad():
            mu, logvar = m.encode(x.view(-1, 784))      # x: images with pixels in [0, 1]; mu: (B, 10) latent means
            digits = torch.sigmoid(m.decode(mu))       # (B, 784) pixel means; .view(-1, 28, 28) to show them
        samples = m.sample(16)                         # (16, 784) digits decoded from z ~ N(0, I)

    pretrained=False: the same network, untrained. The model is on the CPU in eval mode.
    """
    return _load("checkpoint.pt", pretrained)


def binarized_vae(latent_dim=50, pretrained=True):
    """A Beta-VAE (784-512-256-latent_dim) on dynamically binarized MNIST, from `likelihood/z<latent_dim>/checkpoint.pt`.

    latent_dim 50 (300 epochs): test -ELBO 91.09 ± 0.01 ± 0.25, IW test NLL at K = 5000: 86.22 ± 0.00 ± 0.23 nats.
    latent_dim 10 (30 epochs):  test -ELBO 97.74 ± 0.01 ± 0.30, IW test NLL at K = 5000: 93.69 ± 0.00 ± 0.28 nats.
    (Monte Carlo error ± test-set error, on the fixed binarized test set; likelihood/z<d>/metrics.json.)

        m = torch.hub.load(".", "binarized_vae", source="local", latent_dim=10)
        with torch.no_grad():
            mu, logvar = m.encode(x.view(-1, 784))      # x: images with pixels in [0, 1]; mu: (B, latent_dim)
            digits = torch.sigmoid(m.decode(mu))       # (B, 784) Bernoulli means; .view(-1, 28, 28) to show them
        samples = m.sample(16)                         # (16, 784) digits decoded from z ~ N(0, I)

    pretrained=False: the same network, untrained. The model is on the CPU in eval mode.
    """
    if latent_dim not in (10, 50):
        raise ValueError(f"latent_dim={latent_dim!r}: the binarized runs have latent_dim 10 or 50")
    return _load(f"likelihood/z{int(latent_dim)}/checkpoint.pt", pretrained)  # int: 10.0 names no folder
