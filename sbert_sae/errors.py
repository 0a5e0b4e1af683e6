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


class SettingsChangedError(ResumeError):
    """The run found in the output folder was made with other settings than the ones given.

    `changes` holds each difference as `(key, recorded, given)`, the key as the run records
    it ("training_args.seed", "config.k", "data"); the message is `template` with the changes
    in place of "{changes}". `names` words a key as the caller's user wrote the setting: the
    CLI's option ("--seed"), a recipe's key ("training: seed"); other keys stay as recorded."""

    def __init__(self, template: str, changes: list[tuple[str, object, object]], names: dict[str, str] | None = None):
        self.template, self.changes, self.names = template, list(changes), dict(names or {})
        super().__init__(template.replace("{changes}", self.describe()))

    def describe(self) -> str:
        """The changes, "; "-separated: `key: recorded -> given`, or `--seed recorded -> given`."""
        parts = []
        for key, old, new in self.changes:
            name = self.names.get(key, key)
            parts.append(f"{name}{'' if name.startswith('--') else ':'} {old!r} -> {new!r}")
        return "; ".join(parts)

    def naming(self, names: dict[str, str], prefix: str = "", values=None) -> "SettingsChangedError":
        """The same error with its keys named by `names` and `prefix` before its message;
        `values(key, value)`, if given, words a recorded value as the user gave it."""
        changes = self.changes if values is None else [(k, values(k, a), values(k, b)) for k, a, b in self.changes]
        return SettingsChangedError(prefix + self.template, changes, {**self.names, **names})


class ReusedRunSettingsError(SettingsChangedError, InputError):
    """A finished run a command would reuse as its own (a sweep's grid point) was made with
    other settings than the ones given (`changes`, as `SettingsChangedError`'s)."""

    def naming(self, names: dict[str, str], prefix: str = "", values=None) -> "ReusedRunSettingsError":
        named = super().naming(names, prefix, values)
        return ReusedRunSettingsError(named.template, named.changes, named.names)


class HubError(SbertSaeError, OSError):
    """A push to or a read from the Hub failed (the message says which repo, why, and what to do)."""
