"""The errors a user fixes, one class per kind. Every layer raises these with a message that
names what to fix (the config key, the flag, the file); `ddpo` prints such an error as one line,
`ddpo: error: <message>`, and exits with status 2. Any other exception is a bug, and keeps its
traceback."""


class UserError(Exception):
    """A problem the user fixes; the message names the config key, flag or file to change."""


class ConfigError(UserError, ValueError):
    """A bad config value or command-line flag; the message names it (e.g. `train.clip_range`)."""


class DeviceError(UserError):
    """A device the config or a flag names is not on the machine that would use it."""


class AddressError(UserError):
    """A Ray cluster address that is malformed or does not answer."""


class PlacementError(UserError):
    """The actors cannot be placed on this cluster; the message names the config keys."""


class ModelLoadError(UserError):
    """The model could not be loaded (`model.pretrained`, its files, its family)."""


class RewardError(UserError):
    """A reward could not be built, reached or returned something unusable; the message names it."""


class RunError(UserError):
    """The run stopped on a failure outside the code (an actor lost for good, a full disk); the
    message says where it can go on from."""


def one_line(err: BaseException) -> str:
    """The first line of an error from a library, for a message of our own (at most 200 characters)."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]
