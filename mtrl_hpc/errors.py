"""The one line a refusal quotes from the error behind it: the project reports a failure in one line that says
what is wrong and how to fix it, and an OSError, HDF5 or OmegaConf message can run to many lines or be empty."""

MAX_CHARS = 200


def short_error(e: BaseException) -> str:
    """The first line of an exception's message (at most MAX_CHARS characters), or its type's name when the
    message is empty."""
    text = str(e).strip()
    return text.splitlines()[0][:MAX_CHARS] if text else type(e).__name__
