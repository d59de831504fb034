"""Data loaders of ibnorm.lab.experiments: shapes, dtypes, sizes, file parsing and error messages.

Tests on the real Fashion-MNIST and Austen files skip when the files are absent (run
`make data`, i.e. scripts/fetch_data.sh); everything else runs on small files made here.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import random
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ibnorm.lab.experiments import data as D

# ---------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray, code: int = 0x08, *, compress: bool | None = None) -> Path:
    """An idx file of ``array`` (big-endian), gzip-compressed when the name ends in .gz."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    payload = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += np.ascontiguousarray(array, dtype=dtype).tobytes()
    if compress if compress is not None else path.name.endswith(".gz"):
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def write_fake_fashion(folder: Path, n_train: int = 30, n_test: int = 10, gz: bool = True) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8))
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", np.arange(n_train, dtype=np.uint8) % 10)
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8))
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", np.arange(n_test, dtype=np.uint8) % 10)
    return folder


def check_splits(splits: D.Splits, sizes: dict[str, int], input_shape: tuple[int, ...], num_classes: int) -> None:
    assert splits.sizes == sizes
    assert splits.input_shape == input_shape and splits.num_classes == num_classes
    for name in ("train", "val", "test"):
        x, y = getattr(splits, name)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape) == (sizes[name], *input_shape) and tuple(y.shape) == (sizes[name],)
        assert int(y.min()) >= 0 and int(y.max()) < num_classes
        assert torch.isfinite(x).all()


# ---------------------------------------------------------------------------- MNIST-1D


@pytest.fixture(scope="module")
def mnist1d():
    pytest.importorskip("mnist1d", reason="mnist1d not installed (pip install mnist1d)")
    saved = random.getstate(), np.random.get_state()
    random.seed(123)
    np.random.seed(123)
    before = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    splits = D.load_mnist1d()
    after = (random.random(), np.random.rand())
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    return splits, before == after


def test_mnist1d_shapes_sizes_and_labels(mnist1d):
    splits, _ = mnist1d
    check_splits(splits, {"train": 3600, "val": 400, "test": 1000}, (40,), 10)
    assert splits.name == "mnist1d"
    for name in ("train", "val", "test"):
        assert set(getattr(splits, name)[1].tolist()) == set(range(10))
    # The package standardizes the whole set; train is close to mean 0, std 1.
    x = splits.train[0]
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05


def test_mnist1d_documents_published_accuracy_and_restores_rng(mnist1d):
    splits, rng_restored = mnist1d
    assert rng_restored, "load_mnist1d must leave Python's and NumPy's global random state as it found them"
    assert splits.info["published_accuracy"] == {"logistic": 32.0, "mlp": 68.0, "cnn": 94.0, "gru": 91.0}
    doc = D.load_mnist1d.__doc__
    assert all(f"{pct}%" in doc for pct in ("32", "68", "94"))


def test_mnist1d_missing_package_names_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match="pip install mnist1d"):
        D.load_mnist1d()


def test_mnist1d_rejects_bad_arguments():
    with pytest.raises(TypeError, match="seed"):
        D.load_mnist1d(seed=1.5)
    with pytest.raises(ValueError, match="val_fraction"):
        D.load_mnist1d(val_fraction=1.0)


# ---------------------------------------------------------------------------- idx parser


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_round_trips_uint8(tmp_path, name):
    array = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    out = D.read_idx(write_idx(tmp_path / name, array))
    assert out.dtype == np.uint8 and out.shape == (5, 28, 28)
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize(
    "code,dtype", [(0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)]
)
def test_read_idx_other_types_in_native_order(tmp_path, code, dtype):
    array = np.arange(-6, 6).reshape(3, 4).astype(dtype)
    out = D.read_idx(write_idx(tmp_path / "x.idx", array, code))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_read_idx_recognizes_gzip_by_content(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    out = D.read_idx(write_idx(tmp_path / "labels-no-gz-suffix", array, compress=True))
    np.testing.assert_array_equal(out, array)


def test_read_idx_bad_magic_number_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x07\x01" + struct.pack(">I", 3) + b"abc"))
    with pytest.raises(ValueError, match=r"bad\.gz is not an idx file: bad magic number 0x00000701"):
        D.read_idx(path)
    path.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"a")
    with pytest.raises(ValueError, match="bad magic number"):
        D.read_idx(path)


