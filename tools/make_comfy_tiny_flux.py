"""Write a tiny random Flux.1 (schnell layout) diffusion model that ComfyUI's ``UNETLoader`` loads, for the e2e
tests of the SEG node on a transformer (``tests/e2e/test_comfyui.py``).  Not a test; run with ComfyUI's Python:

    cd <comfyui base> && venv/bin/python <repo>/tools/make_comfy_tiny_flux.py \
        models/diffusion_models/flux-tiny-random.safetensors

The model is built from ComfyUI's own class (``comfy.ldm.flux.model.Flux``) and written with its own key names, so
ComfyUI's detection (``comfy/model_detection.py``: Flux when ``double_blocks.0.img_attn.norm.key_norm.scale`` and
``img_in.weight`` exist; no ``guidance_in`` = schnell) reads the sizes back from the weights: hidden 256 (2 heads
of 128 over the axes 16, 56, 56), 2 double and 2 single blocks, 16 latent channels, and a text width of 768 with
a 768 pooled vector, so an SD1.5 checkpoint's CLIP-L can condition it.  Random weights (seed 0): images mean
nothing, the tests compare them with each other.
"""

from __future__ import annotations

import sys

import torch


def build(seed: int = 0) -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    model = Flux(
        in_channels=16,
        out_channels=16,
        vec_in_dim=768,
        context_in_dim=768,
        hidden_size=256,
        mlp_ratio=4.0,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        axes_dim=[16, 56, 56],
        theta=10000,
        patch_size=2,
        qkv_bias=True,
        guidance_embed=False,
        txt_ids_dims=[],
        operations=comfy.ops.disable_weight_init,
        dtype=torch.float32,
    )
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(".scale"):  # RMSNorm scales: 1, as a trained model's are near
            state[name] = torch.ones_like(tensor)
        else:
            state[name] = torch.randn(tensor.shape, generator=g) * (0.02 if tensor.dim() > 1 else 0.01)
    return state


if __name__ == "__main__":
    from safetensors.torch import save_file

    save_file(build(), sys.argv[1])
    print("wrote", sys.argv[1])
