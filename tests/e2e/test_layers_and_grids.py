"""API scenarios for layer names and token grids: SDXL transformer indices, the official layer
indices, and Deep Shrink (the Forge family's *Kohya HRFix Integrated*) with a finite sigma."""

import json

import pytest

from .test_api import BASE, TITLE, same, txt2img

KOHYA = "Kohya HRFix Integrated"


def infotext(result: dict) -> str:
    return json.loads(result["info"])["infotexts"][0]


def test_transformer_index_and_official_names(api, model_layers):
    """``u0.3`` picks one transformer of an SDXL block; the official ``['m0']`` is the first middle
    layer and runs exactly as our spelling of it."""
    official = txt2img(api, [{"layers": "['m0']", "blur_sigma": 2}])
    ours = txt2img(api, [{"layers": "m0.0", "blur_sigma": 2}])
    assert same(official["images"][0], ours["images"][0])
    assert "SEG layers: " + ("m0.0" if "u0" in model_layers else "m0") in infotext(official)
    if "u0" not in model_layers:  # SD1.x/SD2.x: one transformer per block
        status, body = api.post(
            "/sdapi/v1/txt2img", {"prompt": "x", "alwayson_scripts": {TITLE: {"args": [{"layers": "u0.3"}]}}}
        )
        assert status >= 400 and "'u0.3' names attention layers this model does not have" in json.dumps(body)
        return
    plain = txt2img(api)
    one = txt2img(api, [{"layers": "u0.3", "blur_sigma": 2, "scale": 10}])
    assert "SEG layers: u0.3" in infotext(one)
    assert not same(one["images"][0], plain["images"][0])


@pytest.mark.parametrize("factor", [1.5, 3.0])
def test_deep_shrink_blurs_the_shrunk_layers(api, alwayson_titles, server_log, factor):
    """Deep Shrink at input block 3 gives d4 a map no latent level has (128 px, 1.5x: 8x8 -> 5x5).
    SEG there with a finite sigma must blur (the image differs from Deep Shrink alone, which is what
    leaving the layer unblurred would give) and print no "left unblurred" warning."""
    if KOHYA.lower() not in alwayson_titles:
        pytest.skip(f"this host has no {KOHYA!r} script")
    shrink = {KOHYA: {"args": [True, 3, factor, 0.0, 1.0, True, "bicubic", "bicubic"]}}
    alone = api.generate("/sdapi/v1/txt2img", {**BASE, "alwayson_scripts": shrink})
    mark = server_log.mark()
    seg_args = {TITLE: {"args": [{"layers": "d4", "blur_sigma": 3, "scale": 10}]}}
    with_seg = api.generate("/sdapi/v1/txt2img", {**BASE, "alwayson_scripts": {**shrink, **seg_args}})
    assert not same(with_seg["images"][0], alone["images"][0])
    every_layer = {TITLE: {"args": [{"layers": "all", "blur_sigma": 3}]}}
    api.generate("/sdapi/v1/txt2img", {**BASE, "alwayson_scripts": {**shrink, **every_layer}})
    log = server_log.since(mark)
    if log is not None:  # neither d4 alone nor every layer of the model was left unblurred
        assert "unblurred" not in log, log


def test_token_merging_blurs_the_merged_layers(api, forge_family, model_layers, server_log):
    """A1111's token merging (tomesd, ratio 0.5) merges the tokens of SD1.x's full-size layers (d1,
    d2, u9-u11).  SEG on d1 alone, finite sigma, must change the image against token merging alone and
    print no "left unblurred" warning."""
    if forge_family:  # Forge Classic applies it too, but SEG's Forge adapter leaves merged layers unblurred
        pytest.skip("SEG handles A1111's tomesd token merging exactly only on A1111 (docs/hosts.md, Forge and reForge)")
    if "d1" not in model_layers:
        pytest.skip("this model has no attention at full latent size (SDXL): token merging touches no SEG layer")
    status, body = api.post("/sdapi/v1/options", {"token_merging_ratio": 0.0})  # so the override is undone
    assert status == 200, body
    merged = {"override_settings": {"token_merging_ratio": 0.5}, "override_settings_restore_afterwards": True}
    alone = txt2img(api, **merged)
    mark = server_log.mark()
    with_seg = txt2img(api, [{"layers": "d1", "blur_sigma": 2, "scale": 10}], **merged)
    assert not same(with_seg["images"][0], alone["images"][0])
    assert not same(alone["images"][0], txt2img(api)["images"][0])  # token merging really was on
    log = server_log.since(mark)
    if log is not None:
        assert "unblurred" not in log, log
