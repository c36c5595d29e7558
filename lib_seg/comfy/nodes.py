"""The "Smoothed Energy Guidance" node, in ComfyUI's v3 schema (``comfy_entrypoint``) and its classic form.

Both forms are built from one table of inputs (:data:`INPUTS`) and run :func:`lib_seg.comfy.adapter.patch_model`,
so they cannot drift.  Nothing here imports ComfyUI at import time: the v3 classes are made inside
:func:`comfy_entrypoint`, when ComfyUI asks for them, so this module imports anywhere (pytest, the WebUIs).
A ComfyUI that knows the v3 schema registers the v3 node under the same id as the classic one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lib_seg.comfy import adapter
from lib_seg.core.params import SCALE_RANGE

NODE_ID = "SmoothedEnergyGuidance"
DISPLAY_NAME = "Smoothed Energy Guidance"
CATEGORY = "model_patches"
DESCRIPTION = (
    "Smoothed Energy Guidance (SEG, arXiv 2408.00760): one extra conditional prediction per step in which the "
    "queries of the chosen self-attention layers are Gaussian-blurred over the image's token grid; the result is "
    "pushed away from it. Works without a negative prompt and at CFG 1 (distilled models). UNets (SD1.x, SDXL) and "
    "the diffusion transformers listed in the README."
)


@dataclass(frozen=True)
class Input:
    name: str
    kind: str  # "FLOAT", "BOOLEAN", "STRING"
    default: Any
    tooltip: str
    low: float | None = None
    high: float | None = None
    step: float | None = None


INPUTS: tuple[Input, ...] = (
    Input(
        "scale",
        "FLOAT",
        3.0,
        "SEG scale: how far the prediction is pushed away from the blurred one "
        "(0 = off, the model is returned untouched).",
        *SCALE_RANGE,
        0.05,
    ),
    Input(
        "blur_sigma",
        "FLOAT",
        10.0,
        "Gaussian blur sigma over the token grid, used when infinite_blur is off. "
        "Larger is a stronger blur; above 9999 means infinite.",
        0.01,
        10000.0,
        0.01,
    ),
    Input(
        "infinite_blur",
        "BOOLEAN",
        True,
        "Infinite blur (the paper's default): every blurred query becomes the mean query. Off: blur with blur_sigma.",
    ),
    Input(
        "layers",
        "STRING",
        "middle",
        "Which layers to blur. 'middle' = the model's default (UNet middle block; "
        "a DiT's published or middle block). UNet: 'all', 'down', 'up', 'd4', 'm0', 'u0-2'. DiT blocks: "
        "d (double), s (single), j (joint), l (layer), b (block) with an index or range: 'd7-9,s7-9', 'j7-9', "
        "'l15', 'b20'. An error lists the loaded model's blocks.",
    ),
    Input(
        "start_percent",
        "FLOAT",
        0.0,
        "Where SEG starts, as a fraction of the model's noise schedule "
        "(ComfyUI's convention: converted to sigma by the model).",
        0.0,
        1.0,
        0.001,
    ),
    Input("end_percent", "FLOAT", 1.0, "Where SEG ends, as a fraction of the model's noise schedule.", 0.0, 1.0, 0.001),
)


def patch(model: Any, **inputs: Any) -> Any:
    """What both node forms run: the model with SEG (a clone), or the model itself where SEG is off."""
    return adapter.patch_model(model, adapter.settings(**inputs))


def _classic_input(spec: Input) -> tuple:
    options: dict[str, Any] = {"default": spec.default, "tooltip": spec.tooltip}
    if spec.kind == "FLOAT":
        options.update(min=spec.low, max=spec.high, step=spec.step)
    return (spec.kind, options)


class SmoothedEnergyGuidance:
    """The classic node (``NODE_CLASS_MAPPINGS``) for ComfyUI versions without the v3 schema."""

    CATEGORY = CATEGORY
    DESCRIPTION = DESCRIPTION
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        required = {"model": ("MODEL", {"tooltip": "The model to guide."})}
        required.update({spec.name: _classic_input(spec) for spec in INPUTS})
        return {"required": required}

    def patch(self, model: Any, **inputs: Any) -> tuple:
        return (patch(model, **inputs),)


NODE_CLASS_MAPPINGS = {NODE_ID: SmoothedEnergyGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {NODE_ID: DISPLAY_NAME}


def _v3_input(io: Any, spec: Input) -> Any:
    if spec.kind == "FLOAT":
        return io.Float.Input(
            spec.name, default=spec.default, min=spec.low, max=spec.high, step=spec.step, tooltip=spec.tooltip
        )
    if spec.kind == "BOOLEAN":
        return io.Boolean.Input(spec.name, default=spec.default, tooltip=spec.tooltip)
    return io.String.Input(spec.name, default=spec.default, tooltip=spec.tooltip)


def v3_nodes() -> list:
    """The v3 node classes (``comfy_api.latest``), made when ComfyUI asks for them."""
    from comfy_api.latest import io

    class SmoothedEnergyGuidanceV3(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> Any:
            return io.Schema(
                node_id=NODE_ID,
                display_name=DISPLAY_NAME,
                category=CATEGORY,
                description=DESCRIPTION,
                inputs=[io.Model.Input("model", tooltip="The model to guide."), *(_v3_input(io, s) for s in INPUTS)],
                outputs=[io.Model.Output(tooltip="The model with SEG (the same model when SEG is off).")],
            )

        @classmethod
        def execute(cls, model: Any, **inputs: Any) -> Any:
            return io.NodeOutput(patch(model, **inputs))

    return [SmoothedEnergyGuidanceV3]


async def comfy_entrypoint() -> Any:
    """ComfyUI's v3 entry point: an extension whose node list is :func:`v3_nodes`."""
    from comfy_api.latest import ComfyExtension

    class SegExtension(ComfyExtension):
        async def get_node_list(self) -> list:
            return v3_nodes()

    return SegExtension()
