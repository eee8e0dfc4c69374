"""Exceptions. Every message names the problem, where it is (file, field, key) and the fix."""


class StageStackError(Exception):
    """Base class for errors a user can act on."""


class ExpertFormatError(StageStackError):
    """An expert file is unreadable, has an unknown version, or its metadata is invalid."""


class CheckpointKeyError(StageStackError):
    """A checkpoint has missing, unexpected or mis-shaped keys."""

    def __init__(self, source: str, missing=(), unexpected=(), mis_shaped=()) -> None:
        self.missing, self.unexpected, self.mis_shaped = list(missing), list(unexpected), list(mis_shaped)
        lines = [f"{source}: the checkpoint does not match the expected layout."]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        for key, got, want in self.mis_shaped:
            lines.append(f"  mis-shaped key {key}: got {tuple(got)}, expected {tuple(want)}")
        lines.append("  Check that the file is the checkpoint format this importer reads.")
        super().__init__("\n".join(lines))


class IntegrityError(StageStackError):
    """A file's sha256 does not match the recorded one."""


class DeviceError(StageStackError):
    """A requested device or dtype is not available."""


class RegistryConfigError(StageStackError):
    """A registry config file (registry.yaml or a user file) is unreadable or invalid."""


class UnknownInstrumentError(StageStackError):
    """An instrument name that no plugin or registry config defines (or that is disabled)."""


class InstrumentConflictError(StageStackError):
    """Two plugins register the same instrument and no registry config says which one wins."""


class ExpertNotInstalledError(StageStackError):
    """No local file for an instrument's expert; the message says the command that gets it."""


class IncompatibleExpertError(StageStackError):
    """An expert is for another instrument, or uses a codec the other experts of a chain do not."""


class InputError(StageStackError):
    """User input (audio, tempo, duration, layers, output directory) that cannot be used as given."""


class ArrangementError(StageStackError):
    """An arrangement directory or manifest is inconsistent, or an operation names a layer it lacks."""


class TrainingConfigError(StageStackError):
    """A training config (YAML) is unreadable or invalid, or does not match the run it resumes."""
