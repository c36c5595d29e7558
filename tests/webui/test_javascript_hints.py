"""Every control has a tooltip in javascript/seg-hints.js, and every tooltip has a control."""

import re
from pathlib import Path

import gradio as gr

from lib_seg.core.params import SegParams
from lib_seg.webui import ui
from tests.support.webui_modules import InputAccordion

HINTS = Path(__file__).resolve().parents[2] / "javascript" / "seg-hints.js"


def test_hint_keys_match_control_ids():
    keys = set(re.findall(r'^\s*"([a-z_]+)":', HINTS.read_text(), flags=re.M))
    with gr.Blocks():
        components, _ = ui.build(gr, InputAccordion, lambda item: f"seg-txt2img-{item}", SegParams())
    items = {c.elem_id.removeprefix("seg-txt2img-").removesuffix("-checkbox") for c in components}
    assert keys == items
