"""The one exception type users see: the CLI prints its message as one line."""


class MeshaccelError(Exception):
    """A failure with a message that says what is wrong and, where possible, how to fix it."""


def one_line(text: str) -> str:
    """text with line breaks and other unprintable characters escaped as Python does
    ("\\n", "\\x00"): for messages that quote a value as it was given."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
