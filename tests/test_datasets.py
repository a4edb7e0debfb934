"""Dataset loaders: files written here from random arrays read back exactly; the real
copies in ../shared/data (when present) match the counts and labels in its README."""
import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dropflat.experiments.datasets import (
    DatasetNotFoundError,
    Vocab,
    default_data_dir,
    encode_pairs,
    image_tensor,
    load_cifar,
    load_mnist,
    load_multi30k,
    tokenize,
)

from conftest import SHARED_DATA

SHARED = SHARED_DATA


# ----------------------------------------------------------------------------- MNIST

def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    # Independent writer: struct's ">I" is the big-endian uint32 the IDX format specifies.
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()


def _write(path: Path, data: bytes, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _write_mnist(d: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool):
    _write(d / f"{prefix}-images-idx3-ubyte", _idx_bytes(images, 2051), gz)
    _write(d / f"{prefix}-labels-idx1-ubyte", _idx_bytes(labels, 2049), gz)


@pytest.mark.parametrize("layout", ["", "MNIST/raw", "mnist"])
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, fresh_seed, layout, gz):
    rng = np.random.default_rng(fresh_seed)
    for split, prefix, n in (("train", "train", 7), ("test", "t10k", 5)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_mnist(tmp_path / layout, prefix, images, labels, gz)
        x, y = load_mnist(tmp_path, split)
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert x.shape == (n, 28, 28) and y.shape == (n,)
        assert np.array_equal(x.numpy(), images) and np.array_equal(y.numpy(), labels)


def test_mnist_env_default_root(tmp_path, monkeypatch, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    images = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=3, dtype=np.uint8)
    _write_mnist(tmp_path, "t10k", images, labels, gz=True)
    monkeypatch.setenv("DROPFLAT_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    x, _ = load_mnist(split="test")
    assert np.array_equal(x.numpy(), images)


def test_default_data_dir_without_env(tmp_path, monkeypatch):
    monkeypatch.delenv("DROPFLAT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_data_dir() == tmp_path / "data"


def _mnist_arrays(seed, n=4, n_labels=None):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, size=n if n_labels is None else n_labels, dtype=np.uint8))


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_bad_magic(tmp_path, fresh_seed, gz):
    images, labels = _mnist_arrays(fresh_seed)
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(images, 2049), gz)  # labels' magic
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(labels, 2049), gz)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*bad IDX magic number 2049, expected 2051"):
        load_mnist(tmp_path)


@pytest.mark.parametrize("cut", [1, 28 * 28 + 3])
def test_mnist_truncated(tmp_path, fresh_seed, cut):
    images, labels = _mnist_arrays(fresh_seed)
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(images, 2051)[:-cut], gz=False)
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(labels, 2049), gz=False)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: IDX file truncated.*\(4, 28, 28\)"):
        load_mnist(tmp_path)


def test_mnist_truncated_header_and_gzip(tmp_path, fresh_seed):
    images, labels = _mnist_arrays(fresh_seed)
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(images, 2051)[:10], gz=False)
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(labels, 2049), gz=False)
    with pytest.raises(ValueError, match="truncated IDX file.*header needs 16"):
        load_mnist(tmp_path)
    # A gzip stream cut short: the gzip layer must say so, not a confusing IDX error.
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(_idx_bytes(images, 2051))[:-20])
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx_bytes(labels, 2049), gz=True)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        load_mnist(tmp_path, "test")


def test_mnist_count_mismatch(tmp_path, fresh_seed):
    images, labels = _mnist_arrays(fresh_seed, n=4, n_labels=3)
    _write_mnist(tmp_path, "train", images, labels, gz=True)
    with pytest.raises(ValueError, match=r"4 images in .*train-images.* but 3 labels in .*train-labels"):
        load_mnist(tmp_path)


def test_mnist_missing(tmp_path):
    # Only the images exist: the error must list every candidate tried for the labels.
    images, _ = _mnist_arrays(0)
    _write(tmp_path / "mnist" / "train-images-idx3-ubyte", _idx_bytes(images, 2051), gz=False)
    with pytest.raises(DatasetNotFoundError) as err:
        load_mnist(tmp_path)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    for d in (tmp_path, tmp_path / "MNIST" / "raw", tmp_path / "mnist"):
        for name in ("train-labels-idx1-ubyte", "train-labels-idx1-ubyte.gz"):
            assert str(d / name) in msg
    assert "torchvision.datasets.MNIST(root, download=True)" in msg
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/" in msg
    assert pickle.loads(pickle.dumps(err.value)).args == err.value.args


