"""The test set-up: the pack's requirements and pytest, and torch only where there is none.

    python tests/install_deps.py && python -m pytest -q

An installed torch (ComfyUI's, or any other) is kept as it is. Where there is none, this
installs torch's CPU build: the tests need no GPU, and the default Linux wheel of torch
brings about 5 GB of CUDA libraries.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_VERSION = "2.13.0"  # the torch CI tests with
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def cpu_torch_args(platform: str = sys.platform) -> list[str]:
    """pip arguments for torch's CPU build. macOS wheels are CPU builds and carry no `+cpu`
    tag; elsewhere the `+cpu` pin makes pip fail rather than fall back to a CUDA wheel."""
    if platform == "darwin":
        return [f"torch=={TORCH_VERSION}"]
    return ["--extra-index-url", CPU_INDEX, f"torch=={TORCH_VERSION}+cpu"]


def main() -> None:
    pip = [sys.executable, "-m", "pip", "install"]
    if importlib.util.find_spec("torch") is None:
        print(f"No torch in this environment: installing its CPU build ({TORCH_VERSION}); the tests need no GPU.")
        subprocess.run(pip + cpu_torch_args(), check=True)
    subprocess.run(pip + ["-r", str(ROOT / "requirements.txt"), "pytest"], check=True)


if __name__ == "__main__":
    main()
