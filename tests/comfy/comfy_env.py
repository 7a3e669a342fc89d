"""Importing a ComfyUI source tree from a test process or a script.

- ComfyUI is not a package: its root (COMFYUI_PATH) goes on sys.path. Its top-level
  `nodes` module would be shadowed by this repo's `nodes/` package if the repo root came
  first, so the ComfyUI root is put in front and our pack is imported under its own name
  (tests/test_nodes_support.load_pack), never as `nodes`.
- torchvision/torchaudio: ComfyUI imports them at module level for model families these
  tests never build (Cosmos, Cascade, audio VAEs). Where they cannot be imported (a CPU
  torch without a matching torchvision), an empty stand-in module is registered so that
  `import comfy.model_base` works; any use of them would fail loudly.
- `comfy.cli_args.args` must be set before `comfy.model_management` is imported.
"""
from __future__ import annotations

import importlib.machinery
import os
import sys
import types

ENV = "COMFYUI_PATH"


def comfyui_path() -> str | None:
    path = os.environ.get(ENV)
    return os.path.abspath(path) if path else None


def _stand_in(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    return module


def _stand_in_optional(name: str, submodules: tuple[str, ...]) -> None:
    try:
        __import__(name)
        return
    except Exception:  # ImportError, or a binary extension that does not match torch
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    top = _stand_in(name)
    sys.modules[name] = top
    for sub in submodules:
        full = f"{name}.{sub}"
        sys.modules[full] = _stand_in(full)
        parent = sys.modules[full.rsplit(".", 1)[0]]
        setattr(parent, sub.rsplit(".", 1)[-1], sys.modules[full])


def stand_in_media_modules() -> None:
    """torchvision and torchaudio as they are, or empty stand-ins where they cannot be imported."""
    _stand_in_optional("torchvision", ("transforms", "transforms.functional"))
    _stand_in_optional("torchaudio", ("transforms", "functional"))


def setup(path: str, cpu: bool) -> None:
    """Make `import comfy...` work for the tree at `path`."""
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    stand_in_media_modules()
    import utils.install_util  # noqa: F401  (ComfyUI's `utils` package before comfy/ adds comfy/utils.py)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    comfy.cli_args.args.disable_smart_memory = True