def test_bad_choices(tmp_path):
    with pytest.raises(ValueError, match=r"split='val' is not one of 'train', 'test'"):
        load_mnist(tmp_path, "val")
    with pytest.raises(ValueError, match=r"name='cifar1000' is not one of 'cifar10', 'cifar100'"):
        load_cifar(tmp_path, "cifar1000")
    with pytest.raises(ValueError, match=r"split='test' is not one of 'train', 'val', 'test2016'"):
        load_multi30k(tmp_path, "test")
    with pytest.raises(ValueError, match="language code"):
        load_multi30k(tmp_path, src="../en")
    with pytest.raises(ValueError, match="two different languages"):
        load_multi30k(tmp_path, src="de", tgt="de")


# ----------------------------------------------------------------------------- CIFAR

def _write_batches(d: Path, files, label_key: bytes, n: int, classes: int, rng):
    """Random CIFAR python batches (dicts with bytes keys, as the official pickles)."""
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for name in files:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=n).tolist()  # the official pickles hold a list
        with open(d / name, "wb") as f:
            pickle.dump({label_key: labels, b"coarse_labels": [0] * n, b"data": data}, f)
        out.append((data, labels))
    return out


def _hwc_by_formula(data: np.ndarray) -> np.ndarray:
    # Explicit index formula of the CIFAR python format: pixel (h, w) of channel c is
    # column 1024 c + 32 h + w of the image's row.
    out = np.empty((len(data), 32, 32, 3), dtype=np.uint8)
    for n in range(len(data)):
        for h in range(32):
            for w in range(32):
                for c in range(3):
                    out[n, h, w, c] = data[n, 1024 * c + 32 * h + w]
    return out


