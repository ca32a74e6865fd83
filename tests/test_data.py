import dataclasses
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
import torch.nn.functional as F

import lorank.data.datasets as datasets
import lorank.data.files as data
from lorank.data import DataConfig, Dataset, DatasetInfo, load_dataset
from lorank.errors import LorankError

IDX_NAMES = data._IDX_NAMES


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Roots that hold nothing, and any download attempt fails the test instead of reaching out."""
    empty = tmp_path / "empty"
    monkeypatch.setenv("LORANK_DATA", str(tmp_path / "env-root"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def no_network(url, dest):
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(data, "_download", no_network)
    monkeypatch.setenv("LORANK_OFFLINE", "1")
    return empty


def channel_stats(batches):
    """Per-channel mean and std over all batches, accumulated without concatenating."""
    n, total, squares = 0, 0.0, 0.0
    for x, _ in batches:
        n += x.numel() // x.shape[1]
        total = total + x.sum(dim=(0, 2, 3)).double()
        squares = squares + (x * x).sum(dim=(0, 2, 3)).double()
    mean = total / n
    return mean, (squares / n - mean * mean).sqrt()


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# --- real files ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_datasets_parse(name, data_root):
    ds = load_dataset(DataConfig(name=name), data_dir=data_root)
    info = ds.info
    assert (info.task, info.input_shape, info.num_classes) == ("classification", (1, 28, 28), 10)
    assert (info.train_size, info.test_size) == (60000, 10000)
    x = torch.cat([x for x, _ in ds.eval_batches("test")])
    y = torch.cat([y for _, y in ds.eval_batches("test")])
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    mean, std = channel_stats(ds.eval_batches("train"))
    assert abs(mean.item()) < 0.01 and abs(std.item() - 1) < 0.01
    if name == "fashion-mnist":
        counts = torch.cat([y for _, y in ds.eval_batches("train")]).bincount()
        assert counts.tolist() == [6000] * 10


def test_cifar10_npz(data_root):
    ds = load_dataset(DataConfig(name="cifar10"), data_dir=data_root)
    assert ds.info.input_shape == (3, 32, 32)
    assert (ds.info.train_size, ds.info.test_size) == (50000, 10000)
    ys = torch.cat([y for _, y in ds.eval_batches("train")])
    assert ys.bincount().tolist() == [5000] * 10
    assert torch.cat([y for _, y in ds.eval_batches("test")]).bincount().tolist() == [1000] * 10
    mean, std = channel_stats(ds.eval_batches("train"))
    assert mean.abs().max() < 0.01 and (std - 1).abs().max() < 0.01


def test_tinyshakespeare(data_root):
    cfg = DataConfig(name="tinyshakespeare", block_size=32, batch_size=16)
    ds = load_dataset(cfg, data_dir=data_root)
    text = (data_root / "tinyshakespeare" / "input.txt").read_text()
    info = ds.info
    assert info.task == "language_model" and info.input_shape == (32,)
    assert info.num_classes == 65 and info.vocab == "".join(sorted(set(text)))
    split = int(0.9 * len(text))
    assert info.train_size == (split - 32) // 32
    assert info.test_size == (len(text) - split - 1) // 32

    def decode(t):
        return "".join(info.vocab[i] for i in t.tolist())

    x, y = next(ds.eval_batches("test"))
    assert decode(x[0]) == text[split : split + 32]
    assert decode(y[0]) == text[split + 1 : split + 33]
    batches = list(ds.train_batches(torch.Generator().manual_seed(0)))
    assert len(batches) == ds.num_train_batches
    assert sum(len(x) for x, _ in batches) == info.train_size
    for x, y in batches[:5]:
        assert x.dtype == torch.int64 and x.shape == y.shape == (16, 32)
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert decode(torch.cat([x[0], y[0, -1:]])) in text[:split]


def test_lm_subset_and_epoch_offsets(data_root):
    cfg = DataConfig(name="tinyshakespeare", block_size=16, batch_size=8, train_subset=40)
    ds = load_dataset(cfg, data_dir=data_root)
    assert ds.info.train_size == 40 and ds.num_train_batches == 5
    g = torch.Generator().manual_seed(1)
    firsts = set()
    for _ in range(4):
        starts = torch.cat([x[:, 0] for x, _ in ds.train_batches(g)])
        assert len(starts) == 40
        firsts.add(tuple(starts.tolist()))
    assert len(firsts) > 1  # offsets and order change between epochs


# --- finding, verifying, downloading ---------------------------------------------------------


def copy_mnist(src_root: Path, dst_root: Path) -> Path:
    (dst_root / "mnist").mkdir(parents=True)
    for f in IDX_NAMES:
        shutil.copy(src_root / "mnist" / f, dst_root / "mnist" / f)
    return dst_root / "mnist"


def test_corrupt_file_is_named(data_root, isolated, tmp_path):
    folder = copy_mnist(data_root, tmp_path / "copy")
    bad = folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(bad.read_bytes())
    raw[100] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(LorankError) as err:
        load_dataset(DataConfig(name="mnist"), data_dir=tmp_path / "copy")
    msg = one_line(err)
    assert str(bad) in msg and "corrupt" in msg and "sha256" in msg


def test_bad_idx_magic(tmp_path):
    path = tmp_path / "x.gz"
    import gzip

    path.write_bytes(gzip.compress(b"\x00\x00\x09\x03" + b"\x00" * 12))
    with pytest.raises(LorankError, match="bad IDX magic"):
        data._parse_idx(path, "fix it")
    path.write_bytes(b"not gzip")
    with pytest.raises(LorankError, match="bad gzip"):
        data._parse_idx(path, "fix it")


def test_missing_file_names_file_and_roots(isolated, tmp_path):
    with pytest.raises(LorankError) as err:
        load_dataset(DataConfig(name="fashion-mnist"), data_dir=isolated)
    msg = one_line(err)
    assert "fashion-mnist/train-images-idx3-ubyte.gz" in msg
    assert str(isolated) in msg and str(tmp_path / "env-root") in msg
    assert str(tmp_path / "home" / ".cache" / "lorank") in msg
    assert "LORANK_DATA" in msg and "--data-dir" in msg


def test_failed_download_is_reported(isolated, monkeypatch):
    monkeypatch.delenv("LORANK_OFFLINE")

    def fail(url, dest):
        raise OSError("network unreachable")

    monkeypatch.setattr(data, "_download", fail)
    with pytest.raises(LorankError, match="network unreachable") as err:
        load_dataset(DataConfig(name="tinyshakespeare"), data_dir=isolated)
    assert "tinyshakespeare/input.txt" in one_line(err)


def test_download_lands_in_first_root_and_is_verified(data_root, isolated, monkeypatch):
    monkeypatch.delenv("LORANK_OFFLINE")
    fetched = []

    def fake_download(url, dest):  # stands in for the network with the real file
        fetched.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_root / "tinyshakespeare" / "input.txt", dest)

    monkeypatch.setattr(data, "_download", fake_download)
    ds = load_dataset(DataConfig(name="tinyshakespeare", block_size=8), data_dir=isolated)
    assert ds.info.num_classes == 65
    assert fetched == [data._URLS["tinyshakespeare"] + "input.txt"]
    assert (isolated / "tinyshakespeare" / "input.txt").is_file()

    def wrong_download(url, dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text("not shakespeare")

    (isolated / "tinyshakespeare" / "input.txt").unlink()
    monkeypatch.setattr(data, "_download", wrong_download)
    with pytest.raises(LorankError, match="corrupt"):
        load_dataset(DataConfig(name="tinyshakespeare"), data_dir=isolated)


def test_bundled_mnist_is_the_fallback(isolated):
    ds = load_dataset(DataConfig(name="mnist", train_subset=100, test_subset=50))
    assert (ds.info.train_size, ds.info.test_size) == (100, 50)


def write_fake_cifar_pickles(folder: Path, n: int = 4) -> dict[str, str]:
    """Tiny batches in the original pickle format; returns their md5s."""
    folder.mkdir(parents=True)
    md5 = {}
    rng = np.random.default_rng(0)
    for name in [*data._CIFAR_TRAIN_BATCHES, "test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": list(range(n)),
        }
        raw = pickle.dumps(batch)
        (folder / name).write_bytes(raw)
        md5[name] = hashlib.md5(raw).hexdigest()
    return md5


def test_untrusted_cifar_pickle_is_refused(isolated, monkeypatch):
    write_fake_cifar_pickles(isolated / "cifar-10-batches-py")

    def never(*args, **kwargs):
        raise AssertionError("an unverified pickle was loaded")

    monkeypatch.setattr(data.pickle, "load", never)
    with pytest.raises(LorankError) as err:
        load_dataset(DataConfig(name="cifar10"), data_dir=isolated)
    msg = one_line(err)
    assert "data_batch_1" in msg and "md5" in msg and "refusing to unpickle" in msg


def test_cifar_pickle_layout_when_trusted(isolated, monkeypatch):
    folder = isolated / "cifar-10" / "cifar-10-batches-py"
    md5 = write_fake_cifar_pickles(folder)
    monkeypatch.setattr(data, "_CIFAR_PICKLE_MD5", md5)  # trust our own fake batches
    ds = load_dataset(DataConfig(name="cifar10", augment=False), data_dir=isolated)
    assert (ds.info.train_size, ds.info.test_size) == (20, 4)
    raw = pickle.loads((folder / "data_batch_2").read_bytes())[b"data"]
    x, _ = ds.train_subset_batches(20, 20)[0]
    pixels = x[4:8] * torch.tensor(datasets._NORMALISATION["cifar10"][1]).view(1, 3, 1, 1)
    pixels = (pixels + torch.tensor(datasets._NORMALISATION["cifar10"][0]).view(1, 3, 1, 1)) * 255
    # pickle rows are the R plane, then G, then B, each row-major
    assert torch.allclose(pixels.reshape(4, 3072), torch.from_numpy(raw).float(), atol=1e-3)


def test_corrupt_cifar_npz(isolated):
    folder = isolated / "cifar-10"
    folder.mkdir(parents=True)
    for name in ("cifar10-train.npz", "cifar10-test.npz"):
        images = np.zeros((2, 32, 32, 3), np.uint8)
        np.savez(folder / name, images=images, labels=np.zeros(2, np.uint8))
    with pytest.raises(LorankError) as err:
        load_dataset(DataConfig(name="cifar10"), data_dir=isolated)
    msg = one_line(err)
    assert "cifar10-train.npz is corrupt" in msg and "images" in msg


# --- iteration -------------------------------------------------------------------------------


def synthetic(**kw) -> Dataset:
    return load_dataset(DataConfig(name="synthetic", **kw))


def test_epoch_covers_each_sample_once():
    ds = synthetic(synthetic_train=1000, batch_size=64)
    batches = list(ds.train_batches(torch.Generator().manual_seed(0)))
    assert len(batches) == ds.num_train_batches == 16 and len(batches[-1][0]) == 1000 % 64
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    ref_x = torch.cat([x for x, _ in ds.eval_batches("train")])
    ref_y = torch.cat([y for _, y in ds.eval_batches("train")])
    match = torch.cdist(xs, ref_x).argmin(dim=1)
    assert torch.equal(match.sort().values, torch.arange(1000))
    assert torch.equal(ref_x[match], xs) and torch.equal(ref_y[match], ys)


def epoch(ds, seed):
    return [b for batch in ds.train_batches(torch.Generator().manual_seed(seed)) for b in batch]


def test_shuffling_is_deterministic():
    ds = synthetic(synthetic_train=300, batch_size=50)
    a, b, c = epoch(ds, 3), epoch(ds, 3), epoch(ds, 4)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_train_subset_batches_are_fixed():
    ds = synthetic(synthetic_train=300)
    a = ds.train_subset_batches(70, 32)
    assert [len(x) for x, _ in a] == [32, 32, 6]
    first = torch.cat([x for x, _ in ds.eval_batches("train")])[:70]
    assert torch.equal(torch.cat([x for x, _ in a]), first)
    assert all(
        torch.equal(u[0], v[0]) for u, v in zip(a, ds.train_subset_batches(70, 32), strict=True)
    )
    with pytest.raises(LorankError, match="unknown split"):
        next(ds.eval_batches("val"))


def test_random_crop_flip_is_a_crop_of_the_padded_image():
    x = torch.randint(0, 256, (8, 3, 6, 6), dtype=torch.uint8)
    padded = F.pad(x, (2, 2, 2, 2))
    out = datasets._random_crop_flip(padded, 2, True, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for i in range(8):
        candidates = [
            crop
            for dy in range(5)
            for dx in range(5)
            for crop in [padded[i, :, dy : dy + 6, dx : dx + 6]]
            for crop in (crop, crop.flip(2))
        ]
        assert any(torch.equal(out[i], c) for c in candidates)


def test_cifar_augmentation(data_root):
    cfg = DataConfig(name="cifar10", train_subset=256, test_subset=10, batch_size=100)
    ds = load_dataset(cfg, data_dir=data_root)
    a, b = epoch(ds, 0), epoch(ds, 0)
    assert [t.shape for t in a[::2]] == [(100, 3, 32, 32)] * 2 + [(56, 3, 32, 32)]
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    plain = load_dataset(cfg.model_copy(update={"augment": False}), data_dir=data_root)
    p = epoch(plain, 0)
    assert torch.equal(a[1], p[1])  # same order: augmentation draws come after the shuffle
    assert not torch.equal(a[0], p[0])


def test_mnist_augmentation_keeps_shape(data_root):
    cfg = DataConfig(name="mnist", train_subset=64, test_subset=10, augment=True)
    x, _ = next(load_dataset(cfg, data_dir=data_root).train_batches(torch.Generator()))
    assert x.shape == (64, 1, 28, 28)


def test_augment_unsupported(data_root):
    with pytest.raises(LorankError, match="augment"):
        synthetic(augment=True)
    with pytest.raises(LorankError, match="augment"):
        load_dataset(DataConfig(name="tinyshakespeare", augment=True), data_dir=data_root)


# --- synthetic and config --------------------------------------------------------------------


def test_synthetic_is_deterministic_and_shaped():
    a, b = synthetic(synthetic_seed=5), synthetic(synthetic_seed=5)
    c = synthetic(synthetic_seed=6)
    xa, xb, xc = (next(d.eval_batches("test"))[0] for d in (a, b, c))
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    img = synthetic(synthetic_shape=[1, 8, 8], synthetic_classes=3)
    assert img.info.input_shape == (1, 8, 8) and img.info.num_classes == 3
    assert next(img.eval_batches())[0].shape[1:] == (1, 8, 8)


def test_synthetic_is_learnable():
    torch.manual_seed(0)
    ds = synthetic()
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        for x, y in ds.train_batches(g):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in ds.eval_batches())
    assert correct / ds.info.test_size > 0.9


def test_config_and_info_serialise():
    with pytest.raises(pydantic.ValidationError):
        DataConfig(name="mnist", batch_sise=3)
    with pytest.raises(pydantic.ValidationError):
        DataConfig(batch_size=0)
    info = synthetic(synthetic_train=10, synthetic_test=5).info
    back = DatasetInfo.from_dict(json.loads(json.dumps(dataclasses.asdict(info))))
    assert back == info
