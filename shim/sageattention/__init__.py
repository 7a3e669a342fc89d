"""`sageattention` for processes that never import the ComfyUI pack (Ray workers of raylight,
torchrun ranks of xDiT): put this pack's `shim` folder on PYTHONPATH and `import sageattention`
gives sageattn2's thu-ml-compatible functions (sageattn2/compat.py).

A real thu-ml install found elsewhere on sys.path is loaded instead, unless
SAGEATTN2_PROVIDE_SAGEATTENTION=force.
"""
import importlib.machinery
import importlib.util
import logging
import os
import sys
from pathlib import Path

_SHIM_DIR = Path(__file__).resolve().parent.parent
_PACK = _SHIM_DIR.parent
_log = logging.getLogger("sageattn2")


def _thu_ml_spec():
    paths = [p for p in sys.path if Path(p or ".").resolve() != _SHIM_DIR]
    return importlib.machinery.PathFinder.find_spec(__name__, paths)


def _load(spec):
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _sageattn2_compat():
    if "sageattn2" not in sys.modules:
        # The pack's own copy by file: putting the pack folder on sys.path would also expose
        # its `nodes` package, which would shadow ComfyUI's nodes.py.
        init = _PACK / "sageattn2" / "__init__.py"
        _load(importlib.util.spec_from_file_location("sageattn2", init, submodule_search_locations=[str(init.parent)]))
    return importlib.import_module("sageattn2.compat")


_real = None if os.environ.get("SAGEATTN2_PROVIDE_SAGEATTENTION", "").strip().lower() == "force" else _thu_ml_spec()
if _real is not None:
    _log.info("[sageattn2] sageattention shim: thu-ml's install at %s is used (set "
              "SAGEATTN2_PROVIDE_SAGEATTENTION=force for ours)", _real.origin)
    _load(_real)  # replaces this module in sys.modules: `import sageattention` returns thu-ml's
else:
    _compat = _sageattn2_compat()
    _compat._register(_compat.make_module())
