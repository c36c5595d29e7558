"""The Forge-family adapter (classic Forge, Forge 2.x, reForge): SEG as a post-CFG function on the UNet patcher."""
