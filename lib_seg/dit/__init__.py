"""SEG on diffusion transformers (Flux, Chroma, SD3/SD3.5): the host-independent core.

Pure torch, no host import: which image tokens a DiT block sees (:mod:`lib_seg.core.geometry`), which blocks SEG
blurs (:mod:`lib_seg.core.layers`) and the query blur itself, including the RoPE identity that lets a hook before
RoPE produce the exact post-RoPE blur (:mod:`.queries`).  Host adapters build on these.
"""