def test_cifar10_torchvision_layout(tmp_path, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    d = tmp_path / "cifar-10-batches-py"
    train = _write_batches(d, [f"data_batch_{i}" for i in range(1, 6)], b"labels", 2, 10, rng)
    (test,) = _write_batches(d, ["test_batch"], b"labels", 3, 10, rng)
    x, y = load_cifar(tmp_path, "cifar10", "train")
    data = np.concatenate([t[0] for t in train])
    assert x.dtype == torch.uint8 and x.shape == (10, 32, 32, 3) and y.dtype == torch.int64
    assert np.array_equal(x.numpy(), _hwc_by_formula(data))
    assert y.tolist() == [label for t in train for label in t[1]]
    x, y = load_cifar(tmp_path, "cifar10", "test")
    assert np.array_equal(x.numpy(), _hwc_by_formula(test[0])) and y.tolist() == test[1]
    # Bytes survive exactly: back to the channel-major rows.
    assert np.array_equal(x.numpy().transpose(0, 3, 1, 2).reshape(3, 3072), test[0])


def test_cifar100_torchvision_layout_fine_labels(tmp_path, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    ((data, labels),) = _write_batches(tmp_path / "cifar-100-python", ["train"], b"fine_labels", 4, 100, rng)
    x, y = load_cifar(tmp_path, "cifar100", "train")
    assert np.array_equal(x.numpy(), _hwc_by_formula(data)) and y.tolist() == labels
    # root may also be the torchvision folder itself.
    x2, _ = load_cifar(tmp_path / "cifar-100-python", "cifar100", "train")
    assert torch.equal(x, x2)


def test_cifar_partial_torchvision_copy(tmp_path, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    d = tmp_path / "cifar-10-batches-py"
    _write_batches(d, ["data_batch_1", "data_batch_2", "data_batch_4", "data_batch_5"], b"labels", 1, 10, rng)
    with pytest.raises(DatasetNotFoundError, match=r"missing: .*data_batch_3\n"):
        load_cifar(tmp_path, "cifar10", "train")


def test_cifar_bad_labels_and_keys(tmp_path, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    _write_batches(tmp_path / "cifar-10-batches-py", ["test_batch"], b"fine_labels", 2, 10, rng)
    with pytest.raises(ValueError, match=r"test_batch: expected a dict with b'data' and b'labels'"):
        load_cifar(tmp_path, "cifar10", "test")
    (tmp_path / "cifar10").mkdir()
    np.savez(tmp_path / "cifar10" / "test.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.array([3, 10]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\), got range \[3, 10\]"):
        load_cifar(tmp_path, "cifar10", "test")
    np.savez(tmp_path / "cifar10" / "test.npz", x=np.zeros((2, 3, 32, 32), np.uint8), y=np.array([3, 1]))
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\) \(HWC\), got uint8 \(2, 3, 32, 32\)"):
        load_cifar(tmp_path, "cifar10", "test")
    np.savez(tmp_path / "cifar10" / "test.npz", images=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"must hold arrays 'x' \(images\) and 'y' \(labels\), found \['images'\]"):
        load_cifar(tmp_path, "cifar10", "test")


@pytest.mark.parametrize("inside", [True, False])
def test_cifar_npz_parts_sorted(tmp_path, fresh_seed, inside):
    rng = np.random.default_rng(fresh_seed)
    d = tmp_path / "cifar100" if inside else tmp_path
    d.mkdir(exist_ok=True)
    parts = {}
    for name in ["train-002.npz", "train-000.npz", "train-001.npz"]:  # written out of order
        n = int(rng.integers(1, 4))
        parts[name] = (rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
                       rng.integers(0, 100, size=n))
        np.savez_compressed(d / name, x=parts[name][0], y=parts[name][1])
    np.savez(d / "trainer-notes.npz", x=np.zeros(1))  # not a part: the name only starts with "train"
    x, y = load_cifar(tmp_path, "cifar100", "train")
    order = sorted(parts)
    assert np.array_equal(x.numpy(), np.concatenate([parts[k][0] for k in order]))
    assert np.array_equal(y.numpy(), np.concatenate([parts[k][1] for k in order]))


def test_cifar_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_cifar(tmp_path, "cifar100", "test")
    msg = str(err.value)
    assert str(tmp_path / "cifar100" / "test[-_]*.npz") in msg
    assert str(tmp_path / "cifar-100-python" / "test") in msg
    assert "torchvision.datasets.CIFAR100(root, download=True)" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in msg


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="no ../shared/data/mnist")
def test_mnist_shared_copy():
    """The official gzip'd IDX files, read as distributed: sizes, first labels and per-class counts of MNIST."""
    x, y = load_mnist(SHARED, "train")
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8 and y.shape == (60000,)
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert torch.bincount(y, minlength=10).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert int(x[0].max()) == 255 and int(x[0, 0, 0]) == 0  # ink 255, background 0
    x, y = load_mnist(SHARED, "test")
    assert x.shape == (10000, 28, 28) and y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(y, minlength=10).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.skipif(not (SHARED / "cifar10").is_dir(), reason="no ../shared/data/cifar10")
def test_cifar10_shared_copy():
    x, y = load_cifar(SHARED, "cifar10", "train")
    assert x.shape == (15000, 32, 32, 3) and x.dtype == torch.uint8 and y.shape == (15000,)
    assert y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    # Per-class counts stated in the README.
    assert torch.bincount(y, minlength=10).tolist() == [1502, 1484, 1543, 1510, 1507, 1426, 1533, 1514,
                                                        1522, 1459]
    x, y = load_cifar(SHARED / "cifar10", "cifar10", "test")  # root holding the parts itself
    assert x.shape == (1000, 32, 32, 3) and y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


@pytest.mark.skipif(not (SHARED / "cifar100").is_dir(), reason="no ../shared/data/cifar100")
def test_cifar100_shared_copy():
    x, y = load_cifar(SHARED, "cifar100", "train")
    assert x.shape == (100, 32, 32, 3) and y[:10].tolist() == [19, 29, 0, 11, 1, 86, 90, 28, 23, 31]
    # Red value of pixel (0, 0), first 10 images (README): checks the HWC channel order.
    assert x[:10, 0, 0, 0].tolist() == [255, 255, 250, 124, 43, 190, 50, 178, 122, 255]
    x, y = load_cifar(SHARED, "cifar100", "test")
    assert x.shape == (20, 32, 32, 3) and x[:10, 0, 0, 0].tolist() == [199, 113, 61, 93, 80, 168, 37, 175,
                                                                       233, 182]


# ----------------------------------------------------------------------------- Multi30k

@pytest.mark.skipif(not (SHARED / "multi30k").is_dir(), reason="no ../shared/data/multi30k")
def test_multi30k_shared_copy():
    for split, n in (("train", 29000), ("val", 1014), ("test2016", 1000)):
        en, de = load_multi30k(SHARED, split)
        assert len(en) == len(de) == n
        assert all(s and not s.endswith("\n") for s in en[:50] + de[:50])
    de, en = load_multi30k(SHARED / "multi30k", "train", src="de", tgt="en")
    assert de[0] == "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."
    assert tokenize(de[0]) == ["zwei", "junge", "weiße", "männer", "sind", "im", "freien", "in", "der",
                               "nähe", "vieler", "büsche", "."]


def test_multi30k_upstream_names_plain_and_mismatch(tmp_path):
    d = tmp_path / "multi30k"
    d.mkdir()
    (d / "test_2016_flickr.en").write_text("A dog.\r\nTwo men.\n", encoding="utf-8")
    (d / "test_2016_flickr.de").write_bytes(gzip.compress("Ein Hund.\nZwei Männer.\n".encode()))  # misnamed gz
    en, de = load_multi30k(tmp_path, "test2016")
    assert en == ["A dog.", "Two men."] and de == ["Ein Hund.", "Zwei Männer."]
    (tmp_path / "val.en.gz").write_bytes(gzip.compress(b"a\nb\nc\n"))
    (tmp_path / "val.de.gz").write_bytes(gzip.compress(b"a\nb\n"))
    with pytest.raises(ValueError, match=r"3 lines in .*val.en.gz but 2 in .*val.de.gz"):
        load_multi30k(tmp_path, "val")


def test_multi30k_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_multi30k(tmp_path, "test2016", src="en", tgt="fr")
    msg = str(err.value)
    for name in ("test2016.fr.gz", "test2016.fr", "test_2016_flickr.fr.gz"):
        assert str(tmp_path / "multi30k" / name) in msg
    assert "https://github.com/multi30k/dataset" in msg and "data/task1/raw" in msg


# ----------------------------------------------------------------------------- images

def test_image_tensor_layout_and_normalisation(fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    x = rng.integers(0, 256, size=(2, 3, 4, 3), dtype=np.uint8)
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.3, 0.4]
    out = image_tensor(torch.from_numpy(x), mean, std)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 3, 4) and out.is_contiguous()
    ref = np.empty((2, 3, 3, 4))
    for n, c, h, w in np.ndindex(*ref.shape):
        ref[n, c, h, w] = (x[n, h, w, c] / 255.0 - mean[c]) / std[c]
    # float32 rounding of a value of size <= 5 after a few operations: ~1e-6 absolute.
    assert np.allclose(out.numpy(), ref, rtol=0, atol=1e-5)
    gray = rng.integers(0, 256, size=(2, 5, 6), dtype=np.uint8)
    out = image_tensor(gray, mean=0.5)  # numpy input, HW images, scalar mean
    assert out.shape == (2, 1, 5, 6)
    assert np.allclose(out.numpy()[:, 0], gray / 255.0 - 0.5, rtol=0, atol=1e-6)


def test_image_tensor_errors():
    with pytest.raises(ValueError, match="expects uint8 pixels"):
        image_tensor(torch.zeros(1, 2, 2, 3))
    with pytest.raises(ValueError, match=r"shape \[N, H, W, C\] or \[N, H, W\], got \(2, 2\)"):
        image_tensor(torch.zeros(2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"mean has 2 values; give one per channel \(3\)"):
        image_tensor(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), mean=[0.1, 0.2])
    with pytest.raises(ValueError, match="std must be finite and positive"):
        image_tensor(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), std=[1.0, 0.0, 1.0])


