"""Dataset loaders for the paper's experiments (MNIST, CIFAR-10/100, Multi30k).

Everything is read from the user's own copies on disk; nothing is downloaded.
The data directory defaults to :func:`default_data_dir` (``$DROPFLAT_DATA``, else
``./data``). Each loader looks in a few standard layouts (torchvision's among
them) and, when nothing is there, raises :class:`DatasetNotFoundError` listing
every path it searched and how to get the data.

Images come back as ``uint8`` tensors in their stored layout (MNIST ``[N, 28, 28]``,
CIFAR ``[N, 32, 32, 3]`` HWC) with ``int64`` labels; :func:`image_tensor` turns them
into the ``float32 [N, C, H, W]`` a network takes. For the Transformer experiment,
:func:`tokenize`, :class:`Vocab` and :func:`encode_pairs` turn sentence pairs into
padded id tensors.
"""
from __future__ import annotations

import gzip
import os
import pickle
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch

__all__ = [
    "DatasetNotFoundError",
    "Vocab",
    "default_data_dir",
    "encode_pairs",
    "image_tensor",
    "load_cifar",
    "load_mnist",
    "load_multi30k",
    "tokenize",
]

PathLike = Union[str, "os.PathLike[str]"]

_MNIST_HINT = (
    "Get MNIST with torchvision.datasets.MNIST(root, download=True) (it writes root/MNIST/raw), "
    "or download the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from the MNIST site or a mirror such as "
    "https://ossci-datasets.s3.amazonaws.com/mnist/ into root."
)
_CIFAR_HINT = (
    "Get {title} with torchvision.datasets.{tv}(root, download=True) (it writes root/{folder}) or "
    "from https://www.cs.toronto.edu/~kriz/cifar.html (unpack the python version into root); or put "
    "npz parts at root/{name}/{{split}}-*.npz (or root/{name}/{{split}}.npz) holding x (N,32,32,3 "
    "uint8, HWC) and y (N,) labels, concatenated in sorted file-name order."
)
_MULTI30K_HINT = (
    "Get Multi30k from https://github.com/multi30k/dataset: copy data/task1/raw/"
    "{train,val,test_2016_flickr}.{en,de}.gz into root or root/multi30k."
)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where the loader looked.

    ``dataset``: its name; ``searched``: every path or pattern tried; ``hint``: how to get it.
    The message holds all three.
    """

    def __init__(self, dataset: str, searched: Sequence[PathLike], hint: str):
        self.dataset = dataset
        self.searched = [str(s) for s in searched]
        self.hint = hint
        lines = "\n".join(f"  {s}" for s in self.searched)
        super().__init__(f"{dataset} not found; searched:\n{lines}\n{hint}")

    def __reduce__(self):  # the custom __init__ would otherwise break pickling (multiprocessing)
        return (type(self), (self.dataset, self.searched, self.hint))


def default_data_dir() -> Path:
    """The data directory: ``$DROPFLAT_DATA`` if set and non-empty, else ``./data``.

    Returned as an absolute path (relative values are taken from the current directory).
    """
    env = os.environ.get("DROPFLAT_DATA", "")
    return Path(env).expanduser().absolute() if env else Path("data").absolute()


def _root(root: PathLike | None) -> Path:
    return default_data_dir() if root is None else Path(root).expanduser()


def _check_choice(what: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{what}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is gzip (sniffed, so a misnamed file still reads)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({e}); download it again") from e


# ----------------------------------------------------------------------------- MNIST

_IDX_MAGIC = {2051: ("images", 3), 2049: ("labels", 1)}


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes.

    Layout: a big-endian int32 magic ``0x0000 08 ndim`` (2051 = 3-D images, 2049 = 1-D
    labels), ``ndim`` big-endian int32 sizes, then ``prod(sizes)`` bytes in C order.
    """
    data = _read_bytes(path)
    kind, ndim = _IDX_MAGIC[magic]
    header = 4 + 4 * ndim
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(data)} bytes, no header); download it again")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: bad IDX magic number {found}, expected {magic} for MNIST {kind}; "
                         "is this the right file (images vs labels) and not corrupt?")
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX file ({len(data)} bytes, header needs {header}); "
                         "download it again")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    need = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != need:
        what = "truncated" if len(data) < need else "has trailing bytes"
        raise ValueError(f"{path}: IDX file {what}: header says shape {dims} ({need} bytes in all), "
                         f"file has {len(data)} bytes; download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find(dirs: Sequence[Path], names: Sequence[str], searched: list[Path]) -> Path | None:
    """First existing ``dir/name`` (dirs outer, names inner); every candidate goes into ``searched``."""
    for d in dirs:
        for n in names:
            p = d / n
            searched.append(p)
            if p.is_file():
                return p
    return None


def load_mnist(root: PathLike | None = None, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST from its four IDX files: ``(images uint8 [N, 28, 28], labels int64 [N])``.

    ``split``: ``"train"`` (60,000) or ``"test"`` (10,000, the ``t10k`` files). Each file is
    looked up plain or ``.gz`` in ``root``, ``root/MNIST/raw`` (torchvision's layout) and
    ``root/mnist``; ``root=None`` means :func:`default_data_dir`. The IDX header is checked
    (magic number, sizes against the file length) and images and labels must agree in count.
    Fashion-MNIST, stored in the same format, reads the same way.
    """
    _check_choice("split", split, ("train", "test"))
    root = _root(root)
    prefix = "train" if split == "train" else "t10k"
    dirs = [root, root / "MNIST" / "raw", root / "mnist"]
    searched: list[Path] = []
    found = {}
    for kind, base in (("images", f"{prefix}-images-idx3-ubyte"), ("labels", f"{prefix}-labels-idx1-ubyte")):
        found[kind] = _find(dirs, [base, base + ".gz"], searched)
    if None in found.values():
        raise DatasetNotFoundError(f"MNIST ({split})", searched, _MNIST_HINT)
    images = _read_idx(found["images"], 2051)
    labels = _read_idx(found["labels"], 2049)
    if len(images) != len(labels):
        raise ValueError(f"MNIST {split}: {len(images)} images in {found['images']} but {len(labels)} "
                         f"labels in {found['labels']}; the files do not belong together")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


# ----------------------------------------------------------------------------- CIFAR

_CIFAR = {
    # name: (classes, torchvision folder, train files, test files, label key, torchvision class)
    "cifar10": (10, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels", "CIFAR10"),
    "cifar100": (100, "cifar-100-python", ["train"], ["test"], b"fine_labels", "CIFAR100"),
}


def _npz_parts(d: Path, split: str) -> list[Path]:
    """``d/{split}.npz`` and ``d/{split}-*.npz`` / ``d/{split}_*.npz``, sorted by file name."""
    if not d.is_dir():
        return []
    parts = [p for p in d.iterdir() if p.suffix == ".npz" and p.is_file()
             and (p.stem == split or p.stem.startswith((split + "-", split + "_")))]
    return sorted(parts, key=lambda p: p.name)


def _check_cifar(x: np.ndarray, y: np.ndarray, classes: int, where: str) -> None:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise ValueError(f"{where}: images must be uint8 of shape (N, 32, 32, 3) (HWC), "
                         f"got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{where}: labels must have shape ({len(x)},) to match the images, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"{where}: labels must lie in [0, {classes}), got range [{y.min()}, {y.max()}]; "
                         "is this the right dataset?")


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # allow_pickle=False: an npz of plain arrays never needs it, and it would run code.
    with np.load(path, allow_pickle=False) as f:
        if "x" not in f or "y" not in f:
            raise ValueError(f"{path}: npz part must hold arrays 'x' (images) and 'y' (labels), "
                             f"found {sorted(f.keys())}")
        return f["x"], f["y"]


def _load_cifar_pickle(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    # pickle.load can execute arbitrary code: only the standard CIFAR file names inside the
    # user's own data directory are ever opened here, never a path taken from elsewhere.
    with open(path, "rb") as f:
        try:
            d = pickle.load(f, encoding="bytes")
        except Exception as e:
            raise ValueError(f"{path}: not a readable CIFAR python batch ({e}); download it again") from e
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path}: expected a dict with b'data' and {label_key!r}, found {keys}")
    data = np.asarray(d[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    # Rows are channel-major: 1024 red, then green, then blue values, each row-major 32x32.
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), np.asarray(d[label_key])


def load_cifar(root: PathLike | None = None, name: str = "cifar10",
               split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 or CIFAR-100: ``(images uint8 [N, 32, 32, 3] HWC RGB, labels int64 [N])``.

    Looked up, in order (``root=None`` means :func:`default_data_dir`):

    1. npz parts ``root/{name}/{split}.npz`` or ``{split}-*.npz`` / ``{split}_*.npz`` (then the
       same in ``root`` itself), keys ``x`` (``uint8 [N, 32, 32, 3]``) and ``y``, concatenated
       in sorted file-name order;
    2. torchvision's layout: ``root/cifar-10-batches-py/{data_batch_1..5, test_batch}`` or
       ``root/cifar-100-python/{train, test}`` (CIFAR-100 gives the fine labels). A batch's
       ``b"data"`` row is channel-major, so pixel ``(h, w)`` of channel ``c`` is column
       ``1024 c + 32 h + w``.

    Labels are checked to lie in ``[0, classes)``.
    """
    _check_choice("name", name, tuple(_CIFAR))
    _check_choice("split", split, ("train", "test"))
    classes, folder, train_files, test_files, label_key, tv = _CIFAR[name]
    root = _root(root)
    title = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    searched: list[str] = []
    for d in (root / name, root):
        searched.append(str(d / f"{split}[-_]*.npz") + f" or {split}.npz")
        parts = _npz_parts(d, split)
        if parts:
            xs, ys = [], []
            for p in parts:
                x, y = _load_npz(p)
                _check_cifar(x, y, classes, str(p))
                xs.append(x)
                ys.append(y)
            return (torch.from_numpy(np.concatenate(xs)),
                    torch.from_numpy(np.concatenate(ys).astype(np.int64)))
    tv_dir = root if root.name == folder else root / folder
    files = [tv_dir / f for f in (train_files if split == "train" else test_files)]
    searched += [str(f) for f in files]
    missing = [f for f in files if not f.is_file()]
    if missing:
        if len(missing) < len(files):  # a partial copy: say exactly what is absent
            searched.append("missing: " + ", ".join(str(f) for f in missing))
        hint = _CIFAR_HINT.format(title=title, tv=tv, folder=folder, name=name)
        raise DatasetNotFoundError(f"{title} ({split})", searched, hint)
    xs, ys = zip(*(_load_cifar_pickle(f, label_key) for f in files))
    x, y = np.concatenate(xs), np.concatenate(ys)
    _check_cifar(x, y, classes, str(tv_dir))
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


# ----------------------------------------------------------------------------- Multi30k

_MULTI30K_SPLITS = {"train": ["train"], "val": ["val"], "test2016": ["test2016", "test_2016_flickr"]}


def _read_lines(path: Path) -> list[str]:
    try:
        text = _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the final newline ends the last line, it does not open a new one
        lines.pop()
    return [ln.removesuffix("\r") for ln in lines]


def load_multi30k(root: PathLike | None = None, split: str = "train", src: str = "en",
                  tgt: str = "de") -> tuple[list[str], list[str]]:
    """Multi30k (task 1) sentence pairs: ``(source sentences, target sentences)``, raw text.

    ``split``: ``"train"`` (29,000 pairs), ``"val"`` (1,014) or ``"test2016"`` (1,000; also
    found under the upstream name ``test_2016_flickr``). Files ``{split}.{lang}.gz`` or plain
    ``{split}.{lang}`` are looked up in ``root`` and ``root/multi30k`` (``root=None`` means
    :func:`default_data_dir`). Line ``i`` of one language translates line ``i`` of the other,
    so the two files must have equal line counts.
    """
    _check_choice("split", split, tuple(_MULTI30K_SPLITS))
    for what, lang in (("src", src), ("tgt", tgt)):
        if not isinstance(lang, str) or not re.fullmatch(r"[a-z]{2,3}", lang):
            raise ValueError(f"{what}={lang!r} must be a language code such as 'en', 'de', 'fr', 'cs'")
    if src == tgt:
        raise ValueError(f"src and tgt are both {src!r}; pick two different languages")
    root = _root(root)
    dirs = [root, root / "multi30k"]
    searched: list[Path] = []
    paths = []
    for lang in (src, tgt):
        names = [f"{s}.{lang}{ext}" for s in _MULTI30K_SPLITS[split] for ext in (".gz", "")]
        paths.append(_find(dirs, names, searched))
    if None in paths:
        raise DatasetNotFoundError(f"Multi30k ({split}, {src}-{tgt})", searched, _MULTI30K_HINT)
    src_lines, tgt_lines = (_read_lines(p) for p in paths)
    if len(src_lines) != len(tgt_lines):
        raise ValueError(f"Multi30k {split}: {len(src_lines)} lines in {paths[0]} but {len(tgt_lines)} "
                         f"in {paths[1]}; the files must be line-aligned translations")
    return src_lines, tgt_lines


# ----------------------------------------------------------------------------- images

def image_tensor(x, mean: float | Sequence[float] | None = None,
                 std: float | Sequence[float] | None = None) -> torch.Tensor:
    """``uint8`` images ``[N, H, W, C]`` (HWC) or ``[N, H, W]`` -> ``float32 [N, C, H, W]``.

    ``out[n, c, h, w] = (x[n, h, w, c] / 255 - mean[c]) / std[c]``; ``mean``/``std`` are on
    the ``[0, 1]`` scale, one value per channel or a scalar, and default to 0 and 1.

    >>> image_tensor(torch.tensor([[[0, 255]]], dtype=torch.uint8)).tolist()
    [[[[0.0, 1.0]]]]
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
        got = x.dtype if isinstance(x, (torch.Tensor, np.ndarray)) else type(x).__name__
        raise ValueError(f"image_tensor expects uint8 pixels (0-255), got {got}; "
                         "pass the raw images from the loaders")
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    if x.dim() != 4:
        raise ValueError(f"image_tensor expects shape [N, H, W, C] or [N, H, W], got {tuple(x.shape)}")
    out = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    channels = out.shape[1]
    for what, value in (("mean", mean), ("std", std)):
        if value is None:
            continue
        v = torch.as_tensor(value, dtype=torch.float32).flatten()
        if v.numel() not in (1, channels):
            raise ValueError(f"{what} has {v.numel()} values; give one per channel ({channels}) or a scalar")
        if not torch.isfinite(v).all() or (what == "std" and (v <= 0).any()):
            raise ValueError(f"{what} must be finite{' and positive' if what == 'std' else ''}, "
                             f"got {v.tolist()}")
        v = v.view(1, -1, 1, 1)
        out = out.sub_(v) if what == "mean" else out.div_(v)
    return out.contiguous()


# ----------------------------------------------------------------------------- text

# A token is a run of letters/digits (Unicode-aware: umlauts, ß, accents stay inside words)
# or a single other non-space character (punctuation).
_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and split it into words and single punctuation marks.

    Words are maximal runs of Unicode word characters, so German umlauts and ß stay in
    their words (``str.lower``, not ``casefold``, which would turn ß into ss). An
    apostrophe is punctuation: ``"don't"`` -> ``don ' t``.

    >>> tokenize("Zwei Männer stehen am Straßenrand.")
    ['zwei', 'männer', 'stehen', 'am', 'straßenrand', '.']
    """
    if not isinstance(text, str):
        raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
    return _TOKEN.findall(text.lower())


class Vocab:
    """Token <-> id mapping with four specials: ``<pad>`` = 0, ``<unk>`` = 1, ``<bos>`` = 2,
    ``<eos>`` = 3.

    Built from token lists: tokens seen at least ``min_freq`` times get ids 4, 5, ... by
    decreasing count, ties broken alphabetically (so the ids do not depend on sentence
    order); ``max_size`` caps ``len(vocab)`` (specials included) by keeping the most
    frequent. Unknown tokens encode to ``<unk>``.

    >>> v = Vocab([["a", "b", "a"]])
    >>> v.encode(["a", "c"], bos=True, eos=True)
    [2, 4, 1, 3]
    >>> v.decode([2, 4, 5, 3, 0])
    ['a', 'b']
    """

    PAD, UNK, BOS, EOS = 0, 1, 2, 3
    SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")

    def __init__(self, token_lists: Iterable[Sequence[str]] = (), min_freq: int = 1,
                 max_size: int | None = None):
        if isinstance(min_freq, bool) or not isinstance(min_freq, int) or min_freq < 1:
            raise ValueError(f"min_freq must be an integer >= 1, got {min_freq!r}")
        if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int)
                                     or max_size < len(self.SPECIALS)):
            raise ValueError(f"max_size must be None or an integer >= {len(self.SPECIALS)} "
                             f"(it counts the specials), got {max_size!r}")
        if isinstance(token_lists, str):
            raise TypeError("Vocab expects token lists (e.g. [tokenize(s) for s in sentences]), got a str")
        counts: Counter = Counter()
        for i, tokens in enumerate(token_lists):
            if isinstance(tokens, str):
                raise TypeError(f"Vocab expects token lists, but item {i} is a str; "
                                "pass [tokenize(s) for s in sentences]")
            counts.update(tokens)
        for s in self.SPECIALS:  # specials keep their fixed ids, whatever the data holds
            counts.pop(s, None)
        kept = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[: max_size - len(self.SPECIALS)]
        self.min_freq, self.max_size = min_freq, max_size
        self._set_itos(list(self.SPECIALS) + kept)

    def _set_itos(self, itos: list[str]) -> None:
        self.itos = itos
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, min_freq={self.min_freq}, max_size={self.max_size})"

    def encode(self, tokens: Sequence[str], bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of ``tokens`` (unknown ones -> ``<unk>``), optionally wrapped in ``<bos>``/``<eos>``."""
        if isinstance(tokens, str):
            raise TypeError("encode expects a token list; use vocab.encode(tokenize(sentence))")
        ids = [self.stoi.get(t, self.UNK) for t in tokens]
        return ([self.BOS] if bos else []) + ids + ([self.EOS] if eos else [])

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_specials: bool = True) -> list[str]:
        """Tokens of ``ids``. With ``skip_specials`` (default) it stops at the first ``<eos>`` and
        drops ``<pad>`` and ``<bos>`` (``<unk>`` stays: it marks a lost word)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects one sequence (1-D ids), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.itos):
                raise ValueError(f"id {i} is outside the vocabulary [0, {len(self.itos)})")
            if skip_specials:
                if i == self.EOS:
                    break
                if i in (self.PAD, self.BOS):
                    continue
            out.append(self.itos[i])
        return out

    def to_dict(self) -> dict:
        """JSON-ready state (for checkpoints); :meth:`from_dict` restores it exactly."""
        return {"itos": list(self.itos), "min_freq": self.min_freq, "max_size": self.max_size}

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        """Inverse of :meth:`to_dict`."""
        itos = d.get("itos") if isinstance(d, dict) else None
        if not isinstance(itos, list) or not all(isinstance(t, str) for t in itos):
            raise ValueError("Vocab.from_dict needs a dict with 'itos': a list of token strings "
                             "(as written by Vocab.to_dict)")
        if tuple(itos[: len(cls.SPECIALS)]) != cls.SPECIALS:
            raise ValueError(f"Vocab.from_dict: 'itos' must start with the specials {list(cls.SPECIALS)}, "
                             f"got {itos[: len(cls.SPECIALS)]}")
        if len(set(itos)) != len(itos):
            dup = sorted(t for t, c in Counter(itos).items() if c > 1)
            raise ValueError(f"Vocab.from_dict: 'itos' has duplicate tokens {dup[:5]}")
        v = cls.__new__(cls)
        v.min_freq, v.max_size = d.get("min_freq", 1), d.get("max_size")
        v._set_itos(list(itos))
        return v


