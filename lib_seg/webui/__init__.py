"""Host-independent WebUI parts: gradio controls and settings, infotext, positional API arguments, X/Y/Z axes."""
