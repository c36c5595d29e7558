"""WebUI install hook.

The WebUI runs this file at start-up.  SEG needs nothing beyond what every supported host already
ships (torch and gradio), so on purpose it installs nothing: no pip call can break a user's torch.
"""
