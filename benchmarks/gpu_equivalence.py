"""Is batched (and prefix-reusing) SEG the same function as the separate pass on a GPU?

    python -m benchmarks.gpu_equivalence
    python -m benchmarks.gpu_equivalence --tiny       # CPU smoke run of the script (tiny UNets)

For float32 (TF32 off) and float16 it prints, for the real SDXL and SD1.5 architectures with random
weights: the SEG effect ‖separate − cfg‖, the host's own batch-size noise ‖cfg − cfg with cond/uncond
in separate calls‖, and ‖batched − separate‖, ‖prefix − separate‖ relative to both.  Equality to
rounding means the last two are of the order of that noise, far below the effect.  The second table does
the same for the Forge-family adapter (new-Forge host imitation; its noise floor: cond and uncond in
separate calls because the host's memory estimate says so).

``--tiny`` runs the same functions on the CPU in seconds: the tiny SD1/SDXL test UNets at 64², float32 and
bfloat16 (the CPU's half type; float16 UNets are slow there), so that a test can run the script.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import forge_step
from benchmarks.seg_step import build_model, make_inputs, seg_run
from lib_seg.a1111 import adapter as a1111
from tests.support import forge_host as host
from tests.support.a1111_host import CFGDenoiser

MODES = ("cfg", "separate", "batched", "prefix")
HEADER = (
    "| model | dtype | layers | ‖effect‖ | noise floor | batched−separate | prefix−separate | (÷ effect) |\n"
    "|---|---|---|---|---|---|---|---|"
)


def print_row(name: str, dtype: torch.dtype, layers: str, outs: dict, split: torch.Tensor) -> None:
    """One table row: the SEG effect, the host's split noise, and our two differences from separate."""
    effect, noise = (outs["separate"] - outs["cfg"]).norm(), (outs["cfg"] - split).norm()
    b, p = ((outs[mode] - outs["separate"]).norm() for mode in ("batched", "prefix"))
    print(
        f"| {name} | {str(dtype)[6:]} | {layers} | {effect:.3e} | {noise:.3e} | {b:.3e} | {p:.3e} | "
        f"{b / effect:.1e} / {p / effect:.1e} |",
        flush=True,
    )


def output(model, inputs, mode: str, layers: str, batch_cond_uncond: bool = True) -> torch.Tensor:
    denoiser = CFGDenoiser(model, callbacks=[a1111.on_cfg_denoiser], batch_cond_uncond=batch_cond_uncond)
    a1111.attach(denoiser, seg_run(mode, layers, 10.0))
    with torch.no_grad():
        out = denoiser(**inputs).double()
    a1111.detach(denoiser)
    return out


def forge_output(unet, inputs, mode: str, layers: str, split: bool = False) -> torch.Tensor:
    rows = inputs[0].shape[0]
    host.get_free_memory.free = int(1.5 * rows * 2**20) if split else 2**40  # one chunk per call if split
    p = forge_step.processing(unet, mode, layers, 10.0)
    with torch.no_grad():
        out = forge_step.step_ms(p, inputs)[1].double()
    host.get_free_memory.free = 2**40
    return out


# (model, side) cases and dtypes: the real architectures on the GPU, or --tiny's test UNets on the CPU
REAL = ((("sdxl", 1024), ("sd15", 512)), (torch.float32, torch.float16))
TINY = ((("tiny-sdxl", 64), ("tiny-sd1", 64)), (torch.float32, torch.bfloat16))


def free_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def forge_table(device: torch.device, cases=REAL[0], dtypes=REAL[1]) -> None:
    sys.modules.update(host.host_modules(forge_step.KIND))
    print("\n" + HEADER)
    for name, side in cases:
        for dtype in dtypes:
            unet = build_model(name, device, dtype).model.diffusion_model
            inputs = forge_step.make_inputs(unet.config, 2, side, device, dtype)
            for layers in ("middle", "all"):
                outs = {mode: forge_output(unet, inputs, mode, layers) for mode in MODES}
                print_row(name, dtype, layers, outs, forge_output(unet, inputs, "cfg", layers, split=True))
            del unet
            free_cache(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny UNets, float32 and bfloat16")
    tiny = parser.parse_args().tiny
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cases, dtypes = TINY if tiny else REAL
    device = torch.device("cpu" if tiny else "cuda")
    if tiny:
        torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a busy shared CPU
    card = "CPU (smoke run, not a GPU check)" if tiny else torch.cuda.get_device_name()
    print(f"{card}; torch {torch.__version__}")
    print(HEADER)
    for name, side in cases:
        for dtype in dtypes:
            model = build_model(name, device, dtype)
            inputs = make_inputs(model, 2, side, device, dtype)
            for layers in ("middle", "all"):
                outs = {mode: output(model, inputs, mode, layers) for mode in MODES}
                print_row(name, dtype, layers, outs, output(model, inputs, "cfg", layers, batch_cond_uncond=False))
            del model
            free_cache(device)
    forge_table(device, cases, dtypes)


if __name__ == "__main__":
    main()
