"""Create the reference venv (transformers 4.51.3, as MMSpec ran) at a path; idempotent.

    .venv/bin/python benchmarks/parity/setup_venv.py [--venv DIR]

Default DIR: $MMSPEC_HOME/parity/venv. A stamp file holds the pins it was built with: the same
pins again do nothing, other pins reinstall into the same venv. No torchvision and no
`datasets` (the runner stubs the one name MMSpec's evaluation/utils.py imports from it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common import parity_home

# MMSpec's requirements.txt where it pins, except torch (the CPU build on this disk; MMSpec
# used 2.7.0 + CUDA) and the packages its methods never import (datasets, torchvision, av).
PINS = (
    "torch==2.13.0",
    "transformers==4.51.3",
    "tokenizers==0.21.1",
    "accelerate==1.6.0",
    "huggingface-hub==0.30.2",
    "safetensors==0.5.3",
    "pillow==11.0.0",
    "numpy==2.1.2",
    "shortuuid==1.0.13",
    "tqdm==4.67.1",
    "qwen-vl-utils==0.0.11",
)
STAMP = ".parity-pins"


def setup(venv: Path, python: str = sys.executable) -> Path:
    """The venv's python, after making sure the pins are installed."""
    py = venv / "bin" / "python"
    stamp = venv / STAMP
    want = "\n".join(PINS) + "\n"
    if py.is_file() and stamp.is_file() and stamp.read_text() == want:
        return py
    if not py.is_file():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *PINS], check=True)
    stamp.write_text(want)
    return py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--venv", type=Path, default=parity_home() / "venv")
    args = ap.parse_args()
    print(setup(args.venv.expanduser()))


if __name__ == "__main__":
    main()
