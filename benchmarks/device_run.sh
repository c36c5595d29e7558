#!/usr/bin/env bash
# One device call for this session's benchmarks (run from the repository root on the GPU machine; results under $OUT):
#   1. the ComfyUI node's batched path on Flux.1 and Z-Image at released size (bf16, 1024², CFG 1 and 4);
#   2. the same cases through the Forge adapter plus Klein 4B (the redesign's step must not move these ratios);
#   3. the A1111 and Forge-family UNet adapters on SDXL 1024² and SD1.5 512², batch 4.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/card.txt"
part=${1:-all}
if [ "$part" = all ] || [ "$part" = dit ]; then
  timeout 280 python -m benchmarks.dit_step --host comfyui --repeats 5 --warmup 2 \
    --cases flux:1:1:inf,flux:1:4:inf,zimage:1:1:inf,zimage:1:4:inf --out "$OUT/comfyui-dit.md" 2>&1 | tail -12
  timeout 280 python -m benchmarks.dit_step --repeats 5 --warmup 2 \
    --cases flux:1:1:inf,flux:1:4:inf,klein4b:1:1:inf,zimage:1:1:inf,zimage:1:4:inf --out "$OUT/forge-dit.md" 2>&1 | tail -12
fi
if [ "$part" = all ] || [ "$part" = unet ]; then
  timeout 280 python -m benchmarks.seg_step --cases sdxl:1024:4,sd15:512:4 --out "$OUT/a1111-unet.md" 2>&1 | tail -14
  timeout 200 python -m benchmarks.forge_step --cases sdxl:1024:4,sd15:512:4 --out "$OUT/forge-unet.md" 2>&1 | tail -14
fi
