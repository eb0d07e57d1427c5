"""Where a measurement ran: device name and file slug, versions, git state; plus the timing and CSV
helpers the benchmark scripts share.

Every result file records ``environment()`` (device, versions, commit), so a number can be traced
to the machine and code that produced it.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from calibrate.cost import gpu_slug as cost_file_slug
from sparge_core.atomic import write_text_atomic

REPO = Path(__file__).resolve().parents[1]


def gpu_name() -> str:
    """The CUDA device's name, or ``"cpu"``."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def gpu_slug() -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100-80gb-hbm3`` (for file names; the cost models' rule)."""
    return cost_file_slug(gpu_name())


def device_name(device: torch.device | str) -> str:
    """A CUDA device's name, or the CPU with its core count and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
            f"{torch.get_num_threads()})")


def git_state(repo: Path = REPO) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout at ``repo``.

    A wrapper that ships a copy of the tree to another host (e.g. a lent GPU, whose copy may carry
    a stale or no git history) states the commit it shipped in ``repo/.tree-commit``
    (``git rev-parse HEAD > .tree-commit``, untracked); that file wins, with ``dirty`` False (the
    wrapper ships a committed tree). Otherwise git is asked.
    """
    marker = repo / ".tree-commit"
    shipped = marker.read_text().strip() if marker.is_file() else ""
    if shipped:
        return shipped, False
    try:
        head = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "HEAD"], cwd=repo, capture_output=True,
                              text=True, check=False)
        if head.returncode == 0 and head.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                   capture_output=True, text=True, check=False).stdout.strip()
            return head.stdout.strip(), bool(dirty)
    except OSError:
        pass
    return None, None


def versions(extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Python, torch, triton, CUDA, the short git commit, and the versions of ``extra`` packages
    that are installed."""
    import triton

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "triton": triton.__version__, "cuda": str(torch.version.cuda)}
    commit, dirty = git_state()
    out["git"] = commit[:12] if commit else None
    out["git_dirty"] = dirty
    for pkg in extra:
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception:  # not installed (or broken): not part of this run
            pass
    return out


def environment() -> dict[str, Any]:
    """What every result file records: the device, package versions and the git state."""
    import triton

    cpu = f"CPU ({platform.processor() or platform.machine()})"
    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__}}
    for pkg in ("transformers", "optuna", "lm_eval", "datasets"):
        try:
            env["versions"][pkg] = __import__(pkg).__version__
        except Exception:  # not installed: not part of this run
            pass
    env["git_commit"], env["git_dirty"] = git_state()
    return env


def bench_ms(fn, *, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()`` with CUDA events after warm-up (``triton.testing.do_bench``)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


class CsvLog:
    """A CSV that grows a row at a time: after every row the whole file is rewritten atomically, so a
    run cut off midway keeps every row it measured and a reader never sees a half-written line."""

    def __init__(self, path: str | os.PathLike, columns: list[str]):
        self.path = Path(path)
        self.columns = list(columns)
        self._buffer = io.StringIO()
        self._writer = csv.writer(self._buffer)
        self._writer.writerow(self.columns)
        self._flush()

    def add(self, **row) -> None:
        unknown = sorted(set(row) - set(self.columns))
        if unknown:
            raise ValueError(f"{self.path.name}: unknown column(s) {unknown}; columns: {self.columns}")
        self._writer.writerow([row.get(c, "") for c in self.columns])
        self._flush()

    def _flush(self) -> None:
        write_text_atomic(self.path, self._buffer.getvalue())
