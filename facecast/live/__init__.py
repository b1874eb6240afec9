"""The live plane: source -> newest-frame slots -> engine -> sink, rate control, the probe."""
