import argparse
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import utils
from model import BetaVAE, VAEConfig


def cfg(**kw):
    base = dict(schedule="linear", beta_max=1.0, warmup_epochs=10, epochs=30, cycles=4, cycle_ratio=0.5,
                gamma=1000.0, capacity_max=25.0, lr=2e-3, lr_schedule="cosine")
    return argparse.Namespace(**{**base, **kw})


def test_shapes_and_layer_sizes():
    m = BetaVAE(VAEConfig(hidden=(512, 256), latent_dim=10))
    x = torch.rand(7, 784)
    logits, mu, logvar = m(x)
    assert logits.shape == (7, 784) and mu.shape == (7, 10) and logvar.shape == (7, 10)
    assert m.sample(5).shape == (5, 784)
    enc = [l.weight.shape for l in m.encoder.modules() if isinstance(l, torch.nn.Linear)]
    dec = [l.weight.shape for l in m.decoder.modules() if isinstance(l, torch.nn.Linear)]
    assert enc == [(512, 784), (256, 512), (20, 256)]
    assert dec == [(256, 10), (512, 256), (784, 512)]


def test_reparameterize_uses_the_generator():
    m = BetaVAE(VAEConfig())
    mu, logvar = torch.zeros(3, 10), torch.zeros(3, 10)
    a = m.reparameterize(mu, logvar, torch.Generator().manual_seed(1))
    b = m.reparameterize(mu, logvar, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, m.reparameterize(mu, logvar))


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 3), torch.randn(4, 3) * 0.5
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    z = q.sample((200000,))
    p = torch.distributions.Normal(0.0, 1.0)
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(utils.kl_per_dim(mu, logvar), mc, atol=0.02, rtol=0.02)


def test_free_bits_floor_only_lifts_small_dimensions():
    mu = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 3.0]])
    logvar = torch.zeros(2, 3)
    logits = torch.zeros(2, 784)
    x = torch.full((2, 784), 0.5)
    recon, kl, kl_fb = utils.vae_terms(logits, x, mu, logvar, "bce", free_bits=0.5)
    assert kl.item() == pytest.approx(4.5)           # only the third dim: 0.5 * 3^2
    assert kl_fb.item() == pytest.approx(4.5 + 2 * 0.5)
    assert recon.item() == pytest.approx(784 * math.log(2), rel=1e-5)


def test_free_bits_floor_has_no_gradient_below_lambda():
    mu = torch.full((4, 2), 0.1, requires_grad=True)
    _, _, kl_fb = utils.vae_terms(torch.zeros(4, 784), torch.zeros(4, 784), mu, torch.zeros(4, 2), "bce", 0.5)
    kl_fb.backward()
    assert torch.all(mu.grad == 0)


def test_mse_reconstruction_is_summed_squared_error():
    x = torch.rand(3, 784)
    assert torch.allclose(utils.recon_per_image(torch.zeros(3, 784), x, "mse"), ((x - 0.5) ** 2).sum(-1))


@pytest.mark.parametrize("epoch,beta", [(1, 0.000), (5, 0.444), (10, 1.000), (15, 1.000), (20, 1.000),
                                        (25, 1.000), (30, 1.000)])
def test_linear_schedule_reproduces_published_beta_column(epoch, beta):
    assert f"{utils.get_beta(epoch - 1, cfg()):.3f}" == f"{beta:.3f}"


def test_warmup_zero_means_full_beta_from_the_start():
    assert utils.get_beta(0, cfg(warmup_epochs=0, beta_max=4.0)) == 4.0


def test_cyclical_schedule_known_points():
    c = cfg(schedule="cyclical", epochs=8, cycles=4, cycle_ratio=0.5, beta_max=2.0)  # cycle = 2 epochs
    assert [utils.get_beta(t, c) for t in (0, 0.5, 1.0, 1.5, 2.0, 2.5, 7.99)] == pytest.approx(
        [0, 1.0, 2.0, 2.0, 0, 1.0, 2.0])


@settings(max_examples=100, deadline=None)
@given(epochs=st.integers(1, 60), cycles=st.integers(1, 8))
def test_every_epoch_that_starts_a_cyclical_cycle_starts_at_beta_0(epochs, cycles):
    c = cfg(schedule="cyclical", epochs=epochs, cycles=cycles, cycle_ratio=0.5, beta_max=1.0)
    starts = [e for e in range(epochs) if e * cycles % epochs == 0]  # epoch e + 1 begins a cycle
    assert [utils.get_beta(e, c) for e in starts] == [0.0] * len(starts)


def test_capacity_schedule_known_points():
    c = cfg(schedule="capacity", epochs=10, capacity_max=25.0, gamma=100.0)
    assert [utils.get_capacity(t, c) for t in (0, 5, 10, 12)] == pytest.approx([0, 12.5, 25, 25])
    loss = utils.objective(torch.tensor(50.0), torch.tensor(20.0), torch.tensor(99.0), 5, c)
    assert loss.item() == pytest.approx(50 + 100 * 7.5)


def test_cosine_lr_decays_to_zero():
    c = cfg(lr=1e-3, epochs=10)
    assert [utils.get_lr(t, c) for t in (0, 5, 10)] == pytest.approx([1e-3, 5e-4, 0], abs=1e-12)
    assert utils.get_lr(7, cfg(lr_schedule="constant")) == 2e-3


@settings(max_examples=200, deadline=None)
@given(t=st.floats(0, 50), beta_max=st.floats(0, 10), w=st.integers(0, 20), schedule=st.sampled_from(
    ["linear", "cyclical", "constant"]))
def test_beta_stays_in_range_and_linear_is_monotone(t, beta_max, w, schedule):
    c = cfg(schedule=schedule, beta_max=beta_max, warmup_epochs=w, epochs=50)
    b = utils.get_beta(t, c)
    assert 0 <= b <= beta_max + 1e-12
    if schedule == "linear":
        assert utils.get_beta(t + 0.5, c) >= b
