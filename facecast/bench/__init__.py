"""`facecast bench ...`: swap, live, capacity, faces, models, webrtc, handoff, quality."""
