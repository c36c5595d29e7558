"""Smoothed Energy Guidance for Stable Diffusion WebUIs.

``core`` and ``dit`` are pure torch (UNet and DiT math, specs, validation); ``webui`` holds the
host-independent WebUI parts (controls, infotext, API arguments, X/Y/Z); ``a1111`` and ``forge`` are
the host adapters.  Nothing here imports a host at import time (``modules``, ``ldm``, ``sgm``,
``ldm_patched``, ``backend``): the adapters are handed host objects or look host modules up when run.
"""
