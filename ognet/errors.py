"""Exceptions ognet raises on purpose. Each error names the file, sample or key at fault and what is
wrong with it."""


class OgnetError(Exception):
    """Base class of every error ognet raises on purpose."""


class DataError(OgnetError, ValueError):
    """A point file, a data set folder or a file name is missing or malformed."""


class ShardError(OgnetError, ValueError):
    """A shard or shard index is missing, truncated, corrupt or disagrees with its index."""


class ConfigError(OgnetError, ValueError):
    """A config key is unknown, ill-typed or has an impossible value."""


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "run the same command again"


class Preempted(Exception):
    """Not an error: a preemption signal asked for a checkpoint, which is written. Commands exit with
    PREEMPTED_EXIT_CODE, and running the same command again resumes from it."""
