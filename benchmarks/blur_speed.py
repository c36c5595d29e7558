"""Time SEG's query blur: our operator blur vs the official dense 2D depthwise conv.

    python -m benchmarks.blur_speed                 # CPU, the sizes of the core issue
    python -m benchmarks.blur_speed --device cuda --dtype float16
    python -m benchmarks.blur_speed --tiny          # CPU smoke run of the script (small maps, 2 repeats)

Not a test: prints median milliseconds per call for each map size.  "ours" is what
``blur_queries`` picks; "axis" forces the two axis products, "grid" the single N x N product
(``lib_seg.core.blur.use_grid_operator`` chooses between them).  Each size also checks ``blur_queries``
against the dense convolution in float64 (an assertion).  ``--tiny`` changes only the defaults of the
sizes, channels and repeats (and uses one CPU thread), so that a test runs every function of the script
in seconds.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from lib_seg.core import blur
from lib_seg.core.blur import blur_queries, gaussian_kernel_1d, kernel_size


def forced(grid: bool):
    """``blur_queries`` with the grid-operator choice fixed."""

    def run(q: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
        original = blur.use_grid_operator
        blur.use_grid_operator = lambda *_: grid
        try:
            return blur_queries(q, height, width, sigma)
        finally:
            blur.use_grid_operator = original

    return run


def dense_conv_blur(q: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """The official SEG-SDXL approach: reflect pad, then one k x k depthwise conv2d."""
    batch, _, channels = q.shape
    size = kernel_size(sigma, min(height, width))
    k1 = gaussian_kernel_1d(sigma, size).to(q.device, q.dtype)
    k2 = torch.outer(k1, k1).expand(channels, 1, size, size)
    img = q.transpose(1, 2).reshape(batch, channels, height, width)
    img = F.pad(img, [size // 2] * 4, mode="reflect")
    return F.conv2d(img, k2, groups=channels).reshape(batch, channels, -1).transpose(1, 2)


def separable_conv_blur(q: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """Two 1D depthwise convs (what a straightforward separable port would do)."""
    batch, _, channels = q.shape
    size = kernel_size(sigma, min(height, width))
    k1 = gaussian_kernel_1d(sigma, size).to(q.device, q.dtype)
    img = q.transpose(1, 2).reshape(batch, channels, height, width)
    img = F.pad(img, [size // 2] * 4, mode="reflect")
    img = F.conv2d(img, k1.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)
    img = F.conv2d(img, k1.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    return img.reshape(batch, channels, -1).transpose(1, 2)


def median_ms(fn, repeats: int, device: torch.device, calls: int = 10) -> float:
    """Median over ``repeats`` of the mean time of ``calls`` back-to-back calls (as a step issues them)."""
    times = []
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000 / calls)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--sigma", type=float, default=10.0)
    parser.add_argument("--channels", type=int, default=None, help="default 1280 (--tiny: 64)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="default 20 (--tiny: 2)")
    parser.add_argument("--sides", default=None, help="default 32,64 (--tiny: 8,13: square, odd)")
    parser.add_argument("--tiny", action="store_true", help="smoke run of the script: small maps, few repeats")
    args = parser.parse_args()
    defaults = {"channels": 64, "repeats": 2, "sides": "8,13"} if args.tiny else {}
    for key, value in {"channels": 1280, "repeats": 20, "sides": "32,64", **defaults}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.tiny and device.type == "cpu":  # small maps: threads only add overhead on a busy shared CPU
        torch.set_num_threads(1)
    print(
        f"device={device} dtype={args.dtype} sigma={args.sigma} C={args.channels} B={args.batch} "
        f"torch={torch.__version__} threads={torch.get_num_threads()}"
    )
    print(
        f"{'map':>7} {'ours ms':>8} {'axis ms':>8} {'grid ms':>8} {'separable conv ms':>18} "
        f"{'dense 2D conv ms':>17} {'dense/ours':>10}"
    )
    for side in map(int, args.sides.split(",")):
        q = torch.randn(args.batch, side * side, args.channels, device=device, dtype=dtype)
        functions = [blur_queries, forced(False), forced(True), separable_conv_blur, dense_conv_blur]
        if side * side > 4096:  # the N x N operator would not fit a sensible cache
            functions[2] = None
        ours, axis, grid, sep, dense = (
            median_ms(partial(fn, q, side, side, args.sigma), args.repeats, device) if fn else math.nan
            for fn in functions
        )
        ref = dense_conv_blur(q.double(), side, side, args.sigma)
        err = float((blur_queries(q, side, side, args.sigma).double() - ref).norm() / ref.norm())
        assert math.isfinite(err) and err < 1e-2, err
        print(
            f"{side:>3}x{side:<3} {ours:>8.3f} {axis:>8.3f} {grid:>8.3f} {sep:>18.3f} {dense:>17.3f} "
            f"{dense / ours:>9.1f}x   rel.err {err:.1e}"
        )


if __name__ == "__main__":
    main()
