"""Helpers shared by the GPU scripts: the card's name as a file slug, timing, and CSV writing."""

from __future__ import annotations

import csv
import os
import re
import subprocess
from pathlib import Path

import torch


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def gpu_slug() -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100-80gb-hbm3``."""
    name = gpu_name().lower().replace("nvidia", "").strip()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cpu"


def versions() -> dict[str, str]:
    import triton

    out = {"torch": torch.__version__, "triton": triton.__version__, "cuda": str(torch.version.cuda)}
    try:
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    check=False).stdout.strip()
    except OSError:
        pass
    return out


def bench_ms(fn, *, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()`` with CUDA events after warm-up (triton.testing.do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


class CsvLog:
    """Append rows to a CSV as they come (so a cut-off run keeps what it measured)."""

    def __init__(self, path: str | os.PathLike, columns: list[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns = columns
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerow(columns)

    def add(self, **row) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.columns])
