"""End-to-end: the "Smoothed Energy Guidance" node in a running ComfyUI (skipped unless ``COMFYUI_URL`` is set).

ComfyUI must have this repository in ``custom_nodes/`` and an SD1.x checkpoint named by ``COMFYUI_CKPT``
(default ``sd15-random.safetensors``; random weights are fine: images are compared with each other only).  The
transformer tests run on the tiny random Flux of ``tools/make_comfy_tiny_flux.py`` in ``models/diffusion_models/``
(``COMFYUI_DIT``, default ``flux-tiny-random.safetensors``; skipped when ComfyUI does not list it), built from
ComfyUI's own Flux class and conditioned by the SD1.5 checkpoint's CLIP-L; its latents are compared (``SaveLatent``).
Driven as a user's API client drives it: ``POST /prompt`` with an API-format workflow, ``GET /history/<id>``,
``GET /view``.  ComfyUI caches the outputs of an identical prompt, so each prompt that must sample again gets its
own ``denoise`` of ``1 - k·1e-7`` (the same schedule; the images of two such plain prompts are identical).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

URL = os.environ.get("COMFYUI_URL", "").rstrip("/")
CKPT = os.environ.get("COMFYUI_CKPT", "sd15-random.safetensors")
DIT = os.environ.get("COMFYUI_DIT", "flux-tiny-random.safetensors")
_RERUN = itertools.count(1)


def _call(path: str, body: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(URL + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=900) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def workflow(
    seg: dict | None = None, width=128, height=128, batch=1, pag: float | None = None, seg2: dict | None = None
):
    """CheckpointLoaderSimple -> [PAG] -> [SEG] -> [SEG] -> KSampler (euler, 4 steps, cfg 5) -> VAEDecode -> Save."""
    w = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red house by a lake", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "seg_e2e"}},
    }
    model = ["1", 0]
    if pag is not None:
        w["8"] = {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": model, "scale": pag}}
        model = ["8", 0]
    for node, settings in (("9", seg), ("10", seg2)):
        if settings is not None:
            inputs = {"scale": 3.0, "blur_sigma": 10.0, "infinite_blur": True, "layers": "middle"}
            inputs.update(start_percent=0.0, end_percent=1.0, **settings)
            w[node] = {"class_type": "SmoothedEnergyGuidance", "inputs": {"model": model, **inputs}}
            model = [node, 0]
    sampler = {"seed": 1234, "steps": 4, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal"}
    sampler.update(denoise=1.0 - next(_RERUN) * 1e-7, model=model, positive=["2", 0], negative=["3", 0])
    w["5"] = {"class_type": "KSampler", "inputs": {**sampler, "latent_image": ["4", 0]}}
    return w


def read_latent(raw: bytes):
    """``latent_tensor`` of a ComfyUI ``.latent`` file (a safetensors file: 8-byte header size, JSON, data)."""
    import numpy as np

    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])["latent_tensor"]
    assert header["dtype"] == "F32", header
    start, stop = header["data_offsets"]
    return np.frombuffer(raw[8 + size + start : 8 + size + stop], dtype="<f4").reshape(header["shape"])


def run(w: dict) -> tuple[str, object]:
    """('success', [pixel arrays or latents]) or ('error', the message ComfyUI gave)."""
    import numpy as np
    from PIL import Image

    status, body = _call("/prompt", {"prompt": w})
    if status != 200:
        return "error", body.decode(errors="replace")
    prompt_id = json.loads(body)["prompt_id"]
    deadline = time.time() + 900
    while time.time() < deadline:
        history = json.loads(_call(f"/history/{prompt_id}")[1])
        state = (history.get(prompt_id) or {}).get("status") or {}
        if state.get("status_str") in ("success", "error"):
            break
        time.sleep(0.25)
    if state.get("status_str") != "success":
        return "error", json.dumps(state)
    results = []
    for output in history[prompt_id]["outputs"].values():
        for key in ("images", "latents"):
            for record in output.get(key) or []:
                query = urllib.parse.urlencode({k: record.get(k, "") for k in ("filename", "subfolder", "type")})
                raw = _call(f"/view?{query}")[1]
                if key == "latents":
                    results.append(read_latent(raw))
                else:
                    results.append(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
    return "success", results


def images(w: dict) -> list:
    status, result = run(w)
    assert status == "success", result
    return result


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and (x == y).all() for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def plain():
    return images(workflow())


def test_the_node_is_registered_with_its_inputs():
    info = json.loads(_call("/object_info/SmoothedEnergyGuidance")[1])["SmoothedEnergyGuidance"]
    assert info["display_name"] == "Smoothed Energy Guidance" and info["category"] == "model_patches"
    required = info["input"]["required"]
    assert list(required) == ["model", "scale", "blur_sigma", "infinite_blur", "layers", "start_percent", "end_percent"]
    assert all(spec[1].get("tooltip") for spec in required.values())


def test_seg_changes_the_image(plain):
    assert not same(images(workflow(seg={})), plain)


def test_scale_zero_is_bit_identical_to_no_node(plain):
    assert same(images(workflow(seg={"scale": 0.0})), plain)


def test_a_finite_sigma_differs_from_the_infinite_blur():
    infinite = images(workflow(seg={"layers": "d7-8,m0"}))
    finite = images(workflow(seg={"layers": "d7-8,m0", "infinite_blur": False, "blur_sigma": 1.0}))
    assert not same(finite, infinite)


def test_bad_layers_fail_naming_layers():
    status, message = run(workflow(seg={"layers": "d99"}))
    assert status == "error" and "SEG layers" in message and "it has" in message


def test_non_square_and_batch_of_two(plain):
    wide = images(workflow(seg={}, width=192, height=128))
    assert wide[0].shape[:2] == (128, 192)
    assert not same(wide, images(workflow(width=192, height=128)))
    pair = images(workflow(seg={}, batch=2))
    assert len(pair) == 2 and not same(pair[:1], plain)


def test_stacks_with_pag_and_with_itself(plain):
    pag = images(workflow(pag=3.0))
    both = images(workflow(pag=3.0, seg={}))
    assert not same(both, pag) and not same(both, images(workflow(seg={})))
    twice = images(workflow(seg={"layers": "m0"}, seg2={"layers": "u3-4", "scale": 2.0}))
    assert not same(twice, images(workflow(seg={"layers": "m0"})))


def test_a_plain_prompt_after_seg_is_bit_identical_to_the_first_plain_one(plain):
    images(workflow(seg={"infinite_blur": False, "blur_sigma": 3.0}))
    assert same(images(workflow()), plain)


# --- a transformer through ComfyUI's own Flux class ------------------------------------------------------------


def flux_workflow(seg: dict | None = None, cfg: float = 1.0, batch: int = 1, width: int = 128, height: int = 96):
    """UNETLoader (tiny Flux) + the SD1.5 checkpoint's CLIP -> [SEG] -> KSampler (euler, 3 steps) -> SaveLatent."""
    w = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": DIT, "weight_dtype": "default"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red house by a lake", "clip": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "latents/seg_e2e"}},
    }
    model = ["1", 0]
    if seg is not None:
        inputs = {"scale": 3.0, "blur_sigma": 10.0, "infinite_blur": True, "layers": "middle"}
        inputs.update(start_percent=0.0, end_percent=1.0, **seg)
        w["9"] = {"class_type": "SmoothedEnergyGuidance", "inputs": {"model": model, **inputs}}
        model = ["9", 0]
    sampler = {"seed": 7, "steps": 3, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple"}
    sampler.update(denoise=1.0 - next(_RERUN) * 1e-7, model=model, positive=["3", 0], negative=["4", 0])
    w["6"] = {"class_type": "KSampler", "inputs": {**sampler, "latent_image": ["5", 0]}}
    return w


@pytest.fixture(scope="module")
def flux():
    listed = json.loads(_call("/object_info/UNETLoader")[1])["UNETLoader"]["input"]["required"]["unet_name"][0]
    if DIT not in listed:
        pytest.skip(f"{DIT} is not in ComfyUI's models/diffusion_models (tools/make_comfy_tiny_flux.py writes it)")
    return {cfg: images(flux_workflow(cfg=cfg)) for cfg in (1.0, 4.0)}


@pytest.mark.parametrize("cfg", [1.0, 4.0], ids=["cfg1", "cfg4"])
def test_flux_seg_changes_the_latent_and_scale_zero_does_not(flux, cfg):
    assert not same(images(flux_workflow(seg={}, cfg=cfg)), flux[cfg])
    assert same(images(flux_workflow(seg={"scale": 0.0}, cfg=cfg)), flux[cfg])


def test_flux_finite_sigma_differs_and_batch_of_two(flux):
    finite = images(flux_workflow(seg={"layers": "d0-1,s1", "infinite_blur": False, "blur_sigma": 0.5}))
    assert not same(finite, images(flux_workflow(seg={"layers": "d0-1,s1"})))
    pair = images(flux_workflow(seg={}, batch=2))
    assert pair[0].shape[0] == 2 and not same([pair[0][:1]], flux[1.0])


def test_flux_bad_layers_fail_naming_its_blocks(flux):
    status, message = run(flux_workflow(seg={"layers": "j7-9"}))
    assert status == "error" and "SEG layers" in message and "d0-1,s0-1" in message


def test_flux_plain_after_seg_is_bit_identical(flux):
    images(flux_workflow(seg={"layers": "all"}))
    assert same(images(flux_workflow()), flux[1.0])
