"""The package's own exceptions: every expected failure is one of these, with a message
that names the bad value, so the CLI can print one line instead of a traceback."""


class SbertSaeError(Exception):
    """Base class of every error sbert-sae raises on purpose."""


class ConfigError(SbertSaeError, ValueError):
    """A configuration value is impossible (k > n_latents, negative sizes, ...)."""


class InputError(SbertSaeError, ValueError):
    """A tensor or text handed to the API has the wrong shape, dtype or values."""


class DatasetError(SbertSaeError, ValueError):
    """A dataset, split, column or row cannot be used."""


class ModelLoadError(SbertSaeError, OSError):
    """A saved SAE or a base model cannot be loaded safely."""


class OutputDirError(SbertSaeError, OSError):
    """The output folder holds another run, is locked, or cannot be written."""


class ResumeError(SbertSaeError, ValueError):
    """`--resume` cannot continue the run found in the output folder."""


class HubError(SbertSaeError, OSError):
    """A push to or a read from the Hub failed (the message says which repo, why, and what to do)."""
