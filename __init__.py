"""ComfyUI entry point of the SageAttention2 pack (V1 node mappings).

ComfyUI imports this file as a package from custom_nodes/; everything below it is reached
through relative imports. Importing needs neither a GPU nor built kernels (the nodes then
pass every attention call to stock attention, with one log line saying why).
"""
if __package__:
    # Opt-in (SAGEATTN2_PROVIDE_SAGEATTENTION=1): engines importing `sageattention` get ours.
    from .sageattn2.compat import provide_from_env

    provide_from_env()
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Loaded as a loose module, not as a package (pytest does this when the checkout's
    # folder name is not a Python identifier): there are no nodes to offer then.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
