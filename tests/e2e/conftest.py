"""End-to-end API tests against a running WebUI with this extension installed.

Skipped unless ``WEBUI_URL`` is set, e.g. ``WEBUI_URL=http://127.0.0.1:7860 python -m pytest tests/e2e``.
``WEBUI_LOG`` (optional) names the server's console log, so tests can check what a request printed.
The server must have a checkpoint loaded (random weights are fine: the tests compare images with each
other, never with references): an SD1.x/SD2.x/SDXL UNet runs test_api.py and test_layers_and_grids.py,
a DiT (SD3 on A1111) runs test_dit.py; the other files skip themselves.
"""

import base64
import io
import json
import os
import urllib.error
import urllib.request

import pytest

from tests.support.infotext_fields import parameter_fields

URL = os.environ.get("WEBUI_URL", "").rstrip("/")


COMFYUI_URL = os.environ.get("COMFYUI_URL", "").rstrip("/")


def pytest_collection_modifyitems(config, items):
    """WebUI tests need ``WEBUI_URL``; the ComfyUI tests (test_comfyui.py) need ``COMFYUI_URL``."""
    skip_webui = pytest.mark.skip(reason="WEBUI_URL is not set (needs a running WebUI with this extension)")
    skip_comfyui = pytest.mark.skip(reason="COMFYUI_URL is not set (needs a running ComfyUI with this node)")
    for item in items:
        path = str(item.fspath).replace("\\", "/")
        if "tests/e2e" not in path:
            continue
        if path.endswith("test_comfyui.py"):
            if not COMFYUI_URL:
                item.add_marker(skip_comfyui)
        elif not URL:
            item.add_marker(skip_webui)


class Api:
    def post(self, route: str, payload: dict) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{URL}{route}", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=900) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def get(self, route: str) -> dict:
        with urllib.request.urlopen(f"{URL}{route}", timeout=60) as response:
            return json.loads(response.read())

    def generate(self, route: str, payload: dict) -> dict:
        status, body = self.post(route, payload)
        assert status == 200, body
        return body


TITLE = "Smoothed Energy Guidance"
BASE = {  # the txt2img request the test modules vary (``BASE`` of each module: the baseline fixtures' request)
    "prompt": "a red house by a lake",
    "negative_prompt": "blurry",
    "steps": 3,
    "cfg_scale": 7,
    "sampler_name": "Euler",
    "seed": 1234,
    "width": 128,
    "height": 128,
    "batch_size": 1,
}


def pixels(image_b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(image_b64.split(",", 1)[-1]))).convert("RGB")


def same(a: str, b: str) -> bool:
    """Two base64 images are equal pixel for pixel."""
    from PIL import ImageChops

    return ImageChops.difference(pixels(a), pixels(b)).getbbox() is None


def mean_difference(a: str, b: str) -> float:
    """Mean absolute difference of the red channel, 0-255."""
    from PIL import ImageChops

    diff = ImageChops.difference(pixels(a), pixels(b))
    return sum(diff.getdata(band=0)) / (diff.width * diff.height)


def txt2img(api: "Api", base: dict, args: list | None = None, **changes) -> dict:
    """A txt2img request: ``base`` with ``changes``, SEG's ``args`` when given."""
    payload = {**base, **changes}
    if args is not None:
        payload["alwayson_scripts"] = {TITLE: {"args": args}}
    return api.generate("/sdapi/v1/txt2img", payload)


@pytest.fixture(scope="session")
def api() -> Api:
    return Api()


@pytest.fixture(scope="module")
def baseline(api, request) -> dict:
    """The test module's ``BASE`` request without SEG."""
    return txt2img(api, request.module.BASE)


@pytest.fixture(scope="module")
def with_seg(api, request) -> dict:
    """The test module's ``BASE`` request with SEG on at its defaults."""
    return txt2img(api, request.module.BASE, [{"enabled": True}])


def infotext_fields(result: dict, index: int = 0) -> dict[str, str]:
    """The fields of a result's infotext, values unquoted as the host's own parser does (A1111 and Neo
    quote values holding commas: ``SEG layers: "d0,s0"``)."""
    return parameter_fields(json.loads(result["info"])["infotexts"][index])


def parameters_of(api: "Api", result: dict) -> str:
    """The generation parameters stored in a result's first image (``/sdapi/v1/png-info``)."""
    return api.generate("/sdapi/v1/png-info", {"image": result["images"][0]})["info"]


