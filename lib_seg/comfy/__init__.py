"""ComfyUI: the SEG node (:mod:`.nodes`) and its host translation (:mod:`.adapter`), on the patcher family's pass."""
