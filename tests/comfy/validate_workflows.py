"""Queue-time validation of the example workflows by ComfyUI itself.

    python tests/comfy/validate_workflows.py COMFYUI_PATH OUT.json

Loads ComfyUI's nodes and this pack through ComfyUI's own loader, turns each UI-format
workflow into the API format the front end sends on "Queue" (links -> [node id, slot],
widget values -> named inputs), puts empty files under the model names the workflows use
(so loader combos find them), and runs `execution.validate_prompt`. Writes
{workflow: {"valid": bool, "error": ..., "node_errors": ...}} to OUT.json. Runs in its own
process: ComfyUI's top-level `nodes` module and this repo's `nodes/` package cannot share
one.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FRONTEND_ONLY = {"Note", "MarkdownNote"}


def ui_to_api(workflow: dict, classes: dict, describe) -> dict:
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) == 4:
            continue
        inputs = {}
        for inp in node["inputs"]:
            if inp["link"] is not None:
                _, src, slot, _, _, _ = links[inp["link"]]
                inputs[inp["name"]] = [str(src), slot]
        values = list(node["widgets_values"])
        for name, kind, flag in describe(classes[node["type"]])["inputs"]:
            if kind.startswith("link:") or not values:
                continue
            inputs[name] = values.pop(0)
            if flag & 2:  # control_after_generate: a front-end value, not an input
                values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def main(comfy_path: str, out_path: str) -> None:
    sys.path.insert(0, str(HERE))
    from comfy_env import setup

    setup(comfy_path, cpu=True)
    import dump_core_nodes
    import execution
    import folder_paths
    import nodes

    asyncio.run(nodes.init_builtin_extra_nodes())
    if not asyncio.run(nodes.load_custom_node(str(REPO))):
        raise SystemExit("ComfyUI could not load the pack")

    workflows = {p.stem: json.loads(p.read_text()) for p in sorted((REPO / "example_workflows").glob("*.json"))}
    models = tempfile.mkdtemp(prefix="sa2_models_")
    for wf in workflows.values():
        for node in wf["nodes"]:
            for value in node["widgets_values"]:
                if isinstance(value, str) and value.endswith(".safetensors"):
                    Path(models, value).touch()
    for folder in list(folder_paths.folder_names_and_paths):
        folder_paths.add_model_folder_path(folder, models)

    results = {}
    for name, wf in workflows.items():
        prompt = ui_to_api(wf, nodes.NODE_CLASS_MAPPINGS, dump_core_nodes.describe)
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(name, prompt, None))
        results[name] = {"valid": valid, "error": error, "outputs": outputs, "node_errors": node_errors,
                         "nodes": len(prompt)}
    Path(out_path).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]), sys.argv[2])