def test_read_idx_size_mismatch_and_truncation_are_clear_errors(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 28, 28) + bytes(100))
    with pytest.raises(ValueError, match=r"short is corrupt: its header says shape \(2, 28, 28\)"):
        D.read_idx(path)
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">I", 2))
    with pytest.raises(ValueError, match="truncated"):
        D.read_idx(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="not an idx file"):
        D.read_idx(path)


def test_read_idx_corrupt_gzip_and_missing_file(tmp_path):
    good = gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"abcd")
    path = tmp_path / "cut.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"cut\.gz is not a valid gzip file"):
        D.read_idx(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.read_idx(tmp_path / "nope.gz")


# ---------------------------------------------------------------------------- Fashion-MNIST (small files)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_loader_on_small_files(tmp_path, gz):
    folder = write_fake_fashion(tmp_path / "fm", gz=gz)
    splits = D.load_fashion_mnist(folder, val_size=6)
    check_splits(splits, {"train": 24, "val": 6, "test": 10}, (1, 28, 28), 10)
    assert splits.name == "fashion-mnist" and splits.info["source"] == str(folder)
    # Standardized with the statistics of the train split only.
    x = splits.train[0].double()
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-5
    raw = D.read_idx(folder / ("train-images-idx3-ubyte" + (".gz" if gz else ""))).astype(np.float64) / 255
    assert splits.info["mean"] == pytest.approx(raw[:24].mean()) and splits.info["std"] == pytest.approx(
        raw[:24].std(ddof=1)
    )
    # The validation split is the last val_size training examples, in file order.
    assert splits.val[1].tolist() == [i % 10 for i in range(24, 30)]
    expected = (torch.from_numpy(raw[24:]).float() - splits.info["mean"]) / splits.info["std"]
    torch.testing.assert_close(splits.val[0][:, 0], expected, rtol=1e-5, atol=1e-5)


def test_fashion_mnist_unstandardized_is_in_unit_interval(tmp_path):
    splits = D.load_fashion_mnist(write_fake_fashion(tmp_path), val_size=5, standardize=False)
    for x, _ in (splits.train, splits.val, splits.test):
        assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert "mean" not in splits.info


def test_fashion_mnist_search_order(tmp_path, monkeypatch):
    env_dir = write_fake_fashion(tmp_path / "env" / "fashion-mnist")
    monkeypatch.setenv(D.DATA_DIR_ENV, str(tmp_path / "env"))
    assert D.find_fashion_mnist()["train_images"].parent == env_dir
    # data_dir may also be a folder with a fashion-mnist/ sub-folder.
    assert D.find_fashion_mnist(tmp_path / "env")["test_labels"].parent == env_dir


def test_the_checkouts_data_folder_is_searched_from_any_working_directory(tmp_path, monkeypatch):
    from ibnorm.lab.experiments.data import locations

    checkout = Path(__file__).resolve().parents[1]
    if not Path(locations.__file__).resolve().is_relative_to(checkout):
        pytest.skip("ibnorm is installed, not imported from this checkout")
    monkeypatch.delenv(D.DATA_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    dirs = locations._candidate_dirs("fashion-mnist", None, [Path("/system")])
    assert dirs == [checkout / ".data" / "fashion-mnist", tmp_path / ".data" / "fashion-mnist", Path("/system")]


def test_fashion_mnist_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        D.load_fashion_mnist(tmp_path / "nowhere")
    message = str(info.value)
    for fix in ("make data", "apt-get install dataset-fashion-mnist", "--data-dir", "train-images-idx3-ubyte.gz"):
        assert fix in message
    assert str(tmp_path / "nowhere") in message


def test_fashion_mnist_partial_folder_names_the_missing_files(tmp_path):
    folder = write_fake_fashion(tmp_path)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="lacks t10k-labels-idx1-ubyte.gz"):
        D.load_fashion_mnist(folder)


def test_fashion_mnist_inconsistent_files_are_clear_errors(tmp_path):
    folder = write_fake_fashion(tmp_path)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(9, dtype=np.uint8))
    with pytest.raises(ValueError, match="10 images but .* 9 labels"):
        D.load_fashion_mnist(folder, val_size=5)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.full(10, 12, dtype=np.uint8))
    with pytest.raises(ValueError, match="label 12"):
        D.load_fashion_mnist(folder, val_size=5)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(10, dtype=np.uint8))
    with pytest.raises(ValueError, match="val_size=30 must be smaller than the 30"):
        D.load_fashion_mnist(folder, val_size=30)


