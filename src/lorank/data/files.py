"""Dataset files: where they are looked for, how they are verified and downloaded, and how
each on-disk format (IDX, CIFAR-10 npz or pickle batches, plain text) is decoded to arrays.

Files are looked up in the dataset roots (``--data-dir``/``DataConfig.dir``, ``$LORANK_DATA``,
``~/.cache/lorank``), verified against known checksums before use, and downloaded into the
first writable root when absent and the network is reachable.

Long because it holds the lookup, checksums, downloads and decoding of every dataset format.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from lorank.errors import LorankError

_T = TypeVar("_T")

# --------------------------------------------------------------------------------------------
# Known files. Checksums are those of the original files (see the shared datasets README).

_IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

_SHA256 = {
    "mnist/train-images-idx3-ubyte.gz": (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    ),
    "mnist/train-labels-idx1-ubyte.gz": (
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    "mnist/t10k-images-idx3-ubyte.gz": (
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    "mnist/t10k-labels-idx1-ubyte.gz": (
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
    "fashion-mnist/train-images-idx3-ubyte.gz": (
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"
    ),
    "fashion-mnist/train-labels-idx1-ubyte.gz": (
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"
    ),
    "fashion-mnist/t10k-images-idx3-ubyte.gz": (
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"
    ),
    "fashion-mnist/t10k-labels-idx1-ubyte.gz": (
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"
    ),
    "tinyshakespeare/input.txt": (
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    ),
}

# The npz files are re-zipped copies, so their file hashes vary; the array contents do not.
_CIFAR_NPZ_SHA256 = {
    "cifar10-train.npz": {
        "images": "47af8b02cfcfb6cdf3dbbd1969ad7f1b70f4413f6f80f437b020ee4e5bc8304a",
        "labels": "2b7cd2f24487317614016b72ffd53071c3062f592f0eb300c18a770d41ae1253",
    },
    "cifar10-test.npz": {
        "images": "f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04",
        "labels": "cec8a24a1e92aa2ecaa0bbd3dbfa86bf6cd8759fbd209a832824c8cf0afca9d5",
    },
}

# Unpickling runs code, so a batch is only unpickled once its md5 equals the original's.
_CIFAR_PICKLE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_TAR_MD5 = "c58f30108f718f92721af3b95e74349a"

_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "tinyshakespeare": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
    ),
}

_BUNDLED_ROOT = Path(__file__).resolve().parent.parent / "data_files"

_DOWNLOAD_TIMEOUT_S = 30.0
_OFFLINE_ENV = "LORANK_OFFLINE"

# In-process caches keyed by (path, mtime_ns, size), so a replaced file is looked at again.
_VERIFIED: set[tuple[tuple[str, int, int], str]] = set()
_DECODED: dict[tuple[str, int, int], Any] = {}


# --------------------------------------------------------------------------------------------
# Finding, verifying and downloading files


def data_roots(data_dir: str | Path | None = None) -> list[Path]:
    """The dataset roots in lookup order: ``data_dir``, ``$LORANK_DATA``, ``~/.cache/lorank``."""
    candidates = [data_dir, os.environ.get("LORANK_DATA"), Path.home() / ".cache" / "lorank"]
    roots: list[Path] = []
    for c in candidates:
        if c is None or str(c) == "":
            continue
        p = Path(c).expanduser()
        if p not in roots:
            roots.append(p)
    return roots


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def _hash_file(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_file_hash(path: Path, algorithm: str, expected: str, fix: str) -> None:
    """Raise a one-line LorankError unless ``path`` has the expected digest (cached per process)."""
    key = (_file_key(path), algorithm)
    if key in _VERIFIED:
        return
    actual = _hash_file(path, algorithm)
    if actual != expected:
        raise LorankError(
            f"{path} is corrupt ({algorithm} mismatch: expected {expected[:12]}..., "
            f"got {actual[:12]}...); {fix}"
        )
    _VERIFIED.add(key)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _roots_text(roots: list[Path]) -> str:
    return ", ".join(str(r) for r in roots)


def _writable_root(roots: list[Path]) -> Path | None:
    for root in roots:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(root, os.W_OK):
            return root
    return None


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` into ``dest`` atomically (temp file + rename), so no partial file remains."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response,
        ):
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _try_download(url: str, rel: str, roots: list[Path]) -> tuple[Path | None, str]:
    """Download ``url`` to ``<first writable root>/rel``; return (path, "") or (None, reason)."""
    if os.environ.get(_OFFLINE_ENV, "") not in ("", "0"):
        return None, f"downloads are disabled by ${_OFFLINE_ENV}"
    root = _writable_root(roots)
    if root is None:
        return None, "no root is writable for a download"
    dest = root / rel
    try:
        _download(url, dest)
    except Exception as e:  # urllib raises several unrelated types; all mean "no download"
        return None, f"download from {url} failed: {_one_line(e)}"
    return dest, ""


def _locate(rel: str, roots: list[Path]) -> Path | None:
    for root in roots:
        p = root / rel
        if p.is_file():
            return p
    return None


def _find_or_fetch(
    rel: str, roots: list[Path], url: str, how: str, fallback: Path | None = None
) -> Path:
    """Find ``rel`` under the roots (then ``fallback``), else download it into a root.

    Fails with a one-line message naming the file, every place searched and how to fix it.
    """
    searched = [*roots, fallback] if fallback is not None else roots
    path = _locate(rel, searched)
    if path is not None:
        return path
    path, reason = _try_download(url, rel, roots)
    if path is not None:
        return path
    raise LorankError(f"{rel} not found in {_roots_text(searched)} ({reason}); {how}")


# --------------------------------------------------------------------------------------------
# Decoding


def _parse_idx(path: Path, fix: str) -> np.ndarray:
    """Decode a gzip IDX file of unsigned bytes (the MNIST format) into a uint8 array."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        raise LorankError(f"{path} is corrupt (bad gzip: {_one_line(e)}); {fix}") from None
    if len(raw) < 4:
        raise LorankError(f"{path} is corrupt (truncated IDX header); {fix}")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise LorankError(f"{path} is corrupt (bad IDX magic {raw[:4].hex()}); {fix}")
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) != header + math.prod(dims):
        raise LorankError(
            f"{path} is corrupt (IDX size {len(raw) - header} != header dims {dims}); {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _cached(path: Path, decode: Callable[[], _T]) -> _T:
    """``decode()`` once per process for each version (path, mtime, size) of a file."""
    key = _file_key(path)
    if key not in _DECODED:
        _DECODED[key] = decode()
    return _DECODED[key]


def load_idx_dataset(name: str, roots: list[Path]) -> dict[str, np.ndarray]:
    """MNIST / Fashion-MNIST as uint8 images (N, 1, 28, 28) and uint8 labels (N,)."""
    # The package ships MNIST, so the default run works offline with no data folder at all.
    fallback = _BUNDLED_ROOT if name == "mnist" else None
    how = (
        f"place the four IDX files ({', '.join(_IDX_NAMES)}) in {roots[0] / name}/ "
        "or pass --data-dir / set LORANK_DATA"
    )
    fix = "delete it and run again to re-download it, or copy the original file again"
    arrays: dict[str, np.ndarray] = {}
    for fname in _IDX_NAMES:
        rel = f"{name}/{fname}"
        path = _find_or_fetch(rel, roots, _URLS[name] + fname, how, fallback)
        _check_file_hash(path, "sha256", _SHA256[rel], fix)
        arrays[fname] = _cached(path, lambda p=path: _parse_idx(p, fix))
    out: dict[str, np.ndarray] = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = arrays[f"{prefix}-images-idx3-ubyte.gz"]
        labels = arrays[f"{prefix}-labels-idx1-ubyte.gz"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise LorankError(
                f"{name} {split} images {images.shape} and labels {labels.shape} do not match; "
                f"{how}"
            )
        out[f"{split}_x"] = images[:, None]
        out[f"{split}_y"] = labels
    return out


def _load_npz(path: Path, fix: str) -> tuple[np.ndarray, np.ndarray]:
    expected = _CIFAR_NPZ_SHA256[path.name]
    try:
        with np.load(path, allow_pickle=False) as f:
            images, labels = f["images"], f["labels"]
    except Exception as e:  # zip, key and format errors all mean the file is unusable
        raise LorankError(f"{path} is corrupt (cannot read npz: {_one_line(e)}); {fix}") from None
    for array_name, array in (("images", images), ("labels", labels)):
        # hashing the C-order buffer equals hashing .tobytes(), without the copy
        digest = hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()
        if digest != expected[array_name]:
            raise LorankError(
                f"{path} is corrupt (sha256 mismatch of its {array_name} array); {fix}"
            )
    # NHWC (as stored) -> NCHW (as PyTorch convolutions expect)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels


def _load_pickle_batch(path: Path, fix: str) -> tuple[np.ndarray, np.ndarray]:
    _check_file_hash(path, "md5", _CIFAR_PICKLE_MD5[path.name], f"refusing to unpickle it; {fix}")
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")  # safe: md5 equals the original's
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise LorankError(f"{path} is corrupt (unexpected array shapes); {fix}")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_layouts(roots: list[Path]) -> Iterator[tuple[str, Path]]:
    """Candidate CIFAR-10 folders in lookup order: per root, npz first, then pickle batches."""
    for root in roots:
        yield "npz", root / "cifar-10"
        yield "pickle", root / "cifar-10-batches-py"
        yield "pickle", root / "cifar-10" / "cifar-10-batches-py"


def _layout_files(kind: str) -> list[str]:
    if kind == "npz":
        return list(_CIFAR_NPZ_SHA256)
    return [*_CIFAR_TRAIN_BATCHES, "test_batch"]


def _download_cifar_batches(roots: list[Path]) -> tuple[Path | None, str]:
    """Download the original archive and extract only the six known batch files from it."""
    tar_path, reason = _try_download(_CIFAR_TAR_URL, "cifar-10-python.tar.gz", roots)
    if tar_path is None:
        return None, reason
    try:
        if _hash_file(tar_path, "md5") != _CIFAR_TAR_MD5:
            return None, f"downloaded {tar_path} does not match the known md5"
        dest = tar_path.parent / "cifar-10-batches-py"
        dest.mkdir(exist_ok=True)
        wanted = {f"cifar-10-batches-py/{n}": n for n in _CIFAR_PICKLE_MD5}
        with tarfile.open(tar_path, "r:gz") as tar:
            for member in tar.getmembers():
                name = wanted.get(member.name)
                if name is None or not member.isfile():
                    continue  # never extract unexpected names, links or directories
                src = tar.extractfile(member)
                assert src is not None
                fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.", suffix=".part")
                with os.fdopen(fd, "wb") as out:
                    out.write(src.read())
                os.replace(tmp, dest / name)
    except (OSError, tarfile.TarError) as e:
        return None, f"extracting {tar_path} failed: {_one_line(e)}"
    finally:
        tar_path.unlink(missing_ok=True)
    return dest, ""


def load_cifar10(roots: list[Path]) -> dict[str, np.ndarray]:
    """CIFAR-10 as uint8 images (N, 3, 32, 32) and uint8 labels (N,), from npz or pickles."""
    how = (
        f"place cifar10-train.npz and cifar10-test.npz in {roots[0] / 'cifar-10'}/ (or the "
        "original cifar-10-batches-py/ folder in the root) or pass --data-dir / set LORANK_DATA"
    )
    fix = "delete it and run again to re-download it, or copy the original file again"
    found: tuple[str, Path] | None = None
    for kind, folder in _cifar_layouts(roots):
        if all((folder / f).is_file() for f in _layout_files(kind)):
            found = (kind, folder)
            break
    if found is None:
        folder, reason = _download_cifar_batches(roots)
        if folder is None:
            raise LorankError(
                "cifar-10/cifar10-train.npz, cifar-10/cifar10-test.npz or "
                f"cifar-10-batches-py/{{data_batch_1..5,test_batch}} not found in "
                f"{_roots_text(roots)} ({reason}); {how}"
            )
        found = ("pickle", folder)
    kind, folder = found
    if kind == "npz":
        train = _cached(
            folder / "cifar10-train.npz", lambda: _load_npz(folder / "cifar10-train.npz", fix)
        )
        test = _cached(
            folder / "cifar10-test.npz", lambda: _load_npz(folder / "cifar10-test.npz", fix)
        )
    else:
        parts = [
            _cached(folder / n, lambda p=folder / n: _load_pickle_batch(p, fix))
            for n in _CIFAR_TRAIN_BATCHES
        ]
        train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        test = _cached(
            folder / "test_batch", lambda: _load_pickle_batch(folder / "test_batch", fix)
        )
    return {"train_x": train[0], "train_y": train[1], "test_x": test[0], "test_y": test[1]}


def load_text(roots: list[Path]) -> str:
    rel = "tinyshakespeare/input.txt"
    how = f"place input.txt in {roots[0] / 'tinyshakespeare'}/ or pass --data-dir / set LORANK_DATA"
    fix = "delete it and run again to re-download it, or copy the original file again"
    path = _find_or_fetch(rel, roots, _URLS["tinyshakespeare"] + "input.txt", how)
    _check_file_hash(path, "sha256", _SHA256[rel], fix)
    return _cached(path, lambda: path.read_text(encoding="utf-8"))
