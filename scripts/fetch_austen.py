"""Fetch Jane Austen's novels (Debian package r-cran-janeaustenr) into the sparge corpus cache.

Runs ``apt-get download r-cran-janeaustenr`` (run ``apt-get update`` once first), unpacks it with
``dpkg-deb -x`` and reads the R data files in pure Python (no R needed); the text is written to
``$XDG_CACHE_HOME/sparge/corpora/austen.txt``. Same as ``python -m calibrate.data fetch austen``.

    python scripts/fetch_austen.py [--from r-cran-janeaustenr_1.0.0-1_all.deb]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibrate.data import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["fetch", "austen", *sys.argv[1:]]))