# ---------------------------------------------------------------------------- Fashion-MNIST (real files)


@pytest.fixture(scope="module")
def fashion_mnist():
    try:
        D.find_fashion_mnist()
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST files not found (run `make data`, i.e. scripts/fetch_data.sh)")
    return D.load_fashion_mnist()


def test_fashion_mnist_real_data(fashion_mnist):
    check_splits(fashion_mnist, {"train": 55000, "val": 5000, "test": 10000}, (1, 28, 28), 10)
    assert fashion_mnist.info["mean"] == pytest.approx(0.286, abs=0.002)
    assert fashion_mnist.info["std"] == pytest.approx(0.353, abs=0.002)
    x = fashion_mnist.train[0]
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3
    # Test set: exactly 1000 of each class; validation: every class well represented.
    assert torch.bincount(fashion_mnist.test[1]).tolist() == [1000] * 10
    assert int(torch.bincount(fashion_mnist.val[1], minlength=10).min()) > 400


# ---------------------------------------------------------------------------- R lazy-load databases


def r_serialize(obj) -> bytes:
    """Uncompressed R serialization (``X\\n`` + XDR) of a Python object, written by rdata."""
    rdata = pytest.importorskip("rdata", reason="rdata not installed (pip install rdata)")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "obj.rds"
        rdata.write_rds(path, obj)  # gzip-compressed
        return gzip.decompress(path.read_bytes())


def frame(raw: bytes, compressed: int, kind: bytes = b"Z") -> bytes:
    """One lazy-load database entry as R's R_compress1/2/3 writes it."""
    size = struct.pack(">I", len(raw))
    if compressed == 0:
        return raw
    if compressed == 1:
        return size + zlib.compress(raw)
    body = {
        b"Z": zlib.compress,
        b"2": bz2.compress,
        b"0": lambda b: b,
        b"X": lambda b: lzma.compress(b, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}]),
    }[kind](raw)
    return size + kind + body


def write_lazyload_db(base: Path, objects: dict, compressed: int = 1, kind: bytes = b"Z") -> Path:
    rdata = pytest.importorskip("rdata", reason="rdata not installed (pip install rdata)")
    base.parent.mkdir(parents=True, exist_ok=True)
    blob, variables = b"", {}
    for name, obj in objects.items():
        entry = frame(r_serialize(obj), compressed, kind)
        variables[name] = np.array([len(blob), len(entry)], dtype=np.int32)
        blob += entry
    base.with_suffix(".rdb").write_bytes(blob)
    flag = bool(compressed) if compressed <= 1 else compressed
    rdata.write_rds(base.with_suffix(".rdx"), {"variables": variables, "references": {}, "compressed": flag})
    return base


