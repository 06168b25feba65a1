"""Where the project's own models live, importable without torch (grid validation needs it).

The trained tiny zoo and the trained draft heads are package data under `models/zoo/`;
untrained builds, distillation data and other caches go under `$MMSPEC_HOME`
(default `~/.cache/mmspec`).
"""

from __future__ import annotations

import os
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent / "zoo"


def cache_root() -> Path:
    return Path(os.environ.get("MMSPEC_HOME", Path.home() / ".cache" / "mmspec"))


def is_tiny_checkpoint(path: Path) -> bool:
    """Whether `path` is one of the tiny models' folders: the zoo or an untrained build."""
    try:
        resolved = path.expanduser().resolve()
    except OSError:
        return False
    homes = (ZOO_DIR.resolve(), (cache_root() / "models").resolve())
    return resolved.is_dir() and any(resolved.is_relative_to(home) for home in homes)
