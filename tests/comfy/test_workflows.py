"""The example workflows in docs/comfyui/ stay in step with the node: every SEG node in them carries exactly the
node's inputs, with values the node accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lib_seg.comfy import adapter, nodes

WORKFLOWS = sorted((Path(__file__).parents[2] / "docs" / "comfyui").glob("*.json"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_example_workflows_use_the_node_as_it_is(path):
    graph = json.loads(path.read_text())
    seg_nodes = [node for node in graph.values() if node["class_type"] == nodes.NODE_ID]
    assert seg_nodes, f"{path.name} has no {nodes.NODE_ID} node"
    for node in seg_nodes:
        inputs = dict(node["inputs"])
        assert set(inputs) == {"model", *(spec.name for spec in nodes.INPUTS)}
        model = inputs.pop("model")
        assert graph[model[0]]["class_type"] in ("CheckpointLoaderSimple", "UNETLoader")
        adapter.settings(**inputs)  # raises on a value the node would refuse


def test_there_are_examples_for_sdxl_and_flux_at_cfg_1():
    names = {path.name for path in WORKFLOWS}
    assert {"sdxl-seg-api.json", "flux-dev-cfg1-seg-api.json"} <= names
    flux = json.loads((WORKFLOWS[0].parent / "flux-dev-cfg1-seg-api.json").read_text())
    assert [n["inputs"]["cfg"] for n in flux.values() if n["class_type"] == "KSampler"] == [1.0]