@pytest.mark.parametrize("compressed,kind", [(1, b"Z"), (0, b""), (2, b"2"), (2, b"0"), (3, b"X"), (3, b"Z")])
def test_read_r_lazyload_db_all_compressions(tmp_path, compressed, kind):
    objects = {"a": np.array(["first line", "", "£ second"]), "b": np.array(["x"])}
    base = write_lazyload_db(tmp_path / "Rdata", objects, compressed, kind)
    out = D.read_r_lazyload_db(base)
    assert sorted(out) == ["a", "b"] and list(out["a"]) == ["first line", "", "£ second"]
    assert list(D.read_r_lazyload_db(str(base) + ".rdx", ["b"])) == ["b"]
    with pytest.raises(KeyError, match="no object"):
        D.read_r_lazyload_db(base, ["c"])


def test_read_r_lazyload_db_corrupt_entry(tmp_path):
    base = write_lazyload_db(tmp_path / "Rdata", {"a": np.array(["text"])})
    rdb = base.with_suffix(".rdb")
    rdb.write_bytes(rdb.read_bytes()[:4] + b"garbage" + rdb.read_bytes()[11:])
    with pytest.raises(ValueError, match="entry 'a' of .* could not be decompressed"):
        D.read_r_lazyload_db(base)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.read_r_lazyload_db(tmp_path / "missing")


def fake_austen(root: Path) -> Path:
    books = {
        name: np.array([title.upper(), "", f"{name} line one", f"{name} line two"]) for name, title in D.AUSTEN_BOOKS
    }
    write_lazyload_db(root / "data" / "Rdata", dict(reversed(list(books.items()))))
    return root


@pytest.mark.parametrize("layout", ["package", "dpkg-tree", "parent"])
def test_load_austen_text_on_a_fake_package(tmp_path, layout):
    if layout == "package":
        data_dir = fake_austen(tmp_path / "janeaustenr")
    elif layout == "dpkg-tree":
        fake_austen(tmp_path / "usr/lib/R/site-library/janeaustenr")
        data_dir = tmp_path
    else:
        fake_austen(tmp_path / "janeaustenr")
        data_dir = tmp_path
    text = D.load_austen_text(data_dir)
    lines = text.split("\n")
    assert len(lines) == 4 * 6
    # Lines joined with newlines, novels in publication order whatever the order in the database.
    assert lines[:4] == ["SENSE & SENSIBILITY", "", "sensesensibility line one", "sensesensibility line two"]
    assert [lines[i] for i in range(0, 24, 4)] == [title.upper() for _, title in D.AUSTEN_BOOKS]
    assert D.load_corpus("austen", data_dir) == text


def test_austen_found_through_env_var(tmp_path, monkeypatch):
    fake_austen(tmp_path / "janeaustenr")
    monkeypatch.setenv(D.DATA_DIR_ENV, str(tmp_path))
    assert D.find_austen() == tmp_path / "janeaustenr"


def test_austen_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        D.load_austen_text(tmp_path / "nowhere")
    message = str(info.value)
    assert "make data" in message and "apt-get download r-cran-janeaustenr" in message and "dpkg -x" in message


# ---------------------------------------------------------------------------- Austen (real files)


@pytest.fixture(scope="module")
def austen():
    try:
        D.find_austen()
    except FileNotFoundError:
        pytest.skip("janeaustenr files not found (run `make data`, i.e. scripts/fetch_data.sh)")
    pytest.importorskip("rdata", reason="rdata not installed (pip install rdata)")
    return D.load_austen_text()


def test_austen_real_text(austen):
    assert len(austen.encode("utf-8")) > 3_000_000
    for word in ("Elizabeth", "Emma", "Mr. Darcy", "Anne Elliot", "Fanny Price", "Catherine Morland", "Elinor"):
        assert word in austen
    assert austen.startswith("SENSE AND SENSIBILITY\n")
    assert austen.rstrip().endswith("Finis")
    titles = [
        "SENSE AND SENSIBILITY",
        "PRIDE AND PREJUDICE",
        "MANSFIELD PARK",
        "\nEMMA\n",
        "NORTHANGER ABBEY",
        "\nPersuasion\n",
    ]
    positions = [austen.index(title) for title in titles]
    assert positions == sorted(positions)


# ---------------------------------------------------------------------------- other corpora


