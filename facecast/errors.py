"""Errors a user can act on. The CLI turns each into one line and exit code 2."""


class FacecastError(Exception):
    """Base class: the message is meant for the user and names what to fix."""


class MediaError(FacecastError):
    """A file or stream cannot be read or written (missing, corrupt, unsupported)."""


class NoFaceError(FacecastError):
    """An image that must show a face (the source photo) shows none."""


class ModelError(FacecastError):
    """A model file is missing or does not match the registry."""
