"""Pure-torch SEG core for UNets (blur, token grids, layer specs, params, guidance, hooks) and the
UNet/DiT target interface the adapters use."""
