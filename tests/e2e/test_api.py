"""API scenarios (A1111, Forge, reForge): SEG off/on, named and positional args, bad args,
infotext round trip, hires modes, batch, non-square size, img2img and inpaint."""

import base64
import io
import json

import pytest
from PIL import Image, ImageChops

from . import conftest
from .conftest import TITLE, mean_difference, pixels, same

BASE = conftest.BASE


def txt2img(api, args=None, **changes):
    return conftest.txt2img(api, BASE, args, **changes)


def test_seg_off_is_identical_to_no_extension(api, baseline):
    for args in ([False], [{"enabled": False}], [True, 0.0]):
        assert same(txt2img(api, args)["images"][0], baseline["images"][0]), args


def test_seg_on_changes_the_image_and_writes_infotext(baseline, with_seg):
    assert not same(with_seg["images"][0], baseline["images"][0])
    info = json.loads(with_seg["info"])["infotexts"][0]
    assert "SEG scale: 3" in info and "SEG blur sigma: inf" in info and "SEG layers: middle" in info
    assert "SEG" not in json.loads(baseline["info"])["infotexts"][0]


def test_named_and_positional_args_agree(api):
    named = txt2img(api, [{"blur_sigma": 1.5, "layers": "all"}])
    positional = txt2img(api, [True, 3.0, False, 1.5, "all"])
    assert same(named["images"][0], positional["images"][0])


@pytest.mark.parametrize(
    "args,message",
    [
        ([{"scale": 50}], "SEG scale must be a number in [0, 20]"),
        ([{"sigma": 3}], "unknown setting(s) 'sigma'"),
        ([{"layers": "d3"}], "'d3' names attention layers this model does not have"),
        ([True, 3.0, False, -1.0], "SEG blur_sigma must be a number > 0"),
    ],
)
def test_bad_args_fail_the_request_and_change_nothing_after(api, baseline, args, message):
    status, body = api.post("/sdapi/v1/txt2img", {**BASE, "alwayson_scripts": {TITLE: {"args": args}}})
    assert status >= 400 and message in json.dumps(body), body
    assert same(txt2img(api)["images"][0], baseline["images"][0])


def test_infotext_round_trip(api, baseline, with_seg):
    parameters = conftest.parameters_of(api, with_seg)
    assert "SEG scale: 3" in parameters and "SEG layers: middle" in parameters
    conftest.assert_pastes_back(api, BASE, baseline, with_seg)


def test_hires_modes(api, is_forge, hires_upscaler):
    hires = {
        "enable_hr": True,
        # Forge 2.x's API fails any hires request without this field (processing.py reads it unchecked)
        **({"hr_additional_modules": ["Use same choices"]} if is_forge else {}),
        "hr_scale": 1.5,
        "hr_upscaler": hires_upscaler,
        "hr_second_pass_steps": 2,
        "denoising_strength": 0.6,
    }
    off = txt2img(api, [{"hires_mode": "off"}], **hires)
    same_mode = txt2img(api, [{"hires_mode": "same"}], **hires)
    custom = txt2img(api, [{"hires_mode": "custom", "hires_scale": 3, "hires_blur_sigma": "inf"}], **hires)
    assert pixels(off["images"][0]).size == (192, 192)
    assert not same(off["images"][0], same_mode["images"][0])
    assert same(custom["images"][0], same_mode["images"][0])  # custom with the same values == same
    assert conftest.infotext_fields(off)["SEG hires"] == "off"


def test_batch_of_two_non_square_finite_sigma(api):
    kwargs = {"batch_size": 2, "width": 192, "height": 128}
    plain = txt2img(api, **kwargs)
    seg = txt2img(api, [{"blur_sigma": 2}], **kwargs)
    assert len(seg["images"]) == 2 and pixels(seg["images"][0]).size == (192, 128)
    assert all(not same(a, b) for a, b in zip(plain["images"], seg["images"], strict=True))


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_img2img_and_inpaint(api, baseline):
    init = baseline["images"][0]
    payload = {**BASE, "init_images": [init], "denoising_strength": 0.75}
    plain = api.generate("/sdapi/v1/img2img", payload)
    seg = api.generate("/sdapi/v1/img2img", {**payload, "alwayson_scripts": {TITLE: {"args": [{}]}}})
    assert not same(plain["images"][0], seg["images"][0])

    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (0, 0, 64, 128))  # repaint the left half
    inpaint = {**payload, "mask": _png(mask), "mask_blur": 0, "inpainting_fill": 1, "inpaint_full_res": False}
    plain = pixels(api.generate("/sdapi/v1/img2img", inpaint)["images"][0])
    seg = pixels(
        api.generate("/sdapi/v1/img2img", {**inpaint, "alwayson_scripts": {TITLE: {"args": [{}]}}})["images"][0]
    )
    right = (64, 0, 128, 128)
    assert ImageChops.difference(plain.crop(right), seg.crop(right)).getbbox() is None  # protected area
    assert ImageChops.difference(plain.crop((0, 0, 64, 128)), seg.crop((0, 0, 64, 128))).getbbox() is not None


