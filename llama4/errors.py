"""The one exception type for bad user input: configs, checkpoints, requests."""


class HerdInputError(ValueError):
    """Input that herd refuses; the message names the field, the value and what is allowed."""