# ----------------------------------------------------------------------------- text

def test_tokenize():
    assert tokenize("Ein Mädchen, im Straßencafé, ÄRGERT sich!") == [
        "ein", "mädchen", ",", "im", "straßencafé", ",", "ärgert", "sich", "!"]
    assert tokenize("  A man's 2 dogs.  ") == ["a", "man", "'", "s", "2", "dogs", "."]
    with pytest.raises(TypeError, match="expects a str"):
        tokenize(["a"])


def test_vocab_build_encode_decode():
    sents = [["b", "a", "c"], ["a", "b", "d"], ["a", "<pad>"]]  # counts a 3, b 2, c 1, d 1
    v = Vocab(sents)
    assert v.itos == ["<pad>", "<unk>", "<bos>", "<eos>", "a", "b", "c", "d"]  # count, then alphabetical
    assert len(v) == 8 and "c" in v and "<pad>" in v and "z" not in v
    assert Vocab(reversed(sents)).itos == v.itos  # ids do not depend on sentence order
    ids = v.encode(["d", "zz", "a"], bos=True, eos=True)
    assert ids == [2, 7, 1, 4, 3]
    assert v.decode(ids) == ["d", "<unk>", "a"]
    assert v.decode(ids + [0, 0], skip_specials=False) == ["<bos>", "d", "<unk>", "a", "<eos>", "<pad>", "<pad>"]
    assert v.decode(torch.tensor([4, 3, 5])) == ["a"]  # stops at <eos>
    assert Vocab(sents, min_freq=2).itos[4:] == ["a", "b"]
    assert Vocab(sents, max_size=5).itos[4:] == ["a"] and len(Vocab(sents, max_size=5)) == 5


