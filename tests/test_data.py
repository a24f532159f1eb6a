"""cotune.data: every source format, every tokenizer kind, preprocessing, the split, the cache and bad input."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import sysconfig
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cotune.data import DataInfo, default_cache_dir, open_splits, prepare_data, token_dtype
from cotune.errors import UserError

BUILTIN = "builtin:stdlib-docstrings"
EOT = 256  # the bytes tokenizer's end-of-text id
WORDS = ("the model reads tokens and learns to predict the next one from windows of text "
         "cut out of documents joined by end of text markers").split()


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the builtin corpus, shared by every test file of the session (it takes seconds to build)."""
    return tmp_path_factory.getbasetemp() / "cotune-builtin-cache"


@pytest.fixture(scope="session")
def builtin(builtin_cache: Path) -> DataInfo:
    return prepare_data(BUILTIN, builtin_cache)


def _docs(tokens: np.ndarray, eot: int = EOT) -> list[str]:
    """A byte-level stream cut at each end-of-text id into its documents (the stream ends with one)."""
    assert len(tokens) == 0 or int(tokens[-1]) == eot
    cuts = np.flatnonzero(np.asarray(tokens) == eot)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [np.asarray(tokens[s:e], dtype=np.uint8).tobytes().decode("utf-8") for s, e in zip(starts, cuts)]


def _id_docs(tokens: np.ndarray, eot: int) -> list[list[int]]:
    """A stream of any tokenizer cut at each end-of-text id into its documents' ids."""
    out, doc = [], []
    for t in tokens.tolist():
        if t == eot:
            out.append(doc)
            doc = []
        else:
            doc.append(t)
    assert not doc  # the stream ends with an end-of-text id
    return out


def _split_docs(info: DataInfo) -> tuple[list[str], list[str]]:
    train, val = open_splits(info)
    return _docs(train), _docs(val)