def _as_tokens(sent, what: str, i: int) -> list[str]:
    if isinstance(sent, str):
        return tokenize(sent)
    if isinstance(sent, (list, tuple)) and all(isinstance(t, str) for t in sent):
        return list(sent)
    raise TypeError(f"{what}[{i}] must be a sentence (str) or a list of token strings, "
                    f"got {type(sent).__name__}")


def encode_pairs(src_sents: Sequence, tgt_sents: Sequence, src_vocab: Vocab, tgt_vocab: Vocab,
                 max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sentence pairs -> padded id tensors ``(src LongTensor[N, S], tgt LongTensor[N, T])``.

    A sentence is a ``str`` (passed through :func:`tokenize`) or a token list. Row ``i`` of
    ``src`` is ``src_vocab.encode(src_i)`` and row ``i`` of ``tgt`` is
    ``<bos> tgt_vocab.encode(tgt_i) <eos>``, each right-padded with ``<pad>`` (id 0) to the
    longest row. Truncation: with ``max_len`` (>= 2) no row is longer than ``max_len``: a
    source keeps its first ``max_len`` tokens, a target its first ``max_len - 2`` tokens
    and still ends in ``<eos>``.

    >>> v = Vocab([["a", "b"]])
    >>> s, t = encode_pairs([["a", "b"], ["b"]], [["a"], ["a", "b"]], v, v)
    >>> s.tolist(), t.tolist()
    ([[4, 5], [5, 0]], [[2, 4, 3, 0], [2, 4, 5, 3]])
    """
    if len(src_sents) != len(tgt_sents):
        raise ValueError(f"{len(src_sents)} source but {len(tgt_sents)} target sentences; "
                         "they must be aligned pairs")
    if len(src_sents) == 0:
        raise ValueError("no sentence pairs to encode")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2):
        raise ValueError(f"max_len must be None or an integer >= 2 (room for <bos> and <eos>), got {max_len!r}")
    src_rows, tgt_rows = [], []
    for i, (s, t) in enumerate(zip(src_sents, tgt_sents)):
        s_tok, t_tok = _as_tokens(s, "src_sents", i), _as_tokens(t, "tgt_sents", i)
        if not s_tok:
            # An all-<pad> source would leave attention nothing to attend to (NaN under masking).
            raise ValueError(f"src_sents[{i}] is empty after tokenisation; drop that pair")
        if max_len is not None:
            s_tok, t_tok = s_tok[:max_len], t_tok[: max_len - 2]
        src_rows.append(src_vocab.encode(s_tok))
        tgt_rows.append(tgt_vocab.encode(t_tok, bos=True, eos=True))

    def pad(rows: list[list[int]]) -> torch.Tensor:
        out = torch.full((len(rows), max(map(len, rows))), Vocab.PAD, dtype=torch.long)
        for r, ids in enumerate(rows):
            out[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    return pad(src_rows), pad(tgt_rows)
