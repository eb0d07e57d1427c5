"""Atomic file writes with normal permissions: the one way this project writes a file.

A reader sees the old file or the new one, never a part. The content goes to a temporary file in
the target's folder (``.<name>.<random>.tmp``); it is flushed and fsynced, given the permissions a
plain ``open(path, "w")`` would have given it (``0o666`` minus the umask: ``mkstemp``'s ``0o600`` is
not kept), and renamed over the target. On any error the temporary file is removed and the target
is left as it was. A process killed mid-write leaves at most a stale ``.*.tmp`` file;
``remove_stale_temporaries`` cleans a folder of them.

    write_json_atomic(path, doc)
    with atomic_open(path, "w") as f:              # any text or binary writer
        csv.writer(f).writerows(rows)
    with atomic_path(path) as tmp:                 # for libraries that take a path
        safetensors.torch.save_file(tensors, tmp)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

TMP_SUFFIX = ".tmp"


def current_umask() -> int:
    """The process umask (read from /proc where possible; ``os.umask`` has no read-only form)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` minus the umask."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """The mode ``os.mkdir`` gives a new folder: ``0o777`` minus the umask."""
    return 0o777 & ~current_umask()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error the file written
    there is fsynced, given ``mode`` (default: the umask's) and renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(folder: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder; when the block ends without error it gets the umask's folder
    mode and is renamed to ``folder`` (a reader sees the old folder or the new one, never a half-written
    one). An existing ``folder`` is replaced (``replace=True``) or, if ``replace=False`` (a cache that
    another process may have filled first), kept and the new one dropped."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=TMP_SUFFIX, dir=folder.parent))
    try:
        yield tmp
        os.chmod(tmp, default_dir_mode())  # mkdtemp makes it 0700
        if folder.exists():
            if not replace:
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", suffix=TMP_SUFFIX, dir=folder.parent))
            os.replace(folder, old / "previous")
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(folder.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open`` for writing (``"w"`` or ``"wb"``), atomically: the file appears complete or not at all."""
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_open writes a new file: mode must be 'w' or 'wb', got {mode!r}")
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically (newlines written as given)."""
    with atomic_open(path, "w", newline="") as f:
        f.write(text)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike, data: Any, **dumps_kwargs: Any) -> None:
    """Write JSON (indented, newline-terminated) atomically."""
    dumps_kwargs.setdefault("indent", 1)
    write_text_atomic(path, json.dumps(data, **dumps_kwargs) + "\n")


def check_writable(folder: str | os.PathLike) -> None:
    """Raise ``OSError`` unless a file can really be created in ``folder`` (created if missing).

    ``os.access`` is not enough: it says yes to root everywhere, also where no file can be made
    (``/proc``, a read-only mount). This writes and removes an empty temporary file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".sparge-write-probe.", suffix=TMP_SUFFIX, dir=folder)
    os.close(fd)
    os.unlink(name)


def remove_stale_temporaries(folder: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Delete the ``.*.tmp`` files an interrupted atomic write left in ``folder``; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = folder.rglob(f".*{TMP_SUFFIX}") if recursive else folder.glob(f".*{TMP_SUFFIX}")
    removed = []
    for path in found:
        if path.is_file():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(path)
    return removed
