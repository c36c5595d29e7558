"""Smoke check of lib_seg.forge against a REAL new-Forge ``backend`` (not a test: it needs a Forge tree;
``--host imitation`` is its self-check without one, run by CI).

Builds a tiny random ``backend.nn.unet.IntegratedUNet2DConditionModel``, wraps it in Forge's own
``UnetPatcher`` and runs one step through Forge's own ``sampling_function_inner`` and
``calc_cond_uncond_batch``.  The SEG result must equal ``denoised + s * (cond - cond_ref)``, where
``cond_ref`` comes from an unpatched pass with a forward hook on the layer's ``to_q`` (no adapter code).

Run from the repo root with the Forge venv:
    FORGE_DIR=/path/to/forge /path/to/forge-venv/bin/python -m tools.forge_backend_smoke
``--always-cpu`` is added to argv because ``backend.args`` parses it at import.

Self-check without a Forge tree (what CI runs, tests/tools): ``--host imitation`` takes the UNet
(tests/support/unet.py at the same sizes), ``UnetPatcher``, the KModel (``BaseModel``, which hides
``activations_shape`` from attn1 patches as Forge's blocks do) and the sampling module from the repo's
new-Forge imitation (tests/support/unet.py, forge_host.py); the steps, references and assertions below
run unchanged.  It checks this tool and lib_seg against the imitation only:
    python -m tools.forge_backend_smoke --host imitation
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any


def _setup_paths() -> None:
    sys.argv.append("--always-cpu")
    forge_dir = os.environ.get("FORGE_DIR", "../forge")
    sys.path[:0] = [forge_dir, f"{forge_dir}/packages_3rdparty", f"{forge_dir}/repositories/huggingface_guess"]


@dataclass
class Host:
    """What the check needs of a new-Forge host: a tiny random UNet, the KModel and patcher around it, the two
    sampling functions, and the cond wrapper of its ``model_conds``; ``calls`` gets each UNet call's rows;
    ``dtype`` is the UNet's, that of the inputs too."""

    unet: Any
    model: Any
    patcher: Any
    sampling_function_inner: Callable
    calc_cond_uncond_batch: Callable
    condition: Callable
    calls: list[int]
    dtype: Any


def backend_host() -> Host:
    """The real ``backend``: its UNet class, its UnetPatcher, its sampling module; the KModel is ``Model``."""
    _setup_paths()
    import torch
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.patcher.unet import UnetPatcher
    from backend.sampling import sampling_function as sf
    from backend.sampling.condition import ConditionCrossAttn

    torch.manual_seed(0)
    unet = IntegratedUNet2DConditionModel(
        in_channels=4,
        model_channels=32,
        out_channels=4,
        num_res_blocks=1,
        channel_mult=(1, 2),
        num_head_channels=8,
        use_spatial_transformer=True,
        transformer_depth=[1, 1],
        context_dim=16,
        transformer_depth_output=[1, 1, 1, 1],
        transformer_depth_middle=1,
        use_linear_in_transformer=True,
    ).eval()
    for parameter in unet.parameters():
        torch.nn.init.normal_(parameter, std=0.2)

    class Model(torch.nn.Module):
        """The two things ``calc_cond_uncond_batch`` needs of a KModel."""

        def __init__(self):
            super().__init__()
            self.diffusion_model = unet

        def memory_required(self, shape):
            return 0

        def apply_model(self, x, t, c_crossattn=None, transformer_options=None, **_):
            calls.append(x.shape[0])
            eps = self.diffusion_model(x, t, context=c_crossattn, transformer_options=transformer_options or {})
            return x - 0.5 * eps

    calls: list[int] = []
    cpu = torch.device("cpu")
    model = Model()
    patcher = UnetPatcher(model, load_device=cpu, offload_device=cpu)
    inner, batch = sf.sampling_function_inner, sf.calc_cond_uncond_batch
    return Host(unet, model, patcher, inner, batch, ConditionCrossAttn, calls, torch.float32)


