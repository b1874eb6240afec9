"""facecast: real-time face swap for live video, images and video files, offline on a CPU."""

__version__ = "0.1.0"
