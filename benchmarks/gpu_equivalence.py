"""Is batched (and prefix-reusing) SEG the same function as the separate pass on a GPU?

    python benchmarks/gpu_equivalence.py

For float32 (TF32 off) and float16 it prints, for the real SDXL and SD1.5 architectures with random
weights: the SEG effect ‖separate − cfg‖, the host's own batch-size noise ‖cfg − cfg with cond/uncond
in separate calls‖, and ‖batched − separate‖, ‖prefix − separate‖ relative to both.  Equality to
rounding means the last two are of the order of that noise, far below the effect.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.seg_step import build_model, make_inputs, seg_run
from lib_seg import a1111
from tests.support.a1111_host import CFGDenoiser


def output(model, inputs, mode: str, layers: str, batch_cond_uncond: bool = True) -> torch.Tensor:
    denoiser = CFGDenoiser(model, callbacks=[a1111.on_cfg_denoiser], batch_cond_uncond=batch_cond_uncond)
    a1111.attach(denoiser, seg_run(mode, layers, 10.0))
    with torch.no_grad():
        out = denoiser(**inputs).double()
    a1111.detach(denoiser)
    return out


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    print("| model | dtype | layers | ‖effect‖ | noise floor | batched−separate | prefix−separate | (÷ effect) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, side in (("sdxl", 1024), ("sd15", 512)):
        for dtype in (torch.float32, torch.float16):
            model = build_model(name, device, dtype)
            inputs = make_inputs(model, 2, side, device, dtype)
            for layers in ("middle", "all"):
                cfg = output(model, inputs, "cfg", layers)
                split = output(model, inputs, "cfg", layers, batch_cond_uncond=False)
                separate = output(model, inputs, "separate", layers)
                batched = output(model, inputs, "batched", layers)
                prefix = output(model, inputs, "prefix", layers)
                effect = (separate - cfg).norm()
                noise = (cfg - split).norm()
                b, p = (batched - separate).norm(), (prefix - separate).norm()
                print(
                    f"| {name} | {str(dtype)[6:]} | {layers} | {effect:.3e} | {noise:.3e} | {b:.3e} | {p:.3e} | "
                    f"{b / effect:.1e} / {p / effect:.1e} |",
                    flush=True,
                )
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
