"""DiT scenarios against a running WebUI with a DiT loaded (SD3 on A1111 1.10; random weights are fine).

SEG on a DiT blurs the image queries of transformer blocks named d/s/j (lib_seg.dit); these check what a
user and an API caller see: SEG off is the image without the extension, SEG on changes it and writes
infotext that pastes back to the same image, bad blocks fail the request naming the model's blocks,
non-square sizes, batches, CFG 1, batched rows = separate call, and an interrupted request leaves
nothing behind.
"""

import json
import threading
import time

import pytest

from . import conftest
from .conftest import TITLE, mean_difference, pixels, same

BASE = {**conftest.BASE, "cfg_scale": 5}


def txt2img(api, args=None, **changes):
    return conftest.txt2img(api, BASE, args, **changes)


def infotext(result: dict) -> str:
    return json.loads(result["info"])["infotexts"][0]


def test_seg_off_is_identical_to_no_extension(api, baseline):
    for args in ([False], [{"enabled": False}], [True, 0.0], [{"enabled": False, "layers": "all"}]):
        assert same(txt2img(api, args)["images"][0], baseline["images"][0]), args


def test_seg_on_changes_the_image_and_names_the_blocks(baseline, with_seg, model_layers):
    assert not same(with_seg["images"][0], baseline["images"][0])
    info = infotext(with_seg)
    assert "SEG scale: 3" in info and "SEG blur sigma: inf" in info
    layers = conftest.infotext_fields(with_seg)["SEG layers"]  # unquoted as the host reads it
    assert layers[:1] in "dsjlb" and "middle" not in layers  # the DiT's default blocks, written out
    assert all(item[:1] in "dsjlb" and item[1:2].isdigit() for item in layers.split(","))
    assert "SEG" not in infotext(baseline)


def test_infotext_round_trip(api, baseline, with_seg):
    parameters = conftest.parameters_of(api, with_seg)
    assert "SEG layers: " in parameters
    conftest.assert_pastes_back(api, BASE, baseline, with_seg)


@pytest.mark.parametrize(
    "layers,message",
    [
        ("d3", "'d3' names blocks this model does not have; it has "),
        ("u3", "SEG layers: cannot read 'u3'; use presets double, single, joint, layer, block, all"),
        ("j99", "'j99' names blocks this model does not have"),
    ],
)
def test_bad_blocks_fail_the_request_and_change_nothing_after(api, baseline, layers, message):
    status, body = api.post("/sdapi/v1/txt2img", {**BASE, "alwayson_scripts": {TITLE: {"args": [{"layers": layers}]}}})
    assert status >= 400 and message in json.dumps(body), body
    assert same(txt2img(api)["images"][0], baseline["images"][0])


def test_every_block_and_finite_sigma_on_a_non_square_batch(api):
    kwargs = {"batch_size": 2, "width": 192, "height": 128}
    plain = txt2img(api, **kwargs)
    seg = txt2img(api, [{"blur_sigma": 2, "layers": "all"}], **kwargs)
    assert len(seg["images"]) == 2 and pixels(seg["images"][0]).size == (192, 128)
    assert all(not same(a, b) for a, b in zip(plain["images"], seg["images"], strict=True))


def test_seg_alone_at_cfg_1(api):
    plain = txt2img(api, cfg_scale=1)
    seg = txt2img(api, [{"layers": "all"}], cfg_scale=1)
    assert not same(plain["images"][0], seg["images"][0])


def test_batched_rows_and_separate_call_agree(api):
    """The setting "Run the SEG rows inside the main UNet call" changes the speed, not the image."""
    options = api.get("/sdapi/v1/options")
    status, body = api.post("/sdapi/v1/options", {"seg_batch_rows": options.get("seg_batch_rows", True)})
    assert status == 200, body  # saved first, so that the host restores it after each request
    images = {}
    for batched in (True, False):
        settings = {"override_settings": {"seg_batch_rows": batched}, "override_settings_restore_afterwards": True}
        images[batched] = txt2img(api, [{"scale": 10, "layers": "all"}], batch_size=2, **settings)["images"]
    plain = txt2img(api, batch_size=2)["images"]
    for with_rows, separate, without in zip(images[True], images[False], plain, strict=True):
        effect = mean_difference(separate, without)
        assert effect > 0.05
        assert mean_difference(with_rows, separate) < effect / 20


def test_an_interrupted_request_leaves_nothing(api, baseline):
    long_request = threading.Thread(
        target=api.post,
        args=("/sdapi/v1/txt2img", {**BASE, "steps": 40, "alwayson_scripts": {TITLE: {"args": [{"layers": "all"}]}}}),
    )
    long_request.start()
    time.sleep(1.0)
    api.post("/sdapi/v1/interrupt", {})
    long_request.join(timeout=600)
    assert same(txt2img(api)["images"][0], baseline["images"][0])
