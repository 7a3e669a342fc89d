"""ComfyUI nodes of the pack (comfy_nodes.py). The logic lives in small modules that never
import ComfyUI: levels, schedule (grammar), layers (positions) and calibration (selection,
schedule text, heatmap, file) need no torch either; adapter (call conventions), override
(the per-model override) and recording (calibration mode) work on tensors."""
from .comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
