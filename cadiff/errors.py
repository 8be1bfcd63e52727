"""Project exceptions: every user-facing failure names the offending path/key and the expected form."""


class CadiffError(Exception):
    """Base class of all cadiff errors; jobs turn these into one-line messages."""


class ConfigError(CadiffError):
    """A configuration key, value or combination is invalid."""


class DataError(CadiffError):
    """An input file, archive, shard or array is missing, malformed or of the wrong shape/dtype."""


class CheckpointError(CadiffError):
    """A checkpoint or export is missing, unreadable or from a different model/config."""


class ModelError(CadiffError):
    """A tensor given to a model has the wrong shape for its configuration."""


class DownloadError(DataError):
    """A remote file could not be fetched or failed its size/checksum check."""


class NoPhotonSignature(DataError):
    """A movie shows no usable mean-variance (shot-noise) line: processed, constant or too short to calibrate."""


class StorageError(CadiffError):
    """An object store (s3://, gs://) could not be reached, read or written."""