def assert_pastes_back(api: "Api", base: dict, baseline: dict, with_seg: dict) -> None:
    """``with_seg``'s parameters sent back through txt2img's ``infotext`` field give the same image.
    Skipped where the field fails for an image without SEG too (Forge 2.x: its ``apply_infotext``
    fails on list-typed request fields, with or without extensions)."""
    status, body = api.post("/sdapi/v1/txt2img", {"infotext": parameters_of(api, baseline), "prompt": base["prompt"]})
    if status != 200:
        pytest.skip(f"this host's txt2img 'infotext' field fails without SEG too: {body}")
    status, body = api.post("/sdapi/v1/txt2img", {"infotext": parameters_of(api, with_seg), "prompt": base["prompt"]})
    assert status == 200, body
    assert same(body["images"][0], with_seg["images"][0])


@pytest.fixture(scope="session")
def is_forge(api) -> bool:
    """Forge 2.x (backend/): its options carry forge_* keys."""
    return any(key.startswith("forge_additional_modules") for key in api.get("/sdapi/v1/options"))


@pytest.fixture(scope="session")
def forge_family(api, alwayson_titles) -> bool:
    """Any Forge (classic 1.x, Forge Classic, 2.x, Neo, reForge): SEG runs its Forge adapter there.  Told by
    the Forge built-ins (Forge Classic and reForge: "Never OOM Integrated"; 2.x: "Kohya HRFix Integrated")
    or by Forge's own options (2.x and Neo: ``forge_*`` keys)."""
    builtins = {"never oom integrated", "kohya hrfix integrated"}
    return bool(builtins & alwayson_titles) or any(key.startswith("forge_") for key in api.get("/sdapi/v1/options"))


@pytest.fixture(scope="session")
def hires_upscaler(api) -> str:
    """An upscaler this host has without model files: a latent mode if it lists any (A1111, Forge,
    reForge: "Latent"), else "None" (this Neo build lists no latent modes, only None and ESRGAN)."""
    latent = [mode["name"] for mode in api.get("/sdapi/v1/latent-upscale-modes")]
    if latent:
        return "Latent" if "Latent" in latent else latent[0]
    names = [upscaler["name"] for upscaler in api.get("/sdapi/v1/upscalers")]
    assert "None" in names, f"no upscaler that needs no model file: {names}"
    return "None"


@pytest.fixture(scope="session")
def model_layers(api) -> list[str]:
    """The loaded model's attention blocks, read from SEG's own error for a layer no model has."""
    payload = {"prompt": "x", "steps": 1, "width": 64, "height": 64}
    payload["alwayson_scripts"] = {"Smoothed Energy Guidance": {"args": [{"layers": "d99"}]}}
    _, body = api.post("/sdapi/v1/txt2img", payload)
    text = json.dumps(body)
    marker = "it has "
    assert marker in text, body
    return text[text.index(marker) + len(marker) :].split('"')[0].split("\\")[0].split(",")


@pytest.fixture(scope="session")
def is_dit(model_layers) -> bool:
    """A DiT names its blocks d/s/j (Flux, SD3); every UNet has a middle block m0."""
    return not any(item.startswith("m") for item in model_layers)


@pytest.fixture(autouse=True)
def _loaded_model_fits_the_file(request):
    if not URL:
        return
    wants_dit = request.module.__name__.rsplit(".", 1)[-1] == "test_dit"
    if request.getfixturevalue("is_dit") != wants_dit:
        pytest.skip("needs a DiT (SD3/Flux) loaded" if wants_dit else "needs a UNet (SD1.x/SD2.x/SDXL) loaded")


@pytest.fixture(scope="session")
def alwayson_titles(api) -> set[str]:
    """Lower-cased titles of the host's AlwaysOn txt2img scripts (``GET /sdapi/v1/script-info``)."""
    return {info["name"] for info in api.get("/sdapi/v1/script-info") if info.get("is_alwayson")}


class ServerLog:
    """The server's console log, when ``WEBUI_LOG`` names it: tests read what a request printed."""

    def __init__(self, path: str):
        self.path = path

    def mark(self) -> int:
        return os.path.getsize(self.path) if self.path else 0

    def since(self, mark: int) -> str | None:
        if not self.path:
            return None
        with open(self.path, encoding="utf-8", errors="replace") as log:
            log.seek(mark)
            return log.read()


@pytest.fixture(scope="session")
def server_log() -> ServerLog:
    return ServerLog(os.environ.get("WEBUI_LOG", ""))
