"""Per-step cost of SEG through the Forge-family adapter: CFG only vs the separate pass vs batched rows.

    python -m benchmarks.forge_step --out forge-table.md       # on a CUDA machine
    python -m benchmarks.forge_step --tiny                     # CPU smoke run of the script, no numbers

Same UNets as ``seg_step.py`` (tests/support/unet.py with the real SD1.5/SDXL configurations, random
fp16 weights).  The host is the imitation of new Forge's sampling contract in
tests/support/forge_host.py (``calc_cond_uncond_batch`` with its memory-limited batching and
``model_function_wrapper``); the code under test is ``lib_seg.forge.patch_unet``, as the WebUI script
calls it.  Modes, timed interleaved step by step (median of ``--repeats`` after ``--warmup``):

* ``cfg``      - SEG off;
* ``separate`` - the post-CFG cond-only pass (``batch_rows=False``);
* ``batched``  - the SEG rows in the main call, replayed through the host's batching;
* ``prefix``   - batched, with the blocks before the first blurred layer computed once for the SEG rows.

``--tiny`` is ``seg_step.py``'s: the tiny test UNets on the CPU, seconds, no meaningful numbers.
"""

from __future__ import annotations

import datetime
import math
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.seg_step import MODELS, Timer, prefix_error, step_arguments
from lib_seg.core.params import SegParams
from lib_seg.forge import adapter as forge
from tests.support import forge_host as host
from tests.support.unet import UNetModel

MODES = ("cfg", "separate", "batched", "prefix")
KIND = "forge"


def make_inputs(config, batch: int, side: int, device, dtype):
    g = torch.Generator(device=device).manual_seed(1)

    def entry():
        conds = {"c_crossattn": torch.randn(batch, 77, config.context_dim, generator=g, device=device, dtype=dtype)}
        if config.adm_in_channels:
            conds["y"] = torch.randn(batch, config.adm_in_channels, generator=g, device=device, dtype=dtype)
        return [{"model_conds": conds, "strength": 1.0}]

    x = torch.randn(batch, 4, side // 8, side // 8, generator=g, device=device, dtype=dtype)
    return x, torch.full((batch,), 5.0, device=device, dtype=dtype), entry(), entry()


def processing(unet: UNetModel, mode: str, layers: str, sigma: float):
    p = host.make_processing(KIND, unet)
    params = SegParams(enabled=mode != "cfg", layers=layers, blur_sigma=sigma)
    forge.patch_unet(p, params, batch_rows=mode in ("batched", "prefix"), prefix_reuse=mode == "prefix")
    p.sampler.model_wrap_cfg.total_steps = 10**9
    return p


def step_ms(p, inputs) -> tuple[float, torch.Tensor]:
    x, sigma, cond, uncond = inputs
    with Timer(x.device) as timer:
        out = p.sampler.model_wrap_cfg(x, sigma, cond, uncond, 7.0)
    p.sd_model.forge_objects.unet.model.calls.clear()  # the imitation records every call's options
    return timer.ms, out


def main() -> None:
    cases = "sdxl:1024:1,sdxl:1024:4,sd15:512:1,sd15:512:4"
    args, device, dtype, card = step_arguments(__doc__.splitlines()[0], cases)
    sys.modules.update(host.host_modules(KIND))
    header = (
        f"Card: {card}; torch {torch.__version__}; {args.dtype}; {datetime.date.today().isoformat()}; "
        f"Forge-family adapter on the new-Forge host imitation; median of {args.repeats} steps"
    )
    print(header, flush=True)
    rows = [
        "| model | size | batch | layers | sigma | CFG ms | separate | batched | batched+prefix | "
        "UNet calls sep / batched | ‖prefix − separate‖ / ‖SEG effect‖ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in args.cases.split(","):
        name, side, batch = case.split(":")
        torch.manual_seed(0)
        with device:
            unet = UNetModel(MODELS[name]).to(dtype).eval()
        inputs = make_inputs(unet.config, int(batch), int(side), device, dtype)
        for layers in args.layers.split(","):
            for sigma_text in args.sigmas.split(","):
                sigma = math.inf if sigma_text == "inf" else float(sigma_text)
                ps = {mode: processing(unet, mode, layers, sigma) for mode in MODES}
                times, outs, calls = {mode: [] for mode in MODES}, {}, {}
                with torch.no_grad():
                    for mode in MODES:
                        for _ in range(args.warmup):
                            unet_rows = ps[mode].sd_model.forge_objects.unet.model.rows
                            unet_rows.clear()
                            _, outs[mode] = step_ms(ps[mode], inputs)
                            calls[mode] = len(unet_rows)
                    for _ in range(args.repeats):
                        for mode in MODES:
                            times[mode].append(step_ms(ps[mode], inputs)[0])
                base = statistics.median(times["cfg"])
                ratio = {mode: statistics.median(times[mode]) / base for mode in MODES}
                err = prefix_error(outs)
                row = (
                    f"| {name} | {side}² | {batch} | {layers} | {sigma_text} | {base:.1f} | "
                    f"{ratio['separate']:.2f}× | {ratio['batched']:.2f}× | {ratio['prefix']:.2f}× | "
                    f"{calls['separate']} / {calls['batched']} | "
                    f"{err:.1e} |"
                )
                rows.append(row)
                print(row, flush=True)
        del unet
        if device.type == "cuda":
            torch.cuda.empty_cache()
    table = "\n".join([header, "", *rows, ""])
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
