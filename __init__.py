"""Quadtree Tiled Diffusion for ComfyUI: registration only (importing patches nothing).

ComfyUI registers the nodes through the V3 entry point ``comfy_entrypoint()``. This module must
not define ``NODE_CLASS_MAPPINGS``: ComfyUI's ``load_custom_node`` uses a module's
``NODE_CLASS_MAPPINGS`` when there is one and then never calls ``comfy_entrypoint``. In-process
callers use the classes in ``nodes`` (``nodes.NODES``, ``nodes.QuadtreeDiffusion``, ...).
"""
if __package__:
    # Always true when ComfyUI loads the pack (as a package named after its folder). Empty only when
    # a tool imports this file on its own: pytest does so for a checkout whose folder name is no
    # Python identifier (e.g. "ComfyUI-Quadtree-Diffusion"), where a relative import cannot work.
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
