"""What the project's command lines share: the help format, the bad-input error, and the checks every
CLI runs on its arguments before any work starts (device, output folder).

Bad input raises ``InputError``; a CLI turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import copy
import errno
import math
import os
from pathlib import Path


class InputError(ValueError):
    """Bad user input: exit code 2 with this message."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and shows each option's default (unless it is None or False, or
    the help text already says it)."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        default = action.default
        return bool(action.option_strings) and not (default is None or default is False
                                                    or default is argparse.SUPPRESS)

    @staticmethod
    def _default_text(action: argparse.Action) -> str:
        default = action.default
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"(default: {shown})"

    def _format_action(self, action: argparse.Action) -> str:
        if not (action.help or "").strip() and self._shows_default(action):  # no help text: show the default
            action = copy.copy(action)
            action.help = self._default_text(action)
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not self._shows_default(action) or "default" in text:
            return text
        return f"{text} {self._default_text(action)}"


def check_device(text: str | None) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (None: cuda if available); raises InputError for anything else
    or for a GPU that is not there."""
    import torch

    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {text} was asked for but no CUDA GPU is visible; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {text}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return text


def check_output_folder(folder: str | os.PathLike, what: str) -> Path:
    """Create ``folder`` if needed and make sure a file can really be written there (``os.access``
    says yes to root everywhere, /proc included); raises InputError naming ``what``."""
    from sparge_core.atomic import check_writable

    folder = Path(folder).expanduser()
    try:
        check_writable(folder)
    except OSError as err:
        raise InputError(f"cannot write into {folder} ({err.strerror or err}); choose another {what}") from err
    return folder


def check_finite(name: str, value: float, *, low: float = 0.0, low_open: bool = True, high: float = math.inf,
                 hint: str = "") -> float:
    """A finite number in the given range, else InputError ``"<name> must be ..."``."""
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high) else (
            f"{'>' if low_open else '>='} {low:g}")
        where = f"in {bounds}" if math.isfinite(high) else bounds
        raise InputError(f"{name} must be a finite number {where}, got {value}" + (f" ({hint})" if hint else ""))
    return value


def exit_code_for(err: BaseException) -> int:
    """2 for environment faults a user can fix (disk full, no permission, read-only), else 1."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM,
                                                   errno.EROFS, errno.ENOENT, errno.EISDIR, errno.ENOTDIR):
        return 2
    return 1
