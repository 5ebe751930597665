"""The one exception type for bad user input (configs, checkpoints, requests) and its check."""


class HerdInputError(ValueError):
    """Input that herd refuses; the message names the field, the value and what is allowed."""


def need(ok: bool, field: str, value, allowed: str, where: str = "") -> None:
    """Raise HerdInputError("<where>: <field>=<value> is invalid; allowed: <allowed>") unless ok."""
    if not ok:
        prefix = f"{where}: " if where else ""
        raise HerdInputError(f"{prefix}{field}={value!r} is invalid; allowed: {allowed}")
