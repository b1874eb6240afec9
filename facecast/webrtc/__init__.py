"""WebRTC: the browser page's sessions, WHIP ingest and WHEP playback, whip-listen input."""
