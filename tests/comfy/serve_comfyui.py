"""Runs ComfyUI's server (its main.py) with the stand-ins of comfy_env for torchvision and
torchaudio where they cannot be imported (a CPU torch without a matching torchvision).

    python tests/comfy/serve_comfyui.py COMFYUI_PATH [main.py arguments...]
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_env import stand_in_media_modules  # noqa: E402


def main() -> None:
    root = os.path.abspath(sys.argv[1])
    sys.argv = [os.path.join(root, "main.py"), *sys.argv[2:]]
    sys.path.insert(0, root)
    os.chdir(root)
    stand_in_media_modules()
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
