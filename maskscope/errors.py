"""Errors a user can cause. The CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """A problem with the user's input (spec, file, model name, prompt length): shown as one line, exit 2."""


def validation_message(error: object, source: str) -> str:
    """One line for a pydantic ValidationError: the source, the first failing field and its message."""
    errors = error.errors()  # type: ignore[attr-defined]
    first = errors[0]
    where = ".".join(str(x) for x in first["loc"]) or "(top level)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    message = " ".join(str(first["msg"]).removeprefix("Value error, ").split())
    return f"{source}: field '{where}': {message}{more}"