def imitation_host() -> Host:
    """tests/support's new Forge: its modules in ``sys.modules`` (lib_seg's host lookups find them), the UNet
    at the sizes above, its ``BaseModel`` as the KModel (``rows``: the rows of each call), conds as tensors.

    In float64: this UNet amplifies float32 rounding more than Forge's (in float32 its batch-shape noise alone,
    5e-5, exceeds the 1e-5 bound below, which was set on Forge's UNet); in float64 rounding stays far under it,
    and the SEG term (about 1e-3) stays well above the 1e-4 the check asks of it."""
    import torch

    from tests.support import forge_host as imitation
    from tests.support.unet import UNetConfig, UNetModel

    sys.modules.update(imitation.host_modules("forge"))  # this process is the host's: nothing to undo
    sf = sys.modules["backend.sampling.sampling_function"]
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (7x here on a busy 2-core machine)
    torch.manual_seed(0)
    config = UNetConfig(32, (1, 2), 1, (1, 1), 1, head_dim=8, context_dim=16, use_linear=True)
    unet = UNetModel(config).double().eval()
    for parameter in unet.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    model = imitation.BaseModel(unet, activations_shape=False)  # Forge's blocks do not report the shape
    patcher = imitation.UnetPatcher(model)
    inner, batch = sf.sampling_function, sf.calc_cond_uncond_batch  # its sampling_function is the inner one
    return Host(unet, model, patcher, inner, batch, lambda tensor: tensor, model.rows, torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", choices=("forge2", "imitation"), default="forge2", help="imitation: no tree (CI)")
    known, _ = parser.parse_known_args()  # the rest is for backend.args, which parses argv at import
    host = (imitation_host if known.host == "imitation" else backend_host)()
    import torch

    from lib_seg.core.blur import blur_queries
    from lib_seg.core.params import SegParams
    from lib_seg.forge import adapter as forge
    from lib_seg.forge import host as forge_host

    print("host_kind:", forge.host_kind())
    unet, patcher, calls = host.unet, host.patcher, host.calls
    dtype = host.dtype
    x, sigma = torch.randn(2, 4, 13, 9, dtype=dtype), torch.full((2,), 2.5, dtype=dtype)
    cond = [{"model_conds": {"c_crossattn": host.condition(torch.randn(2, 5, 16, dtype=dtype))}}]
    uncond = [{"model_conds": {"c_crossattn": host.condition(torch.randn(2, 5, 16, dtype=dtype))}}]

    def processing():
        denoiser = SimpleNamespace(step=0, total_steps=1)
        objects = SimpleNamespace(unet=patcher)
        return SimpleNamespace(
            sd_model=SimpleNamespace(forge_objects=objects),
            is_hr_pass=False,
            sampler=SimpleNamespace(model_wrap_cfg=denoiser),
        )

    def run(p, cfg):
        u = p.sd_model.forge_objects.unet
        return host.sampling_function_inner(u.model, x, sigma, uncond, cond, cfg, u.model_options)

    def cond_pass():
        return host.calc_cond_uncond_batch(patcher.model, cond, None, x, sigma, patcher.model_options)[0]

    with torch.no_grad():
        cond_plain = cond_pass()
        to_q = unet.middle_block[1].transformer_blocks[0].attn1.to_q
        hook = to_q.register_forward_hook(lambda _m, _a, q: q.mean(1, keepdim=True).expand_as(q))
        cond_ref = cond_pass()
        hook.remove()
        for cfg, batch_rows in ((7.0, True), (7.0, False), (1.0, True), (1.0, False)):
            base = run(processing(), cfg)
            p = processing()
            print("canonical:", forge.patch_unet(p, SegParams(enabled=True, scale=2.0), batch_rows=batch_rows))
            calls.clear()
            first_layer = unet.input_blocks[1][0]  # prefix reuse leaves its output without the SEG rows
            prefix_rows: list[int] = []
            handle = first_layer.register_forward_hook(lambda _m, _a, o, r=prefix_rows: r.append(o.shape[0]))
            out = run(p, cfg)
            handle.remove()
            err = (out - (base + 2.0 * (cond_plain - cond_ref))).abs().max().item()
            print(
                f"cfg {cfg}, middle, inf, batch_rows={batch_rows}: UNet call rows {calls}, "
                f"down-path rows {prefix_rows}, max err {err:.3g}, "
                f"|seg term| {(out - base).abs().max().item():.3g}"
            )
            assert len(calls) == (1 if batch_rows else 2)
            assert err < 1e-5 and (out - base).abs().max() > 1e-4
            assert patcher.model_options == {"transformer_options": {}}

        grids = {}
        st = unet.input_blocks[1][1]
        pre = st.register_forward_pre_hook(lambda _m, a: grids.__setitem__("hw", tuple(a[0].shape[-2:])))
        blur = lambda _m, _a, q: blur_queries(q, *grids["hw"], 2.0)  # noqa: E731
        hook = st.transformer_blocks[0].attn1.to_q.register_forward_hook(blur)
        cond_ref = cond_pass()
        hook.remove()
        pre.remove()
        base = run(processing(), 7.0)
        p = processing()
        print("canonical:", forge.patch_unet(p, SegParams(enabled=True, scale=2.0, blur_sigma=2.0, layers="d1")))
        err = (run(p, 7.0) - (base + 2.0 * (cond_plain - cond_ref))).abs().max().item()
        print(f"cfg 7, d1 on a {grids['hw']} grid, sigma 2: max err {err:.3g}")
        assert err < 1e-5

        p = processing()
        forge.patch_unet(p, SegParams(enabled=True, layers="d2"))
        try:
            run(p, 7.0)
            raise AssertionError("bad layers did not raise")
        except ValueError as error:
            print("bad layers raised:", error)
    attention = forge_host.attention_function("forge")
    print("attention function:", attention.__module__, attention.__name__)
    print("OK")


if __name__ == "__main__":
    main()