def _corpus(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"Document {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(5, 30)))) + "." for i in range(n)]


def _jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _prepare(path: Path, cache: Path, **kw: object) -> DataInfo:
    return prepare_data(str(path), cache, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- the builtin corpus


def test_builtin_corpus_is_byte_level_documents_joined_by_end_of_text(builtin: DataInfo) -> None:
    train, val = open_splits(builtin)
    assert (builtin.vocab_size, builtin.eot_id, builtin.mask_id, builtin.pad_id) == (258, 256, 257, None)
    assert builtin.special_ids == (256, 257) and builtin.dtype == "uint16" and builtin.tokenizer_dir is None
    assert (len(train), len(val)) == (builtin.n_train_tokens, builtin.n_val_tokens)
    assert 500_000 < len(train) + len(val) <= 4_100_000
    assert 0.03 < len(val) / (len(train) + len(val)) < 0.25
    assert int(train.max()) == 256 and int(val.max()) == 256  # bytes and end-of-text; the mask never in data
    meta = json.loads((builtin.train_path.parent / "meta.json").read_text())
    assert int((train == EOT).sum()) == len(meta["files"]["train"])  # one document per file
    assert int((val == EOT).sum()) == len(meta["files"]["val"])
    assert "standard library" in builtin.source and "byte-level" in builtin.source
    assert f"({len(meta['files']['train'])} train / {len(meta['files']['val'])} val)" in builtin.source
    first_docs = _docs(train[: int(np.flatnonzero(train == EOT)[50]) + 1])
    assert len(first_docs) == 51 and any("Return" in d for d in first_docs)  # docstrings, not code


def test_builtin_split_is_by_file(builtin: DataInfo) -> None:
    """Every val file's module docstring is in val and not in train, and the other way round."""
    meta = json.loads((builtin.train_path.parent / "meta.json").read_text())
    files = meta["files"]
    assert files["train"] and files["val"]
    assert not set(files["train"]) & set(files["val"])
    assert not any("test" in Path(f).parts or "site-packages" in f for f in files["train"] + files["val"])
    splits = dict(zip(("train", "val"), ("\x00".join(d) for d in _split_docs(builtin)), strict=True))
    root = Path(sysconfig.get_paths()["stdlib"])
    checked = 0
    for split, other in (("val", "train"), ("train", "val")):
        for rel in files[split][:200]:
            doc = ast.get_docstring(ast.parse((root / rel).read_bytes()))
            if doc and len(doc) >= 200 and doc.isascii():  # long enough to be unique to its file
                assert doc in splits[split], rel
                assert doc not in splits[other], rel
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


# ---------------------------------------------------------------------------- sources and their document rules


def test_text_file_documents_are_paragraphs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cotune.data.sources

    monkeypatch.setattr(cotune.data.sources, "_TEXT_CHUNK_CHARS", 7)  # separators straddle read chunks
    text = "\ufeffpara one\nline two\n\n\npara two\r\n\r\npara three\n  \t \n  para four  \n\n"
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode())
    info = _prepare(path, tmp_path / "cache")
    train, val = _split_docs(info)
    assert sorted(train + val) == ["para four", "para one\nline two", "para three", "para two"]
    assert train and val and info.source.startswith(f"text file {path}: 4 documents")


def test_text_file_with_end_of_text_markers_splits_at_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cotune.data.sources

    monkeypatch.setattr(cotune.data.sources, "_TEXT_CHUNK_CHARS", 5)
    path = tmp_path / "stories.txt"
    path.write_text("story one\n<|endoftext|>\nstory two\n\nstill two<|endoftext|>story three\n<|endoftext|>\n")
    train, val = _split_docs(_prepare(path, tmp_path / "cache"))
    assert sorted(train + val) == ["story one", "story three", "story two\n\nstill two"]


def test_folder_of_text_files_is_one_document_per_file(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    for rel, text in {"a.txt": "alpha\n\nstill alpha", "sub/b.md": "# beta", "c.rst": "gamma", "d.text": "delta",
                      ".hidden.txt": "hidden", ".git/x.txt": "git", "skip.py": "code", "e.TXT": "epsilon"}.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    info = _prepare(folder, tmp_path / "cache")
    train, val = _split_docs(info)
    assert sorted(train + val) == ["# beta", "alpha\n\nstill alpha", "delta", "epsilon", "gamma"]
    assert f"folder {folder} (5 text files): 5 documents" in info.source


def test_jsonl_reads_the_named_field(tmp_path: Path) -> None:
    docs = _corpus(30)
    path = _jsonl(tmp_path / "data.jsonl", [{"id": i, "body": d, "text": "not this"} for i, d in enumerate(docs)])
    info = _prepare(path, tmp_path / "cache", text_field="body")
    train, val = _split_docs(info)
    assert sorted(train + val) == sorted(docs)
    assert info.source.startswith(f"JSON Lines file {path}, field 'body': 30 documents")


def test_folder_of_jsonl_shards_ignores_the_readme(tmp_path: Path) -> None:
    docs = _corpus(20)
    (tmp_path / "ds" / "data").mkdir(parents=True)
    _jsonl(tmp_path / "ds" / "data" / "part-0.jsonl", [{"text": d} for d in docs[:12]])
    _jsonl(tmp_path / "ds" / "data" / "part-1.jsonl", [{"text": d} for d in docs[12:]])
    (tmp_path / "ds" / "README.md").write_text("# a dataset card, not data")
    info = _prepare(tmp_path / "ds", tmp_path / "cache")
    train, val = _split_docs(info)
    assert sorted(train + val) == sorted(docs)
    assert "2 JSON Lines files" in info.source


def test_parquet_and_arrow_files_and_shards_through_datasets(tmp_path: Path) -> None:
    docs = _corpus(40)
    table = pa.table({"n": list(range(40)), "content": docs})
    pq.write_table(table.slice(0, 25), tmp_path / "a.parquet")
    (tmp_path / "shards").mkdir()
    pq.write_table(table.slice(0, 25), tmp_path / "shards" / "0.parquet")
    pq.write_table(table.slice(25), tmp_path / "shards" / "1.parquet")
    with pa.OSFile(str(tmp_path / "b.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)  # what datasets' save_to_disk writes: the Arrow stream format
    cache = tmp_path / "cache"
    one = _prepare(tmp_path / "a.parquet", cache, text_field="content")
    assert sorted(sum(_split_docs(one), [])) == sorted(docs[:25])
    assert one.source.startswith(f"Parquet file {tmp_path / 'a.parquet'}, field 'content': 25 documents")
    shards = _prepare(tmp_path / "shards", cache, text_field="content")
    assert sorted(sum(_split_docs(shards), [])) == sorted(docs)
    arrow = _prepare(tmp_path / "b.arrow", cache, text_field="content")
    assert sorted(sum(_split_docs(arrow), [])) == sorted(docs)
    with pytest.raises(UserError, match=r"b\.arrow must have the text column 'text'.*columns are 'n', 'content'"):
        _prepare(tmp_path / "b.arrow", cache)
    with pytest.raises(UserError, match=r"text field 'n' must hold strings, but row 1 of .*a\.parquet holds a int"):
        _prepare(tmp_path / "a.parquet", cache, text_field="n")


def test_bin_with_sibling_val_bin_is_used_in_place(tmp_path: Path) -> None:
    train_tokens = np.arange(1000, dtype=np.uint16) % 300  # max id 299 -> vocab 320
    val_tokens = np.full(100, 7, dtype=np.uint16)
    train_tokens.tofile(tmp_path / "train.bin")
    val_tokens.tofile(tmp_path / "val.bin")
    info = prepare_data(str(tmp_path / "train.bin"), tmp_path / "cache")
    assert info.train_path == (tmp_path / "train.bin").resolve()
    assert info.val_path == (tmp_path / "val.bin").resolve()
    assert (info.vocab_size, info.dtype, info.eot_id, info.mask_id, info.tokenizer_dir) == (320, "uint16", None, None, None)
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


# ---------------------------------------------------------------------------- preprocessing and the split


def test_preprocessing_normalises_drops_controls_and_empty_documents(tmp_path: Path) -> None:
    records = [
        {"text": "Cafe\u0301 au lait"},  # e + combining acute: NFC makes it one code point
        {"text": "a\x00b\x07c\x1bd\x85e\tf\r\ng\rh"},  # controls dropped but tab and newline; CRLF -> LF
        {"text": "   \n\t "}, {"text": ""}, {"text": None}, {"text": "\x00\x01"},  # empty: dropped
        {"text": "lone \udc80 surrogate"},
    ]
    path = _jsonl(tmp_path / "mixed.jsonl", records)
    info = _prepare(path, tmp_path / "cache")
    train, val = _split_docs(info)
    assert sorted(train + val) == ["Café au lait", "abcde\tf\ngh", "lone \ufffd surrogate"]
    meta = json.loads((info.train_path.parent / "meta.json").read_text())
    assert meta["documents"] == {"train": len(train), "val": len(val), "dropped_empty": 4}


def test_split_is_by_document_stable_and_disjoint(tmp_path: Path) -> None:
    docs = _corpus(300)
    forward = _prepare(_jsonl(tmp_path / "f.jsonl", [{"text": d} for d in docs]), tmp_path / "cache")
    backward = _prepare(_jsonl(tmp_path / "b.jsonl", [{"text": d} for d in reversed(docs)]), tmp_path / "cache")
    train, val = _split_docs(forward)
    assert not set(train) & set(val) and sorted(train + val) == sorted(docs)
    assert 0.04 < len(val) / len(docs) < 0.2
    assert train == [d for d in docs if d in set(train)]  # reading order kept inside a split
    assert [set(s) for s in _split_docs(backward)] == [set(train), set(val)]  # by content, not by position
    assert all(((zlib.crc32(d.encode()) % 10 == 0) == (d in set(val))) for d in docs)  # crc32 decides
    counts = [int((s == EOT).sum()) for s in open_splits(forward)]
    assert counts == [len(train), len(val)]  # one end-of-text after each document


@pytest.mark.parametrize("side", ["train", "val"])
def test_two_documents_put_one_in_each_split(tmp_path: Path, side: str) -> None:
    """Even when both hash to the same split."""
    hashed_val = side == "val"
    docs = [d for d in (f"document number {i}" for i in range(500)) if (zlib.crc32(d.encode()) % 10 == 0) == hashed_val]
    train, val = _split_docs(_prepare(_jsonl(tmp_path / "two.jsonl", [{"text": d} for d in docs[:2]]), tmp_path / "c"))
    assert len(train) == len(val) == 1 and sorted(train + val) == sorted(docs[:2])


# ---------------------------------------------------------------------------- tokenizers


def _word(i: int) -> str:
    return "zq" + "".join(chr(ord("a") + (i // 26**k) % 26) for k in range(3))


@pytest.fixture(scope="module")
def words_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 documents, each a word of its own said 30 times after a shared sentence."""
    path = tmp_path_factory.mktemp("words") / "words.jsonl"
    return _jsonl(path, [{"text": f"the shared sentence comes first. {(_word(i) + ' ') * 30}"} for i in range(40)])


def test_bpe_is_trained_on_the_train_split_only_and_loads_in_transformers(words_jsonl: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    info = _prepare(words_jsonl, tmp_path / "cache", tokenizer="bpe:2000")
    assert (info.eot_id, info.mask_id, info.pad_id, info.special_ids) == (0, 1, 2, (0, 1, 2))
    assert info.tokenizer_dir == info.train_path.parent / "tokenizer"
    assert info.vocab_size < 2000  # the small train split runs out of pairs to merge
    assert f"BPE 2000 ({info.vocab_size:,} tokens: the train split allows no more merges)" in info.source
    byte_train, byte_val = _split_docs(_prepare(words_jsonl, tmp_path / "cache"))  # the split is the tokenizer's too
    tok = Tokenizer.from_file(str(info.tokenizer_dir / "tokenizer.json"))
    train, val = open_splits(info)
    assert [tok.decode(d) for d in _id_docs(train, 0)] == byte_train
    assert [tok.decode(d) for d in _id_docs(val, 0)] == byte_val
    vocab = tok.get_vocab()
    train_words = {d.split()[-1] for d in byte_train}
    val_words = {d.split()[-1] for d in byte_val}
    assert all("Ġ" + w in vocab for w in train_words)  # said 30 times each: merged into one token
    assert not any("Ġ" + w in vocab or w in vocab for w in val_words)  # never seen in training
    hf = AutoTokenizer.from_pretrained(str(info.tokenizer_dir), local_files_only=True)
    assert (hf.eos_token_id, hf.mask_token_id, hf.pad_token_id, len(hf)) == (0, 1, 2, info.vocab_size)
    assert hf(byte_val[0], add_special_tokens=False)["input_ids"] == _id_docs(val, 0)[0]


def test_bpe_is_deterministic(words_jsonl: Path, tmp_path: Path) -> None:
    a = _prepare(words_jsonl, tmp_path / "a", tokenizer="bpe:300")
    b = _prepare(words_jsonl, tmp_path / "b", tokenizer="bpe:300")
    assert a.vocab_size == 300
    assert (a.tokenizer_dir / "tokenizer.json").read_bytes() == (b.tokenizer_dir / "tokenizer.json").read_bytes()
    assert a.train_path.read_bytes() == b.train_path.read_bytes() and a.val_path.read_bytes() == b.val_path.read_bytes()


def test_bpe_encodes_end_of_text_spelled_in_a_document_as_text(tmp_path: Path) -> None:
    docs = [*_corpus(20), "this one spells <|endoftext|> in its text"]
    info = _prepare(_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs]), tmp_path / "cache", tokenizer="bpe:300")
    train, val = open_splits(info)
    assert int((train == 0).sum()) + int((val == 0).sum()) == len(docs)  # only the joins are end-of-text


@pytest.fixture(scope="module")
def local_tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tokenizer folders as save_pretrained writes them: GPT-like (eos), BERT-like (sep, mask, pad), no eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tokenizers")
    gpt = Tokenizer(models.BPE())
    gpt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    gpt.train_from_iterator(_corpus(50), trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=gpt, eos_token="</s>", bos_token="<s>").save_pretrained(root / "gpt")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)),
                                         "document", "##s", ":", "."])}
    bert = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    bert.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    PreTrainedTokenizerFast(tokenizer_object=bert, unk_token="[UNK]", sep_token="[SEP]", cls_token="[CLS]",
                            pad_token="[PAD]", mask_token="[MASK]").save_pretrained(root / "bert")
    PreTrainedTokenizerFast(tokenizer_object=bert, unk_token="[UNK]").save_pretrained(root / "no-eos")
    big = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 70_000)}},
                                     unk_token="[UNK]"))
    big.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=big, unk_token="[UNK]", eos_token="</s>").save_pretrained(root / "big")
    return {name: root / name for name in ("gpt", "bert", "no-eos", "big")}


@pytest.mark.parametrize(("name", "eot", "mask", "pad"), [("gpt", 2, None, None), ("bert", 3, 4, 0)])
def test_local_tokenizer_folder(local_tokenizers: dict[str, Path], tmp_path: Path, name: str, eot: int,
                                mask: int | None, pad: int | None) -> None:
    from transformers import AutoTokenizer

    data = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _corpus(40)])
    info = _prepare(data, tmp_path / "cache", tokenizer=str(local_tokenizers[name]))
    hf = AutoTokenizer.from_pretrained(str(local_tokenizers[name]))
    assert (info.eot_id, info.mask_id, info.pad_id, info.vocab_size) == (eot, mask, pad, len(hf))
    assert set(info.special_ids) == set(hf.all_special_ids) and info.tokenizer_dir == local_tokenizers[name]
    assert f"tokenizer {local_tokenizers[name]} ({len(hf):,} tokens)" in info.source
    byte_splits = _split_docs(_prepare(data, tmp_path / "cache"))
    for docs, tokens in zip(byte_splits, open_splits(info), strict=True):
        expected = [hf(d, add_special_tokens=False)["input_ids"] for d in docs]
        assert _id_docs(tokens, eot) == expected  # no [CLS]/[SEP] added inside documents


def test_a_vocabulary_above_65536_ids_is_stored_as_uint32(local_tokenizers: dict[str, Path], tmp_path: Path) -> None:
    assert (token_dtype(258), token_dtype(65536), token_dtype(65537)) == ("uint16", "uint16", "uint32")
    data = _jsonl(tmp_path / "d.jsonl", [{"text": f"w{i} w69999 w3 w{i * 7}"} for i in range(2, 40)])
    info = _prepare(data, tmp_path / "cache", tokenizer=str(local_tokenizers["big"]))
    train, val = open_splits(info)
    assert (info.dtype, train.dtype, info.vocab_size) == ("uint32", np.uint32, 70_000)
    assert int(train.max()) == 69_999 and info.train_path.stat().st_size == 4 * info.n_train_tokens


# ---------------------------------------------------------------------------- the cache


def test_text_cache_is_keyed_by_content(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    a.write_text("\n\n".join(_corpus(20)))
    b.write_text("\n\n".join(_corpus(20)))
    c.write_text("\n\n".join(_corpus(20, seed=1)))
    info_a, info_b, info_c = (prepare_data(str(p), cache) for p in (a, b, c))
    assert info_a.train_path == info_b.train_path  # same bytes, one cached copy
    assert str(b) in info_b.source  # ... but each call's source names its own file
    assert info_c.train_path != info_a.train_path
    a.write_text("\n\n".join(_corpus(20, seed=2)))
    assert prepare_data(str(a), cache).train_path not in (info_a.train_path, info_c.train_path)


def test_cache_hit_and_misses_by_setting(tmp_path: Path, words_jsonl: Path) -> None:
    cache = tmp_path / "cache"
    data = _jsonl(tmp_path / "d.jsonl", [{"text": d, "other": d.upper()} for d in _corpus(30)])
    calls: list[tuple[str, int, int | None]] = []
    first = _prepare(data, cache, tokenizer="bpe:300", progress=lambda *a: calls.append(a))
    phases = [c[0] for c in calls]
    assert phases[0] == "reading JSON Lines" and "training BPE 300" in phases and phases[-1] == "tokenizing"
    assert all(total is None or 0 <= done <= total for _, done, total in calls)
    assert calls[-1][1:] == (30, 30)
    calls.clear()
    assert _prepare(data, cache, tokenizer="bpe:300", progress=lambda *a: calls.append(a)) == first
    assert calls == []  # a hit reports nothing
    folders = {
        _prepare(data, cache, tokenizer="bpe:300").train_path.parent,
        _prepare(data, cache, tokenizer="bpe:310").train_path.parent,
        _prepare(data, cache, tokenizer="bytes").train_path.parent,
        _prepare(data, cache, tokenizer="bpe:300", text_field="other").train_path.parent,
    }
    assert len(folders) == 4
    assert _prepare(data, cache, tokenizer="bytes", seq_len=5).train_path.parent in folders  # seq_len: not a key


def test_local_tokenizer_contents_are_in_the_key(local_tokenizers: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(local_tokenizers["gpt"], folder)
    data = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _corpus(20)])
    before = _prepare(data, tmp_path / "cache", tokenizer=str(folder))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<s>"}))
    after = _prepare(data, tmp_path / "cache", tokenizer=str(folder))
    assert after.train_path != before.train_path and (before.eot_id, after.eot_id) == (2, 1)
    (folder / "model.safetensors").write_bytes(b"weights are not the tokenizer")
    assert _prepare(data, tmp_path / "cache", tokenizer=str(folder)).train_path == after.train_path


def test_a_cache_hit_imports_no_tokenizer_or_data_library(local_tokenizers: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    pq.write_table(pa.table({"text": _corpus(30)}), tmp_path / "d.parquet")
    data = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _corpus(30)])
    calls = [(str(tmp_path / "d.parquet"), "bpe:300"), (str(data), str(local_tokenizers["gpt"]))]
    expected = [prepare_data(spec, cache, tokenizer=tok) for spec, tok in calls]
    script = (
        "import sys\nfrom pathlib import Path\nfrom cotune.data import prepare_data\n"
        f"infos = [prepare_data(s, Path({str(cache)!r}), tokenizer=t) for s, t in {calls!r}]\n"
        "print([str(i.train_path) for i in infos])\n"
        "print(sorted(m for m in ('tokenizers', 'transformers', 'datasets', 'pyarrow', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    paths, modules = out.stdout.splitlines()
    assert paths == str([str(i.train_path) for i in expected])
    assert modules == "[]"


def test_concurrent_preparation_publishes_one_complete_copy(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    docs = _corpus(2000)
    path.write_text("\n\n".join(docs))
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(8) as pool:
        infos = list(pool.map(lambda _: prepare_data(str(path), cache), range(8)))
    assert all(info == infos[0] for info in infos)
    assert sorted(sum(_split_docs(infos[0]), [])) == sorted(docs)
    assert len(list((cache / "data").iterdir())) == 1  # the losers' temp folders are gone


# ---------------------------------------------------------------------------- bad input


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "corpus.txt"
    with pytest.raises(UserError, match="nope/corpus.txt") as e:
        prepare_data(str(missing), tmp_path / "cache")
    assert "builtin:stdlib-docstrings" in str(e.value) and "JSON Lines" in str(e.value)  # says what is valid


def test_unknown_builtin_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"builtin:shakespeare.*builtin:stdlib-docstrings"):
        prepare_data("builtin:shakespeare", tmp_path)


def test_too_few_tokens_for_one_sequence(tmp_path: Path) -> None:
    path = tmp_path / "small.txt"
    path.write_text("\n\n".join(_corpus(20)))
    info = prepare_data(str(path), tmp_path / "cache")
    assert prepare_data(str(path), tmp_path / "cache", seq_len=info.n_val_tokens - 1) == info
    with pytest.raises(UserError, match=rf"seq_len \+ 1 = {info.n_val_tokens + 1}.*"
                                        rf"{info.n_train_tokens} train and {info.n_val_tokens} val"):
        prepare_data(str(path), tmp_path / "cache", seq_len=info.n_val_tokens)


def test_odd_sized_bin_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "bad.bin").write_bytes(b"\0" * 201)
    with pytest.raises(UserError, match="bad.bin.*odd number of bytes"):
        prepare_data(str(tmp_path / "bad.bin"), tmp_path / "cache")


def test_bin_takes_no_tokenizer(tmp_path: Path) -> None:
    np.zeros(100, np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(UserError, match=r"takes no tokenizer, but got tokenizer 'bpe:4096' for .*t\.bin"):
        prepare_data(str(tmp_path / "t.bin"), tmp_path / "cache", tokenizer="bpe:4096")


def test_jsonl_record_without_the_field_names_line_field_and_keys(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"id": 7, "content": "no text here"}])
    with pytest.raises(UserError, match=r"field 'text' \(workload.data_field\), but line 2 of .*d\.jsonl "
                                        r"has only the fields 'id', 'content'"):
        _prepare(path, tmp_path / "cache")


@pytest.mark.parametrize(("line", "message"), [
    ('{"text": "cut off', r"line 2 of .*bad\.jsonl is not valid JSON"),
    ('["a", "list"]', r"line 2 of .*bad\.jsonl is a list"),
    ('{"text": 12}', r"text field 'text' must hold strings, but line 2 of .*bad\.jsonl holds a int"),
])
def test_malformed_jsonl_lines_are_named(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=message):
        _prepare(path, tmp_path / "cache")


def test_an_empty_dataset_names_the_data_and_the_field(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "empty.jsonl", [{"body": ""}, {"body": " \n"}, {"body": None}])
    with pytest.raises(UserError, match=r"at least 2 non-empty documents, but data .*empty\.jsonl "
                                        r"\(text field 'body'\) holds 0; 3 empty ones were dropped"):
        _prepare(path, tmp_path / "cache", text_field="body")
    one = tmp_path / "one.txt"
    one.write_text("a single paragraph\nof two lines\n")
    with pytest.raises(UserError, match=r"one\.txt holds 1 .*separated by blank lines or <\|endoftext\|>"):
        _prepare(one, tmp_path / "cache")


def test_folders_without_data_or_with_mixed_formats(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "script.py").write_text("print()")
    with pytest.raises(UserError, match=r"folder .*empty holds no \.txt, \.md, \.rst, \.text, \.jsonl, \.parquet"):
        _prepare(tmp_path / "empty", tmp_path / "cache")
    (tmp_path / "mixed").mkdir()
    _jsonl(tmp_path / "mixed" / "a.jsonl", [{"text": "x"}])
    pq.write_table(pa.table({"text": ["y"]}), tmp_path / "mixed" / "b.parquet")
    with pytest.raises(UserError, match=r"one format, but .*mixed holds 1 jsonl, 1 parquet files"):
        _prepare(tmp_path / "mixed", tmp_path / "cache")


@pytest.mark.parametrize(("spec", "message"), [
    ("bpe:100", r"bpe:<vocab size> needs a whole number of at least 259 .* but got tokenizer 'bpe:100'"),
    ("bpe:lots", r"at least 259 .* but got tokenizer 'bpe:lots'"),
    ("{tmp}/no-such-tokenizer", r"tokenizer folder .*no-such-tokenizer does not exist; give bytes, bpe:<vocab size>"),
    ("{tmp}", r"tokenizer folder .* holds none of tokenizer\.json, tokenizer_config\.json"),
])
def test_bad_tokenizer_specs_say_what_is_valid(tmp_path: Path, spec: str, message: str) -> None:
    data = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _corpus(10)])
    with pytest.raises(UserError, match=message):
        _prepare(data, tmp_path / "cache", tokenizer=spec.format(tmp=tmp_path))


def test_unloadable_tokenizer_folders(local_tokenizers: dict[str, Path], tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _corpus(10)])
    with pytest.raises(UserError, match=r"eos_token \(or, BERT-like, a sep_token\).*/no-eos has neither"):
        _prepare(data, tmp_path / "cache", tokenizer=str(local_tokenizers["no-eos"]))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=r"AutoTokenizer could not load the tokenizer folder .*broken"):
        _prepare(data, tmp_path / "cache", tokenizer=str(broken))


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "cotune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "cotune"
