"""Errors that users see. Each names the file, sample or key at fault and what is wrong with it."""


class OgnetError(Exception):
    """Base class of every error ognet raises on purpose."""


class DataError(OgnetError, ValueError):
    """A point file, a data set folder or a file name is missing or malformed."""


class ShardError(OgnetError, ValueError):
    """A shard or shard index is missing, truncated, corrupt or disagrees with its index."""


class ConfigError(OgnetError, ValueError):
    """A config key is unknown, ill-typed or has an impossible value."""
