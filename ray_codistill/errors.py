"""The errors a user sees, in one light module, so the CLI can tell them apart without importing
torch or Ray. Exit status 2: refused before anything started; 1: the run or query failed."""


class ConfigError(ValueError):
    """An invalid config value or key; the message names the key and what is allowed."""


class DataError(ValueError):
    """A dataset that cannot be loaded; the one-line message names `data.root` and the path."""


class ModelError(ValueError):
    """An unknown model name or a model that does not fit the data."""


class RunError(RuntimeError):
    """A replica's worker group failed, or the cluster cannot host the experiment."""


class ReportError(ValueError):
    """No result to report, or a result folder that cannot be read."""


class StatsError(RuntimeError):
    """The cluster cannot be reached, or it runs no experiment of that name."""


class ClusterError(RuntimeError):
    """A Ray cluster that cannot be reached at the given address, or lacks what a command needs."""


class NonFiniteError(FloatingPointError):
    """A replica's loss, logits or weights became NaN or infinite: it stops publishing and its
    worker group restarts from the last checkpoint (raised inside a worker)."""
