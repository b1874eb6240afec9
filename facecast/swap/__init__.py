"""Face replacement: warp, colour, blend."""
