"""Per-step cost of SEG on a GPU: CFG only vs the SEG strategies of the A1111 adapter.

    python -m benchmarks.seg_step --out docs/benchmarks.md        # on a CUDA machine
    python -m benchmarks.seg_step --tiny                          # CPU smoke run of the script, no numbers

The UNets are tests/support/unet.py built with the real SD1.5 and SDXL configurations (their parameter
counts equal the released models': 859.5 M and 2567.5 M) with random fp16 weights; the CFG denoiser
is the v1.10.1 imitation in tests/support/a1111_host.py; the SEG code under test is lib_seg.a1111
(the adapter the WebUI script uses), in four modes:

* ``cfg``      - SEG off (attached but disabled: also checks bit-identity with no extension);
* ``separate`` - one extra UNet call on the cond rows per step;
* ``batched``  - the SEG rows inside the main call;
* ``prefix``   - batched, with the blocks before the first blurred layer computed once;
* ``noblur``   - ``prefix`` with the finite-sigma blur replaced by the identity (finite sigma only):
  ``(prefix - noblur) / prefix`` is the blur's share of the real step, overlap included.

Each mode is timed over whole denoiser calls (one sampling step) with CUDA events: warm-up, then the
median of ``--repeats``.  Ratios are step time over the ``cfg`` step measured in the same run.

``--tiny`` runs the same code on the CPU in seconds (the tiny SD1/SDXL test UNets at 64², batch 2, float32,
one warm-up and two steps), so that a test can run the script: its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from lib_seg.a1111 import adapter as a1111
from lib_seg.core.blur import blur_queries
from lib_seg.core.params import SegParams
from lib_seg.unet import hooks as unet_hooks
from tests.support.a1111_host import CFGDenoiser, DictWithShape, FakeSDModel
from tests.support.unet import SD15, SDXL, TINY_SD1, TINY_SDXL, UNetModel

MODELS = {"sdxl": SDXL, "sd15": SD15, "tiny-sdxl": TINY_SDXL, "tiny-sd1": TINY_SD1}
MODES = ("cfg", "separate", "batched", "prefix")


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> FakeSDModel:
    torch.manual_seed(0)
    with device:
        unet = UNetModel(MODELS[name])
    return FakeSDModel(unet.to(dtype).eval())


def make_inputs(model: FakeSDModel, batch: int, side: int, device, dtype) -> dict:
    cfg = model.model.diffusion_model.config
    g = torch.Generator(device=device).manual_seed(1)

    def text():
        crossattn = torch.randn(batch, 77, cfg.context_dim, generator=g, device=device, dtype=dtype)
        if cfg.adm_in_channels:
            vector = torch.randn(batch, cfg.adm_in_channels, generator=g, device=device, dtype=dtype)
            return DictWithShape({"crossattn": crossattn, "vector": vector})
        return crossattn

    latent = side // 8
    return dict(
        x=torch.randn(batch, 4, latent, latent, generator=g, device=device, dtype=dtype),
        sigma=torch.full((batch,), 5.0, device=device, dtype=dtype),
        uncond=text(),
        cond=([[(i, 1.0)] for i in range(batch)], text()),
        cond_scale=7.0,
        image_cond=torch.zeros(batch, 5, 1, 1, device=device, dtype=dtype),
    )


@contextmanager
def no_blur():
    """The hooks still run and copy rows; only the blur itself is skipped."""
    original = unet_hooks.blur_queries
    unet_hooks.blur_queries = lambda q, height, width, sigma: q
    try:
        yield
    finally:
        unet_hooks.blur_queries = original


def seg_run(mode: str, layers: str, sigma: float) -> a1111.SegRun:
    if mode == "cfg":
        return a1111.SegRun(SegParams())
    params = SegParams(enabled=True, layers=layers, blur_sigma=sigma)
    return a1111.SegRun(params, batch_rows=mode != "separate", prefix_reuse=mode in ("prefix", "noblur"))


class Timer:
    """CUDA events on a GPU, the wall clock elsewhere (CPU smoke runs only)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1000


def time_steps(denoiser: CFGDenoiser, inputs: dict, warmup: int, repeats: int) -> tuple[float, torch.Tensor]:
    times = []
    out = None
    for i in range(warmup + repeats):
        with Timer(inputs["x"].device) as timer:
            out = denoiser(**inputs)
        if i >= warmup:
            times.append(timer.ms)
    return statistics.median(times), out


def blur_ms(model: FakeSDModel, inputs: dict, layers: str, sigma: float, repeats: int) -> float:
    """GPU time of the finite-sigma blurs of one step: the real q shapes, blurred alone."""
    unet = model.model.diffusion_model
    shapes = []
    target = a1111.query_target(model)  # the adapter resolves layers against a target, not a raw UNet
    chosen = a1111.SegRun(SegParams(enabled=True, layers=layers)).layers_for(target)
    grids = {}
    handles = [
        unet.get_submodule(f"{name}").register_forward_pre_hook(
            lambda m, a, n=name: grids.__setitem__(n, tuple(a[0].shape[-2:]))
        )
        for name in {unet_hooks.spatial_transformer_name(k) for k in chosen}
    ]
    cond_rows = inputs["x"].shape[0]
    with torch.no_grad():
        denoiser = CFGDenoiser(model)
        denoiser(**inputs)
    for h in handles:
        h.remove()
    for key in chosen:
        h, w = grids[unet_hooks.spatial_transformer_name(key)]
        channels = unet.get_submodule(unet_hooks.attn1_name(key)).to_q.out_features
        shapes.append((cond_rows, h, w, channels))
    qs = [torch.randn(b, h * w, c, device=inputs["x"].device, dtype=inputs["x"].dtype) for b, h, w, c in shapes]

    def run():
        for q, (_, h, w, _) in zip(qs, shapes, strict=True):
            blur_queries(q, h, w, sigma)

    for _ in range(3):
        run()
    with Timer(inputs["x"].device) as timer:
        for _ in range(repeats):
            run()
    return timer.ms / repeats


