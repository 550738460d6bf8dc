"""A fully connected Beta-VAE (Kingma & Welling 2014; Higgins et al. 2017). Only the network lives here."""
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VAEConfig:
    """Layer sizes: input (784 for 28x28), encoder hidden widths (the decoder mirrors them), latent z."""
    input_dim: int = 784
    hidden: tuple = (512, 256)
    latent_dim: int = 10


def mlp(sizes):
    """sizes [d0, ..., dn] -> Linear layers (B, d0) -> (B, dn), ReLU between them, none after the last."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class BetaVAE(nn.Module):
    """Gaussian encoder q(z|x), Bernoulli-logit decoder p(x|z), prior N(0, I)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        hidden = list(config.hidden)
        # One head emits (mu, logvar) together: a single matmul instead of two.
        self.encoder = nn.Sequential(mlp([config.input_dim, *hidden]), nn.ReLU(),
                                     nn.Linear(hidden[-1], 2 * config.latent_dim))
        self.decoder = mlp([config.latent_dim, *reversed(hidden), config.input_dim])

    def encode(self, x):
        """x: (B, 784) -> mu, logvar: (B, z)."""
        return self.encoder(x).chunk(2, dim=-1)

    def reparameterize(self, mu, logvar, generator=None):
        """mu, logvar: (..., z) -> z: (..., z), one draw from N(mu, exp(logvar))."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eps * torch.exp(0.5 * logvar)

    def decode(self, z):
        """z: (..., z) -> Bernoulli logits (..., 784)."""
        return self.decoder(z)

    def forward(self, x):
        """x: (B, 784) -> logits (B, 784), mu (B, z), logvar (B, z)."""
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar

    @torch.no_grad()
    def sample(self, n, generator=None):
        """-> (n, 784) pixel means of digits decoded from z ~ N(0, I)."""
        weight = next(self.parameters())  # z on the decoder's device and in its dtype
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=weight.device, dtype=weight.dtype)
        return torch.sigmoid(self.decode(z))
