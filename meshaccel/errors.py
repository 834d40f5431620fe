"""The one exception type users see: the CLI prints its message as one line."""


class MeshaccelError(Exception):
    """A failure with a message that says what is wrong and, where possible, how to fix it."""
