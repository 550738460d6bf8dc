"""--precision: bf16 only on native hardware, autocast for the matrix products and fp32 for everything else (the run's
record, fp32 evaluation and --resume's refusal: tests/test_cli.py, on its bf16 quick run)."""
import argparse

import pytest
import torch

import utils
from conftest import tiny_model


def test_auto_picks_bf16_only_where_the_hardware_has_native_units(monkeypatch):
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # no oneDNN: no bf16 on this CPU
    assert utils.resolve_precision("auto", cpu) == "fp32" and utils.resolve_precision("bf16", cpu) == "bf16"
    # A V100 or T4 emulates bf16: torch says yes only when emulation counts. An A100 or H200 has it natively.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert utils.resolve_precision("auto", cuda) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert utils.resolve_precision("auto", cuda) == "bf16" and utils.resolve_precision("fp32", cuda) == "fp32"
    assert utils.resolve_precision("auto", mps) == "fp32"
    with pytest.raises(ValueError, match="not supported on mps"):
        utils.resolve_precision("bf16", mps)


def epoch_at(precision):
    """-> one seeded epoch of tiny_model on 512 random images: (model, optimizer, stats, Linear output dtypes)."""
    model, dtypes = tiny_model(), set()
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.register_forward_hook(lambda mod, inp, out: dtypes.add(out.dtype))
    x = torch.rand(512, 784, generator=torch.Generator().manual_seed(1))
    args = argparse.Namespace(batch_size=128, epochs=1, schedule="constant", beta_max=1.0, free_bits=0.0, loss="bce",
                              lr=1e-3, lr_schedule="constant", binarize=False, precision=precision)
    opt = utils.make_optimizer(model, args.lr)
    torch.manual_seed(2)
    return model, opt, utils.train_epoch(model, opt, x, args, 1, show_progress=False), dtypes


def test_bf16_autocasts_the_matrix_products_and_keeps_weights_gradients_and_adam_in_fp32():
    model, opt, bf16, dtypes = epoch_at("bf16")
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(t.dtype == torch.float32 for s in opt.state.values() for t in s.values() if t.numel() > 1)
    _, _, fp32, dtypes = epoch_at("fp32")
    assert dtypes == {torch.float32}
    # the same seeded epoch: bf16 rounds every product (so not equal), yet lands within 1% of fp32
    assert bf16["recon"] != fp32["recon"] and bf16["recon"] == pytest.approx(fp32["recon"], rel=0.01)


def test_a_seeded_bf16_epoch_is_repeatable_to_the_bit():
    # the CLI runs that match a reference (tests/test_grid.py, tests/test_faults.py) train in bf16 only where auto
    # picks it: this holds bf16 to it on every CPU
    (a, _, stats_a, _), (b, _, stats_b, _) = epoch_at("bf16"), epoch_at("bf16")
    assert stats_a == stats_b and all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
