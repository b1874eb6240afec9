"""Everything that touches containers, protocols and codecs."""
