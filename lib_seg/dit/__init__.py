"""SEG on diffusion transformers (every family of :mod:`lib_seg.dit.families`): the host-independent core.

Pure torch, no host import: which image tokens a DiT block sees (:mod:`lib_seg.core.geometry`), which blocks SEG
blurs (:mod:`lib_seg.core.layers`) and the query blur itself, including the RoPE identity that lets a hook before
RoPE produce the exact post-RoPE blur (:mod:`.queries`).  Host adapters build on these.
"""