def test_pydoc_text():
    text = D.load_pydoc_text()
    assert len(text.encode("utf-8")) > 400_000
    assert "lambda" in text and text == D.load_pydoc_text() == D.load_corpus("pydoc")


def test_load_text_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffhéllo\nwörld".encode("utf-8"))
    assert D.load_text_file(path) == "héllo\nwörld"
    assert D.load_corpus(f"text:{path}") == "héllo\nwörld"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"not valid UTF-8 \(byte 0xe9 at offset 3\)"):
        D.load_text_file(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_corpus(f"text:{tmp_path / 'missing.txt'}")
    with pytest.raises(FileNotFoundError):
        D.load_text_file(tmp_path)


@pytest.mark.parametrize("name", ["shakespeare", "text:", "Austen", ""])
def test_load_corpus_unknown_name_lists_accepted(name):
    with pytest.raises(ValueError) as info:
        D.load_corpus(name)
    for accepted in ("'austen'", "'pydoc'", "'text:PATH'"):
        assert accepted in str(info.value)
    with pytest.raises(TypeError):
        D.load_corpus(3)


# ---------------------------------------------------------------------------- characters and LM splits


def test_char_vocab_round_trip():
    text = "Hello, wörld! £ ✓ 日本\n\ttabs"
    vocab = D.CharVocab(text)
    assert list(vocab.chars) == sorted(set(text)) and len(vocab) == len(set(text))
    ids = vocab.encode(text)
    assert ids.dtype == torch.int64 and ids.shape == (len(text),)
    assert vocab.decode(ids) == text and vocab.decode(ids.tolist()) == text
    assert vocab.decode(torch.tensor([], dtype=torch.long)) == "" and vocab.encode("").shape == (0,)
    assert vocab.encode("ll").tolist() == [vocab.chars.index("l")] * 2


def test_char_vocab_errors():
    vocab = D.CharVocab("abc")
    with pytest.raises(ValueError, match="not in the vocabulary: 'dz'"):
        vocab.encode("abdz")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        vocab.decode([0, 3])
    with pytest.raises(ValueError, match="1-D"):
        vocab.decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        D.CharVocab("")
    with pytest.raises(TypeError):
        D.CharVocab(b"abc")


def test_lm_splits_are_contiguous_train_val_test():
    text = "abcdefghij" * 10
    tokens = D.CharVocab(text).encode(text)
    splits = D.lm_splits(tokens, val_fraction=0.1, test_fraction=0.2)
    assert {k: len(v) for k, v in splits.items()} == {"train": 70, "val": 10, "test": 20}
    assert all(v.dtype == torch.int64 for v in splits.values())
    assert torch.equal(torch.cat([splits["train"], splits["val"], splits["test"]]), tokens)
    from_text = D.lm_splits(text, val_fraction=0.1, test_fraction=0.2)
    assert all(torch.equal(from_text[k], splits[k]) for k in splits)
    assert len(D.lm_splits(tokens, 0.0, 0.0)["val"]) == 0


def test_lm_splits_errors():
    tokens = torch.arange(100)
    with pytest.raises(ValueError, match="must be < 1"):
        D.lm_splits(tokens, 0.5, 0.5)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        D.lm_splits(tokens, -0.1)
    with pytest.raises(ValueError, match="too short"):
        D.lm_splits(torch.arange(5), 0.1, 0.1)
    with pytest.raises(ValueError, match="1-D integer"):
        D.lm_splits(torch.zeros(10))
    with pytest.raises(TypeError):
        D.lm_splits([1, 2, 3])


def test_splits_checks_shapes():
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    splits = D.Splits("toy", (x, y), (x, y), (x, y), 2, (3,))
    assert "toy" in repr(splits) and splits.sizes == {"train": 4, "val": 4, "test": 4}
    with pytest.raises(ValueError, match="expected x"):
        D.Splits("toy", (x, y[:3]), (x, y), (x, y), 2, (3,))
    with pytest.raises(TypeError, match="tuple"):
        D.Splits("toy", [x, y], (x, y), (x, y), 2, (3,))