@pytest.mark.parametrize("sampler", ["DDIM", "UniPC", "DPM++ 2M"])
def test_other_samplers(api, sampler):
    """DDIM/UniPC run in eps space (timesteps as sigma), DPM++ in x0 space: SEG must act in both."""
    plain = txt2img(api, sampler_name=sampler)
    off = txt2img(api, [False], sampler_name=sampler)
    seg = txt2img(api, [{"blur_sigma": 3}], sampler_name=sampler)
    assert same(plain["images"][0], off["images"][0])
    assert not same(plain["images"][0], seg["images"][0])


@pytest.mark.parametrize(
    "changes", [{"cfg_scale": 1}, {"prompt": "a red house AND a lake :0.5"}, {"negative_prompt": "blurry, " * 40}]
)
def test_seg_alone_and_prompts_and_unequal_lengths(api, changes):
    """CFG 1 (SEG alone), composable AND prompts, and a negative prompt longer than 75 tokens
    (cond/uncond of different lengths: the separate SEG call)."""
    changes = {**changes, **_no_norm_emphasis(api)}
    status, plain = api.post("/sdapi/v1/txt2img", {**BASE, **changes})
    # Random checkpoints can still make NaNs without SEG: the host then fails the request or
    # returns a flat image, and there is nothing to compare.
    if status != 200 and "NaN" in json.dumps(plain):
        pytest.skip(f"the host's own request for {changes} fails without SEG: {plain.get('errors', plain)}")
    assert status == 200, plain
    if _uniform(plain["images"][0]):
        pytest.skip(f"the host's own image for {changes} is one flat colour without SEG: nothing to compare")
    seg = txt2img(api, [{"end": 0.7}], **changes)
    assert not same(plain["images"][0], seg["images"][0])
    assert "SEG end: 0.7" in json.loads(seg["info"])["infotexts"][0]


def _no_norm_emphasis(api) -> dict:
    """Request fields that turn the emphasis mean-renormalisation off for this request.  With a random
    text encoder, A1111's and classic Forge's default ("Original") divides by a near-zero mean on a
    2-chunk prompt and makes NaNs without any extension.  The option is first saved as it is, so the
    host restores it after the request (it only restores keys already in its saved config)."""
    options = api.get("/sdapi/v1/options")
    if "emphasis" not in options:
        return {}
    status, body = api.post("/sdapi/v1/options", {"emphasis": options["emphasis"]})
    assert status == 200, body
    return {"override_settings": {"emphasis": "No norm"}, "override_settings_restore_afterwards": True}


def _uniform(image: str) -> bool:
    return all(low == high for low, high in pixels(image).getextrema())


@pytest.mark.parametrize(
    "seg,batch_size",
    [({"scale": 10, "blur_sigma": 2.0, "layers": "all"}, 1), ({"scale": 10, "layers": "m0,u3"}, 2)],
    ids=["one-image", "two-images-shared-prefix"],
)
def test_batched_rows_and_separate_pass_agree(api, seg, batch_size):
    """The setting "Run the SEG rows inside the main UNet call" changes the speed, not the image (up to
    float rounding of a different batch size); with two images the down path is also shared."""
    images = {}
    for batched in (True, False):
        settings = {"override_settings": {"seg_batch_rows": batched}, "override_settings_restore_afterwards": True}
        images[batched] = txt2img(api, [seg], batch_size=batch_size, **settings)["images"]
    plain = txt2img(api, batch_size=batch_size)["images"]
    for with_rows, separate, without in zip(images[True], images[False], plain, strict=True):
        effect = mean_difference(separate, without)
        assert effect > 0.05
        assert mean_difference(with_rows, separate) < effect / 20
