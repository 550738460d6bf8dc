"""--precision: bf16 only on native hardware, autocast for the matrix products and fp32 for everything else (the run's
record, fp32 evaluation and --resume's refusal: tests/test_cli.py, on its bf16 quick run)."""
import argparse
import os
import subprocess
import sys

import pytest
import torch

import demo_script
import utils
from conftest import ROOT, tiny_model


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


# ----------------------------------------------------------------------------- float32 denormals flushed (DAZ/FTZ)

HAS_FTZ = torch.set_flush_denormal(False)  # whether this CPU has the mode (asking turns it off in this thread)

# A fresh process, so that torch's OpenMP threads start after the flag (or without it): 2^20 denormals times 1 on both
# of them, and 4 in a Python thread started afterwards -> how many came out non-zero. Made and counted as bits: with
# the flag on, a float literal 1e-39 would already be 0, and a comparison with 0 would read a denormal as 0.
PROBE = ("import threading, torch, demo_script, utils; torch.set_num_threads(2); {flush}"
         "tiny = lambda n: torch.full((n,), 1 << 22, dtype=torch.int32).view(torch.float32); "
         "nonzero = lambda t: int((t * 1.0).view(torch.int32).count_nonzero()); seen = []; "
         "t = threading.Thread(target=lambda: seen.append(nonzero(tiny(4)))); t.start(); t.join(); "
         "print(nonzero(tiny(1 << 20)), seen[0])")


def in_fresh_process(code, *argv):
    """-> stdout of python -c code argv... in the project root, 2 OpenMP threads whatever the machine."""
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout.split()


@pytest.mark.skipif(not HAS_FTZ, reason="this CPU has no flush-to-zero mode")
def test_flush_denormals_reaches_torchs_threads_and_python_threads_started_after_it():
    assert in_fresh_process(PROBE.format(flush="")) == [str(1 << 20), "4"]  # the probe sees denormals otherwise
    assert in_fresh_process(PROBE.format(flush="assert utils.flush_denormals(); ")) == ["0", "0"]


# Resumes a saved bf16 model whose Adam state holds denormals, one epoch of 10 steps, with or without the flag -> how
# many denormals its Adam state holds at the end; saves the weights.
RESUME = """
import argparse, sys, torch, model as m, utils
if sys.argv[1] == "flush":
    utils.flush_denormals()
state = torch.load(sys.argv[2], weights_only=False)
model = m.BetaVAE(state["config"])
model.load_state_dict(state["model"])
opt = utils.make_optimizer(model, 1e-3)
opt.load_state_dict(state["optimizer"])
args = argparse.Namespace(batch_size=128, epochs=1, schedule="constant", beta_max=1.0, free_bits=0.0, loss="bce",
                          lr=1e-3, lr_schedule="constant", binarize=False, precision="bf16")
torch.manual_seed(3)
utils.train_epoch(model, opt, state["x"], args, 1, show_progress=False)
torch.save(model.state_dict(), sys.argv[3])
bits = [s["exp_avg"].view(torch.int32) & 0x7FFFFFFF for s in opt.state.values()]  # as bits: the flag reads them as 0
print(sum(int(((b > 0) & (b < 0x00800000)).sum()) for b in bits))  # a zero exponent field: denormal
"""


@pytest.mark.skipif(not HAS_FTZ, reason="this CPU has no flush-to-zero mode")
def test_flushing_denormals_changes_no_weight(tmp_path):
    # As in MNIST, pixels that are never lit (here a 4-pixel border) give their weights zero gradients, and Adam's
    # first moment for them decays into the denormal range; 30% of every moment is planted there, bit patterns
    # written as integers so that no float operation (flushed or not in this process) touches them.
    x = torch.rand(1280, 28, 28, generator=torch.Generator().manual_seed(1))
    x[:, :4], x[:, -4:], x[:, :, :4], x[:, :, -4:] = 0, 0, 0, 0
    x = x.view(-1, 784)
    model, opt, _, _ = epoch_at("bf16")
    gen = torch.Generator().manual_seed(2)
    for s in opt.state.values():
        m = s["exp_avg"]
        bits = torch.randint(1, 1 << 23, m.shape, generator=gen, dtype=torch.int32).view(torch.float32)
        planted = torch.rand(m.shape, generator=gen) < 0.3
        m[planted] = bits[planted]
    path = tmp_path / "state.pt"
    torch.save({"config": model.config, "model": model.state_dict(), "optimizer": opt.state_dict(), "x": x}, path)
    held = {how: in_fresh_process(RESUME, how, str(path), str(tmp_path / f"{how}.pt")) for how in ("plain", "flush")}
    assert int(held["plain"][0]) > 1000 and held["flush"] == ["0"]  # the plain run computed with denormals
    plain, flushed = (torch.load(tmp_path / f"{how}.pt") for how in ("plain", "flush"))
    assert all(torch.equal(plain[k], flushed[k]) for k in plain)


def test_the_script_flushes_denormals_before_anything_else(monkeypatch):
    calls = []
    monkeypatch.setattr(utils, "flush_denormals", lambda: calls.append(True))
    with pytest.raises(SystemExit):
        demo_script.main(["--help"])  # exits while parsing: the flag must be set by then
    assert calls == [True]