def prefix_error(outs: dict) -> float:
    """‖prefix − separate‖ / ‖SEG effect‖ (the effect: separate − cfg)."""
    effect = (outs["separate"].float() - outs["cfg"].float()).norm()
    return float((outs["prefix"].float() - outs["separate"].float()).norm() / effect)


# What --tiny changes, unless given on the command line: tiny UNets at 64² (batch 2, so that the
# prefix reuse really runs), the CPU in float32, the fewest steps that still take a median.
TINY_CASES = "tiny-sd1:64:2,tiny-sdxl:64:2"
TINY = {"device": "cpu", "dtype": "float32", "warmup": 1, "repeats": 2}
REAL = {"device": "cuda", "dtype": "float16", "warmup": 3, "repeats": 20}


def step_arguments(description: str, cases: str) -> tuple[argparse.Namespace, torch.device, torch.dtype, str]:
    """The step benchmarks' command line: parsed arguments, device, dtype and the card's name."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cases", default=None, help=f"model:side:batch, comma-separated (default {cases})")
    parser.add_argument("--layers", default="middle,all")
    parser.add_argument("--sigmas", default="inf,10")
    parser.add_argument("--dtype", default=None, help="default float16 (--tiny: float32)")
    parser.add_argument("--device", default=None, help="default cuda (--tiny: cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="default 3 (--tiny: 1)")
    parser.add_argument("--repeats", type=int, default=None, help="default 20 (--tiny: 2)")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--tiny", action="store_true", help=f"CPU smoke run of the script: {TINY_CASES}, no numbers")
    args = parser.parse_args()
    defaults = {**TINY, "cases": TINY_CASES} if args.tiny else {**REAL, "cases": cases}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.tiny and device.type == "cpu":  # tiny tensors: threads only add overhead on a busy shared CPU
        torch.set_num_threads(1)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run, not a benchmark)"
    return args, device, dtype, card


def main() -> None:
    cases = "sdxl:1024:1,sdxl:1024:4,sd15:512:1,sd15:512:4,sd15:768:1,sd15:768:4"
    args, device, dtype, card = step_arguments(__doc__.splitlines()[0], cases)
    header = (
        f"Card: {card}; torch {torch.__version__}; {args.dtype}; "
        f"{datetime.date.today().isoformat()}; warm-up {args.warmup}, median of {args.repeats} steps"
    )
    print(header, flush=True)
    rows = [
        "| model | size | batch | layers | sigma | CFG ms | separate | batched | batched+prefix | "
        "blur % of step (alone / in step) | peak MiB CFG / sep / batched / prefix | off bit-identical | "
        "‖prefix − separate‖ / ‖SEG effect‖ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    models: dict[str, FakeSDModel] = {}
    for case in args.cases.split(","):
        name, side, batch = case.split(":")
        side, batch = int(side), int(batch)
        if name not in models:
            models.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            models[name] = build_model(name, device, dtype)
        model = models[name]
        inputs = make_inputs(model, batch, side, device, dtype)
        with torch.no_grad():
            plain_out = CFGDenoiser(model)(**inputs)
        for layers in args.layers.split(","):
            for sigma_text in args.sigmas.split(","):
                sigma = math.inf if sigma_text == "inf" else float(sigma_text)
                modes = MODES if math.isinf(sigma) else (*MODES, "noblur")
                times, peaks, outs = {mode: [] for mode in modes}, {}, {}
                denoisers = {}
                for mode in modes:
                    denoisers[mode] = CFGDenoiser(model, callbacks=[a1111.on_cfg_denoiser])
                    denoisers[mode].total_steps = 10**9
                    a1111.attach(denoisers[mode], seg_run(mode, layers, sigma))
                with torch.no_grad():
                    for mode in modes:  # warm-up and peak memory, one mode at a time
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                        with no_blur() if mode == "noblur" else nullcontext():
                            _, outs[mode] = time_steps(denoisers[mode], inputs, args.warmup, 1)
                        peaks[mode] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
                    for _ in range(args.repeats):  # modes interleaved, so clock drift hits all alike
                        for mode in modes:
                            with no_blur() if mode == "noblur" else nullcontext():
                                times[mode].append(time_steps(denoisers[mode], inputs, 0, 1)[0])
                for mode in modes:
                    times[mode] = statistics.median(times[mode])
                    a1111.detach(denoisers[mode])
                base = times["cfg"]
                share = "-"
                if not math.isinf(sigma):
                    alone = 100 * blur_ms(model, inputs, layers, sigma, 20) / times["prefix"]
                    in_step = 100 * (times["prefix"] - times["noblur"]) / times["prefix"]
                    share = f"{alone:.2f} / {in_step:.2f}"
                identical = torch.equal(outs["cfg"], plain_out)
                err = prefix_error(outs)
                row = (
                    f"| {name} | {side}² | {batch} | {layers} | {sigma_text} | {base:.1f} | "
                    f"{times['separate'] / base:.2f}× | {times['batched'] / base:.2f}× | "
                    f"{times['prefix'] / base:.2f}× | {share} | "
                    f"{peaks['cfg']:.0f} / {peaks['separate']:.0f} / {peaks['batched']:.0f} / {peaks['prefix']:.0f} | "
                    f"{'yes' if identical else 'NO'} | {err:.1e} |"
                )
                rows.append(row)
                print(row, flush=True)
    table = "\n".join([header, "", *rows, ""])
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
