"""Write core_nodes.json: the node types of a ComfyUI tree with their inputs and outputs,
for the workflow tests that run without a tree.

    python tests/comfy/dump_core_nodes.py /path/to/ComfyUI

Loads nodes.py plus the built-in extra nodes (comfy_extras) the way ComfyUI's startup does.
Run it with the repo root NOT on sys.path (ComfyUI has its own top-level `nodes`).
"""
from __future__ import annotations

import asyncio
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# Front-end node types that have no Python class.
FRONTEND_NODES = {
    "Note": {"inputs": [["text", "STRING", 0]], "outputs": []},
    "MarkdownNote": {"inputs": [["text", "STRING", 0]], "outputs": []},
    "Reroute": {"inputs": [], "outputs": [["", "*"]]},
    "PrimitiveNode": {"inputs": [], "outputs": [["connect to widget input", "*"]]},
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
OPTIONAL, SEED_CONTROL = 1, 2


def _type_name(kind) -> str:
    if isinstance(kind, (list, tuple)):
        return "COMBO"
    return str(getattr(kind, "value", kind))


def describe(cls) -> dict:
    spec = cls.INPUT_TYPES()
    inputs = []
    for section, flag in (("required", 0), ("optional", OPTIONAL)):
        for name, entry in (spec.get(section) or {}).items():
            kind = entry[0] if isinstance(entry, tuple) else entry
            options = entry[1] if isinstance(entry, tuple) and len(entry) > 1 else {}
            t = _type_name(kind)
            widget = t in WIDGET_TYPES and not options.get("forceInput", False)
            if options.get("control_after_generate"):
                flag |= SEED_CONTROL
            inputs.append([name, t if widget else f"link:{t}", flag])
            flag &= OPTIONAL
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    outputs = [[str(n), _type_name(t)] for n, t in zip(names, cls.RETURN_TYPES)]
    return {"inputs": inputs, "outputs": outputs}


def main(path: str) -> None:
    sys.path.insert(0, HERE)
    from comfy_env import setup

    setup(path, cpu=True)
    os.chdir(path)
    import nodes

    failed = asyncio.run(nodes.init_builtin_extra_nodes())
    table = dict(FRONTEND_NODES)
    for name, cls in sorted(nodes.NODE_CLASS_MAPPINGS.items()):
        try:
            table[name] = describe(cls)
        except Exception as e:  # a node whose INPUT_TYPES needs a server: name only
            print(f"{name}: inputs unknown ({type(e).__name__}: {e})", file=sys.stderr)
            table[name] = None
    out = {
        "source": "ComfyUI tree read by tests/comfy/dump_core_nodes.py",
        "flags": {"optional": OPTIONAL, "seed_control": SEED_CONTROL},
        "failed_modules": failed,
        "nodes": table,
    }
    with open(os.path.join(HERE, "core_nodes.json"), "w") as f:
        json.dump(out, f, indent=0, sort_keys=True)
    print(f"{len(table)} node types; modules that failed to import: {failed}")


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.environ["COMFYUI_PATH"]))
