"""The AUTOMATIC1111 1.9-1.10 adapter (UNets and SD3): attaches SEG to the sampler's CFGDenoiser."""
