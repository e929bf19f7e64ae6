"""The one exception type users see.

Every message names the file, key, size or value that is wrong and says what would be right,
so a ComfyUI user can fix the input without reading a traceback.
"""


class BitDanceError(ValueError):
    """A user-facing error: bad file, bad key, bad size, bad argument."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise BitDanceError(message)

