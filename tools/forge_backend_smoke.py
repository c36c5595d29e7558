"""Smoke check of lib_seg.forge against a REAL new-Forge ``backend`` (not a test: it needs a Forge tree).

Builds a tiny random ``backend.nn.unet.IntegratedUNet2DConditionModel``, wraps it in Forge's own
``UnetPatcher`` and runs one step through Forge's own ``sampling_function_inner`` and
``calc_cond_uncond_batch``.  The SEG result must equal ``denoised + s * (cond - cond_ref)``, where
``cond_ref`` comes from an unpatched pass with a forward hook on the layer's ``to_q`` (no adapter code).

Run with the Forge venv:
    FORGE_DIR=/path/to/forge /path/to/forge-venv/bin/python tools/forge_backend_smoke.py
``--always-cpu`` is added to argv because ``backend.args`` parses it at import.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace


def _setup_paths() -> None:
    sys.argv.append("--always-cpu")
    forge_dir = os.environ.get("FORGE_DIR", "../forge")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    extra = [forge_dir, f"{forge_dir}/packages_3rdparty", f"{forge_dir}/repositories/huggingface_guess", repo]
    sys.path[:0] = extra


def main() -> None:
    _setup_paths()
    import torch
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.patcher.unet import UnetPatcher
    from backend.sampling import sampling_function as sf
    from backend.sampling.condition import ConditionCrossAttn

    from lib_seg.core.blur import blur_queries
    from lib_seg.core.params import SegParams
    from lib_seg.forge import adapter as forge
    from lib_seg.forge import host as forge_host

    torch.manual_seed(0)
    print("host_kind:", forge.host_kind())
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
    patcher = UnetPatcher(Model(), load_device=cpu, offload_device=cpu)
    x, sigma = torch.randn(2, 4, 13, 9), torch.full((2,), 2.5)
    cond = [{"model_conds": {"c_crossattn": ConditionCrossAttn(torch.randn(2, 5, 16))}}]
    uncond = [{"model_conds": {"c_crossattn": ConditionCrossAttn(torch.randn(2, 5, 16))}}]

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
        return sf.sampling_function_inner(u.model, x, sigma, uncond, cond, cfg, u.model_options)

    def cond_pass():
        return sf.calc_cond_uncond_batch(patcher.model, cond, None, x, sigma, patcher.model_options)[0]

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
