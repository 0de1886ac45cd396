"""Exceptions a user can cause. Each message says what went wrong and what to do.

Every exception raised on bad input derives from :class:`LavpError`, so the CLI and the app
can show it as one line (CLI) or an ``st.error`` box (app) instead of a traceback.
"""

from __future__ import annotations


class LavpError(Exception):
    """Base class for errors caused by the user's input or environment."""


class ConfigError(LavpError, ValueError):
    """An unknown name (architecture, preset, loss, dataset) or an invalid setting."""


class DatasetError(LavpError):
    """A dataset that cannot be found or read."""


class ImageError(LavpError, ValueError):
    """A file or buffer that is not a usable image."""


class CheckpointError(LavpError):
    """A checkpoint that is missing, unreadable, or does not fit the architecture."""


class ModelError(LavpError, ValueError):
    """A model whose output or input does not fit what a routine needs."""


class UnsupportedModelError(ModelError):
    """A model an analytical attack cannot handle (the message names the layer and the reason)."""


class ProxyError(LavpError, ValueError):
    """A proxy that cannot be computed for this model, image, label or loss."""


class StoreError(LavpError):
    """A results database that is corrupt, foreign, from a newer schema, or not writable."""
