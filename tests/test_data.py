"""cotune.data: builtin corpus, user text and .bin files, caching and errors."""

from __future__ import annotations

import ast
import json
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cotune.data import DataInfo, default_cache_dir, open_splits, prepare_data
from cotune.errors import UserError

BUILTIN = "builtin:stdlib-docstrings"


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the builtin corpus, shared by every test file of the session (it takes seconds to build)."""
    return tmp_path_factory.getbasetemp() / "cotune-builtin-cache"


@pytest.fixture(scope="session")
def builtin(builtin_cache: Path) -> DataInfo:
    return prepare_data(BUILTIN, builtin_cache)


def _bytes(tokens: np.ndarray) -> bytes:
    return tokens.astype(np.uint8).tobytes()


def test_builtin_corpus_is_byte_level_with_a_small_held_out_split(builtin: DataInfo) -> None:
    train, val = open_splits(builtin)
    assert builtin.vocab_size == 256
    assert (len(train), len(val)) == (builtin.n_train_tokens, builtin.n_val_tokens)
    assert 500_000 < len(train) + len(val) <= 4_100_000
    assert 0.03 < len(val) / (len(train) + len(val)) < 0.25
    assert int(train.max()) < 256 and int(val.max()) < 256
    assert "standard library" in builtin.source
    text = _bytes(train[:100_000]).decode("utf-8", errors="replace")
    assert "Return" in text  # docstrings, not code


def test_builtin_split_is_by_file(builtin: DataInfo) -> None:
    """Every val file's module docstring is in val and not in train, and the other way round."""
    meta = json.loads((builtin.train_path.parent / "meta.json").read_text())
    files = meta["files"]
    assert files["train"] and files["val"]
    assert not set(files["train"]) & set(files["val"])
    assert not any("test" in Path(f).parts or "site-packages" in f for f in files["train"] + files["val"])
    splits = dict(zip(("train", "val"), map(_bytes, open_splits(builtin)), strict=True))
    root = Path(sysconfig.get_paths()["stdlib"])
    checked = 0
    for split, other in (("val", "train"), ("train", "val")):
        for rel in files[split][:200]:
            doc = ast.get_docstring(ast.parse((root / rel).read_bytes()))
            if doc and len(doc) >= 200:  # long enough to be unique to its file
                assert doc.encode() in splits[split], rel
                assert doc.encode() not in splits[other], rel
                checked += 1
    assert checked > 20


def test_builtin_corpus_is_deterministic_and_cached(builtin: DataInfo, builtin_cache: Path, tmp_path: Path) -> None:
    t = time.perf_counter()
    again = prepare_data(BUILTIN, builtin_cache)
    assert time.perf_counter() - t < 0.5  # read from the cache, not gathered again
    assert again == builtin
    fresh = prepare_data(BUILTIN, tmp_path)  # gathered from scratch elsewhere
    assert fresh.train_path != builtin.train_path
    assert fresh.train_path.read_bytes() == builtin.train_path.read_bytes()
    assert fresh.val_path.read_bytes() == builtin.val_path.read_bytes()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [builtin.train_path.parent.name]  # no temp left


def test_text_file_holds_out_the_last_tenth(tmp_path: Path) -> None:
    text = bytes(range(256)) * 40  # 10240 bytes
    path = tmp_path / "corpus.txt"
    path.write_bytes(text)
    info = prepare_data(str(path), tmp_path / "cache")
    train, val = open_splits(info)
    assert info.vocab_size == 256
    assert (info.n_train_tokens, info.n_val_tokens) == (9216, 1024)
    assert _bytes(train) + _bytes(val) == text
    assert train.dtype == np.uint16


def test_text_cache_is_keyed_by_content(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    a.write_text("hello world " * 100)
    b.write_text("hello world " * 100)
    c.write_text("other words " * 100)
    info_a, info_b, info_c = (prepare_data(str(p), cache) for p in (a, b, c))
    assert info_a.train_path == info_b.train_path  # same bytes, one cached copy
    assert info_c.train_path != info_a.train_path
    a.write_text("changed now " * 100)
    assert prepare_data(str(a), cache).train_path not in (info_a.train_path, info_c.train_path)


def test_concurrent_preparation_publishes_one_complete_copy(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"abcdefgh" * 50_000)
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(8) as pool:
        infos = list(pool.map(lambda _: prepare_data(str(path), cache), range(8)))
    assert all(info == infos[0] for info in infos)
    assert _bytes(np.concatenate(open_splits(infos[0]))) == path.read_bytes()
    assert len(list((cache / "data").iterdir())) == 1  # the losers' temp folders are gone


def test_bin_with_sibling_val_bin_is_used_in_place(tmp_path: Path) -> None:
    train_tokens = np.arange(1000, dtype=np.uint16) % 300  # max id 299 -> vocab 320
    val_tokens = np.full(100, 7, dtype=np.uint16)
    train_tokens.tofile(tmp_path / "train.bin")
    val_tokens.tofile(tmp_path / "val.bin")
    info = prepare_data(str(tmp_path / "train.bin"), tmp_path / "cache")
    assert info.train_path == (tmp_path / "train.bin").resolve()
    assert info.val_path == (tmp_path / "val.bin").resolve()
    assert info.vocab_size == 320
    train, val = open_splits(info)
    np.testing.assert_array_equal(train, train_tokens)
    np.testing.assert_array_equal(val, val_tokens)


@pytest.mark.parametrize(("max_id", "vocab"), [(0, 64), (63, 64), (64, 128), (50256, 50304)])
def test_bin_without_sibling_holds_out_the_last_tenth(tmp_path: Path, max_id: int, vocab: int) -> None:
    tokens = np.linspace(0, max_id, 2000).round().astype(np.uint16)  # largest id max_id, in the val part
    tokens.tofile(tmp_path / "tokens.bin")
    (tmp_path / "val.bin").write_bytes(b"\0\0")  # ignored: the file is not named train.bin
    info = prepare_data(str(tmp_path / "tokens.bin"), tmp_path / "cache")
    assert info.vocab_size == vocab
    assert info.val_path == info.train_path
    train, val = open_splits(info)
    np.testing.assert_array_equal(train, tokens[:1800])
    np.testing.assert_array_equal(val, tokens[1800:])


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "corpus.txt"
    with pytest.raises(UserError, match="nope/corpus.txt") as e:
        prepare_data(str(missing), tmp_path / "cache")
    assert "builtin:stdlib-docstrings" in str(e.value)  # says what is valid


def test_unknown_builtin_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"builtin:shakespeare.*builtin:stdlib-docstrings"):
        prepare_data("builtin:shakespeare", tmp_path)


def test_too_few_tokens_for_one_sequence(tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_bytes(b"x" * 300)  # 270 train / 30 val bytes
    assert prepare_data(str(path), tmp_path / "cache", seq_len=29).n_val_tokens == 30
    with pytest.raises(UserError, match=r"seq_len \+ 1 = 65.*270 train and 30 val"):
        prepare_data(str(path), tmp_path / "cache", seq_len=64)


def test_odd_sized_bin_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "bad.bin").write_bytes(b"\0" * 201)
    with pytest.raises(UserError, match="bad.bin.*odd number of bytes"):
        prepare_data(str(tmp_path / "bad.bin"), tmp_path / "cache")


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "cotune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "cotune"
