"""demo.ipynb, executed top to bottom in a fresh kernel with a quick configuration."""
import hashlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOK = ROOT / "demo.ipynb"
# The reference run's files as collected, before any notebook runs: the notebook must never write over them.
REFERENCE_FILES = {name: hashlib.sha256((ROOT / name).read_bytes()).hexdigest() for name in ("checkpoint.pt", "loss.txt")}
# Run after the notebook in the same kernel: moves the first (largest-KL) slider of the latent explorer by 1 towards 0.
EXPLORER_PROBE = """\
before, first = explorer["image"].value, explorer["sliders"][0]
first.value -= 1.0 if first.value > 0 else -1.0
print(f"explorer: {len(explorer['sliders'])} sliders, image changed: {explorer['image'].value != before}")"""


def quick_notebook(data_dir, out_dir, **extra):
    """The notebook with its parameters cell extended by quick overrides (as papermill would inject them)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "demo.ipynb needs exactly one cell tagged 'parameters'"
    overrides = {**dict(EPOCHS=1, LIMIT=3000, TEST_LIMIT=1000, TSNE_POINTS=500, KMEANS_SEEDS=2, LOAD_CHECKPOINT=False,
                        DATA_DIR=str(data_dir), OUT_DIR=str(out_dir)), **extra}
    params[0].source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
    return nb


def execute(nb):
    # cwd = repo root, as for a user who opens the notebook there; a cell error raises CellExecutionError.
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    return nb


@pytest.fixture(scope="module")
def executed(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("notebook_out")
    nb = quick_notebook(mnist_dir, out)
    nb.cells.append(nbformat.v4.new_code_cell(EXPLORER_PROBE, id="explorer-probe"))
    return execute(nb), out


def outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def text_of(nb):
    parts = []
    for o in outputs(nb):
        parts.append(o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", ""))
        parts.append(o.get("data", {}).get("text/markdown", ""))
    return "\n".join(parts)


def test_notebook_runs_without_errors(executed):
    nb, _ = executed
    errors = [o for o in outputs(nb) if o.output_type == "error"]
    assert not errors, "\n".join(f"{e.ename}: {e.evalue}" for e in errors)
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")


def test_notebook_shows_its_figures(executed):
    nb, _ = executed
    # digits, β schedule, latent before, curves, latent after, KL per dim, confusion, 2 t-SNE, samples, recons, traversals,
    # the latent explorer's static image
    images = [o for o in outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) >= 13


def test_notebook_reports_the_metrics(executed):
    nb, _ = executed
    text = text_of(nb)
    assert re.search(r"epoch +1 .*test -ELBO \d+\.\d+", text)
    neg_elbo = float(re.search(r"test -ELBO (\d+\.\d+) nats.*Monte Carlo std error \d\.\d\d", text).group(1))
    assert 80 < neg_elbo < 300  # an untrained model scores ~545; one quick epoch already gets well under 300
    acc = float(re.search(r"ACC (\d\.\d+) ± \d\.\d+", text).group(1))
    assert 0.1 < acc <= 1.0
    assert "| Epoch | β | Total Loss |" in text  # the loss.txt table, rendered as Markdown
    mig, sap, d = map(float, re.search(r"MIG (\d\.\d+) +SAP (\d\.\d+) +DCI disentanglement (\d\.\d+)", text).groups())
    assert 0 <= mig <= 1 and 0 <= sap <= 1 and 0 <= d <= 1
    assert re.search(r"slant +top dimension z\d", text)  # one line per Morpho-MNIST factor


def test_notebook_latent_explorer_redraws_when_a_slider_moves(executed):
    nb, _ = executed
    cell = next(c for c in nb.cells if c.get("id") == "explorer")
    shown = [o.data for o in cell.outputs if o.output_type == "display_data"]
    # one output: the live panel for Jupyter and Colab, with its first image as PNG for static viewers
    assert len(shown) == 1 and {"application/vnd.jupyter.widget-view+json", "image/png"} <= set(shown[0])
    assert "explorer: 10 sliders, image changed: True" in text_of(nb)


def test_notebook_writes_into_out_dir(executed):
    _, out = executed
    # the checkpoint goes to OUT_DIR, never over the reference checkpoint.pt at the repo root
    figures = {f"{name}.png" for name in (
        "digits", "latent_dist_before_train", "train_loss", "latent_dist_after_train", "kl_per_dim", "confusion",
        "tsne", "kmean", "generated_num", "reconstructions", "traversals", "factors")}
    assert {"checkpoint.pt", "loss.txt"} | figures <= {f.name for f in out.iterdir()}
    assert {name: hashlib.sha256((ROOT / name).read_bytes()).hexdigest() for name in REFERENCE_FILES} == REFERENCE_FILES


def test_notebook_analyses_a_saved_checkpoint(executed, mnist_dir, tmp_path):
    trained, out = executed
    nb = quick_notebook(mnist_dir, tmp_path, LOAD_CHECKPOINT=True, CHECKPOINT=str(out / "checkpoint.pt"))
    ids = [c.get("id") for c in nb.cells]
    assert "after" in ids, "the test stops after the cell with id 'after' (latent space after training)"
    nb.cells = nb.cells[:ids.index("after") + 1]  # loading and the first analysis cells; the rest is as above
    text = text_of(execute(nb))
    assert f"loaded {out / 'checkpoint.pt'} (epoch 1 of 1" in text
    assert "| Epoch | β | Total Loss |" in text
    elbo = re.compile(r"test -ELBO (\d+\.\d+) nats")
    # evaluate() draws fixed noise: the same weights give the same number to the last digit
    assert elbo.search(text).group(1) == elbo.search(text_of(trained)).group(1)


def test_stored_notebook_is_clean():
    """What is committed: real-default parameters, outputs to render on GitHub, no local metadata."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert set(nb.metadata) <= {"kernelspec", "language_info"}
    assert nb.metadata.kernelspec.name == "python3"
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    for line in ("EPOCHS = 30", "LIMIT = None", "LATENT_DIM = 10", "BETA_MAX = 1.0", "FREE_BITS = 0.5",
                 'DEVICE = "auto"', "LOAD_CHECKPOINT = False"):
        assert line in params.source
    assert not [c.id for c in nb.cells if "execution" in c.metadata]
    assert any("image/png" in o.get("data", {}) for o in outputs(nb))
