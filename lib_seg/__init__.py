"""Smoothed Energy Guidance core: pure torch, no WebUI import.

Host adapters live in ``lib_seg.a1111`` and ``lib_seg.forge``; they import their host lazily,
so importing this package never touches ``modules``, ``ldm``, ``sgm``, ``ldm_patched`` or ``backend``.
"""
