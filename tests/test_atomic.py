"""sparge_core.atomic: the project's one file writer (whole file or nothing, the umask's permissions)."""

from __future__ import annotations

import os
import stat

import pytest

from sparge_core.atomic import (
    atomic_open,
    atomic_path,
    check_writable,
    remove_stale_temporaries,
    write_json_atomic,
    write_text_atomic,
)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_get_the_mode_open_would_give(tmp_path, umask):
    write_text_atomic(tmp_path / "a.txt", "x")
    assert _mode(tmp_path / "a.txt") == 0o644  # not mkstemp's 0600
    umask(0o077)
    write_json_atomic(tmp_path / "b.json", {"x": 1})
    assert _mode(tmp_path / "b.json") == 0o600
    umask(0o002)
    with atomic_path(tmp_path / "c.bin") as tmp:
        tmp.write_bytes(b"\0")
    assert _mode(tmp_path / "c.bin") == 0o664


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "doc.json"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["doc.json"]


def test_folders_are_created_and_text_is_exact(tmp_path):
    path = tmp_path / "a" / "b" / "t.txt"
    write_text_atomic(path, "line\r\nnext\n")
    assert path.read_bytes() == b"line\r\nnext\n"


def test_stale_temporaries_are_found_and_removed(tmp_path):
    (tmp_path / "L000").mkdir()
    stale = [tmp_path / ".meta.json.abc.tmp", tmp_path / "L000" / ".S000.safetensors.x.tmp"]
    for p in stale:
        p.write_text("partial")
    keep = tmp_path / "L000" / "S001.safetensors"
    keep.write_text("complete")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert not any(p.exists() for p in stale) and keep.exists()


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    from sparge_core.atomic import atomic_dir, default_dir_mode

    folder = tmp_path / "cache" / "model"
    with atomic_dir(folder) as tmp:
        (tmp / "a.txt").write_text("one")
        assert not folder.exists()
    assert (folder / "a.txt").read_text() == "one" and (folder.stat().st_mode & 0o777) == default_dir_mode()
    with pytest.raises(RuntimeError), atomic_dir(folder) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed midway")
    assert (folder / "a.txt").read_text() == "one"  # the old folder stays
    with atomic_dir(folder) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in folder.iterdir()) == ["b.txt"]  # replaced
    with atomic_dir(folder, replace=False) as tmp:
        (tmp / "c.txt").write_text("three")
    assert sorted(p.name for p in folder.iterdir()) == ["b.txt"]  # a filled cache is kept
    assert sorted(p.name for p in folder.parent.iterdir()) == ["model"]  # no temporaries left


def test_the_write_probe_is_not_fooled_by_os_access(tmp_path):
    check_writable(tmp_path / "new")  # created
    assert (tmp_path / "new").is_dir() and list((tmp_path / "new").iterdir()) == []
    with pytest.raises(OSError):
        check_writable("/proc")


def test_csv_log_keeps_every_row_and_is_always_whole(tmp_path, umask):
    from evals.environment import CsvLog

    log = CsvLog(tmp_path / "r.csv", ["a", "b"])
    assert (tmp_path / "r.csv").read_text().splitlines() == ["a,b"]
    log.add(a=1, b=2)
    log.add(a=3)
    assert (tmp_path / "r.csv").read_text().splitlines() == ["a,b", "1,2", "3,"]
    assert _mode(tmp_path / "r.csv") == 0o644
    with pytest.raises(ValueError, match="unknown column"):
        log.add(c=1)


# --------------------------------------------------------------------------------------------
# every write of the project goes through sparge_core.atomic
# --------------------------------------------------------------------------------------------
RAW_WRITERS = {"write_text", "write_bytes", "savefig", "save", "mkstemp", "to_csv", "save_file"}
#: writes that are not results: files inside a temporary folder that lm-eval reads and deletes, and
#: the converted-model folder, which is made whole in a temporary sibling and renamed into place
# ModelConfig.save_pretrained writes through the helper itself
ALLOWED = {("evals/lm_eval_adapter.py", "write_text"), ("sparge_core/official.py", "save_pretrained")}


def _raw_writes(path):
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name == "open" and isinstance(func, ast.Name):
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"),
                                                                 None)
            if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and set(mode.value) & set("wax"):
                found.append((name, node.lineno))
            continue
        if name == "mkdtemp":
            found.append((name, node.lineno))
            continue
        if name == "save_pretrained":  # into a folder of sparge_core.atomic (``with atomic_dir(f) as tmp:``)
            if not (node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "tmp"):
                found.append((name, node.lineno))
            continue
        if name not in RAW_WRITERS:
            continue
        # the write targets a temporary path of sparge_core.atomic (``with atomic_path(p) as tmp:``)
        target = func.value if name in ("write_text", "write_bytes") else (node.args[1] if name in (
            "save", "save_file") and len(node.args) > 1 else node.args[0] if node.args else None)
        if isinstance(target, ast.Call) and getattr(target.func, "id", "") == "str":
            target = target.args[0]
        if isinstance(target, ast.Name) and target.id == "tmp":
            continue
        if name == "save" and not (isinstance(func.value, ast.Name) and func.value.id == "torch"):
            continue  # ModelConfig.save and the like write through the helper themselves
        found.append((name, node.lineno))
    return found


def test_every_file_is_written_through_the_atomic_helper():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    bad = []
    for top in ("sparge_core", "calibrate", "evals", "scripts"):
        for path in sorted((repo / top).rglob("*.py")):
            rel = str(path.relative_to(repo))
            if rel == "sparge_core/atomic.py":
                continue
            for name, line in _raw_writes(path):
                if (rel, name) not in ALLOWED:
                    bad.append(f"{rel}:{line}: {name}(...) writes a file directly; use sparge_core.atomic")
    assert not bad, "\n".join(bad)
