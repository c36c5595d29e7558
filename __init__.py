"""ComfyUI entry point: ComfyUI imports ``custom_nodes/<this folder>/__init__.py``; A1111 and Forge ignore it.

Importing this file loads no host module and patches nothing: it puts this folder on ``sys.path`` (as the
WebUIs do for their extensions, so ``lib_seg`` imports the same way everywhere) and exposes the nodes of
:mod:`lib_seg.comfy.nodes`, which import ComfyUI's modules only when a node runs or its schema is asked for.
ComfyUI may import this module twice at start-up; both imports give the same objects.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

from lib_seg.comfy.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_entrypoint  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "comfy_entrypoint"]