def test_vocab_checkpoint_round_trip():
    v = Vocab([tokenize("Zwei Männer. Zwei Hunde."), tokenize("Ein Hund.")], min_freq=1, max_size=50)
    w = Vocab.from_dict(json.loads(json.dumps(v.to_dict())))
    assert w.itos == v.itos and w.stoi == v.stoi and (w.min_freq, w.max_size) == (1, 50)
    s = tokenize("Zwei Männer und ein Hund.")
    assert w.encode(s) == v.encode(s)


def test_vocab_errors():
    with pytest.raises(ValueError, match="min_freq must be an integer >= 1"):
        Vocab([["a"]], min_freq=0)
    with pytest.raises(ValueError, match=r"max_size must be None or an integer >= 4 \(it counts the specials\)"):
        Vocab([["a"]], max_size=3)
    with pytest.raises(TypeError, match="item 0 is a str"):
        Vocab(["a sentence"])
    with pytest.raises(TypeError, match="encode expects a token list"):
        Vocab().encode("a b")
    with pytest.raises(ValueError, match=r"id 9 is outside the vocabulary \[0, 4\)"):
        Vocab().decode([9])
    with pytest.raises(ValueError, match="must start with the specials"):
        Vocab.from_dict({"itos": ["a", "<pad>", "<unk>", "<bos>", "<eos>"]})
    with pytest.raises(ValueError, match=r"duplicate tokens \['a'\]"):
        Vocab.from_dict({"itos": ["<pad>", "<unk>", "<bos>", "<eos>", "a", "a"]})
    with pytest.raises(ValueError, match="needs a dict with 'itos'"):
        Vocab.from_dict({"stoi": {}})


def test_encode_pairs_layout(fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    words = [f"w{i}" for i in range(6)]
    src = [[words[j] for j in rng.integers(0, 6, size=rng.integers(1, 7))] for _ in range(5)]
    tgt = [[words[j] for j in rng.integers(0, 6, size=rng.integers(0, 7))] for _ in range(5)]
    sv, tv = Vocab(src), Vocab(tgt[:2])  # tv misses some words: <unk> in the targets
    S, T = encode_pairs(src, tgt, sv, tv)
    assert S.dtype == T.dtype == torch.long
    assert S.shape == (5, max(map(len, src))) and T.shape == (5, max(map(len, tgt)) + 2)
    for i in range(5):  # explicit layout: ids, then <pad>; <bos> ids <eos>, then <pad>
        ls, lt = len(src[i]), len(tgt[i])
        assert S[i, :ls].tolist() == [sv.stoi[w] for w in src[i]] and (S[i, ls:] == 0).all()
        assert T[i, 0] == Vocab.BOS and T[i, lt + 1] == Vocab.EOS and (T[i, lt + 2:] == 0).all()
        assert T[i, 1:lt + 1].tolist() == [tv.stoi.get(w, Vocab.UNK) for w in tgt[i]]
        assert tv.decode(T[i]) == [w if w in tv else "<unk>" for w in tgt[i]]
    S, T = encode_pairs(src, tgt, sv, tv, max_len=3)  # truncation keeps <eos>
    assert S.shape[1] <= 3 and T.shape[1] <= 3
    for i in range(5):
        assert S[i, :min(3, len(src[i]))].tolist() == [sv.stoi[w] for w in src[i][:3]]
        k = min(1, len(tgt[i]))
        assert T[i, : k + 2].tolist() == [Vocab.BOS] + tv.encode(tgt[i][:1]) + [Vocab.EOS]


def test_encode_pairs_strings_and_errors():
    v = Vocab([tokenize("Ein Hund läuft.")])
    S, T = encode_pairs(["Ein Hund."], ["Hund läuft"], v, v)
    assert S.tolist() == [v.encode(["ein", "hund", "."])]
    assert T.tolist() == [v.encode(["hund", "läuft"], bos=True, eos=True)]
    with pytest.raises(ValueError, match="2 source but 1 target sentences"):
        encode_pairs(["a", "b"], ["a"], v, v)
    with pytest.raises(ValueError, match="no sentence pairs"):
        encode_pairs([], [], v, v)
    with pytest.raises(ValueError, match=r"src_sents\[1\] is empty"):
        encode_pairs(["a", " "], ["a", "b"], v, v)
    with pytest.raises(ValueError, match="max_len must be None or an integer >= 2"):
        encode_pairs(["a"], ["a"], v, v, max_len=1)
    with pytest.raises(TypeError, match=r"tgt_sents\[0\] must be a sentence \(str\) or a list of token strings"):
        encode_pairs(["a"], [[1, 2]], v, v)
