"""Leaving and entering mmbridge: runs exported as stock transformers models, published LLaVAs imported as runs."""


class InteropError(ValueError):
    """A run that cannot be exported, or a folder that cannot be imported, as it stands; the message names the
    recipe key or config field in the way and what to change."""
