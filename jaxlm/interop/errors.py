"""The one error interop raises: a checkpoint jaxlm cannot load (or write) exactly."""


class InteropError(ValueError):
  """A checkpoint jaxlm cannot load exactly; the message names what and the fix."""


def refuse(what: str, fields: dict) -> None:
  """InteropError naming the model fields (name -> True where the config sets it so) that `what`
  lacks."""
  bad = sorted(k for k, v in fields.items() if v)
  if bad:
    raise InteropError(f"{what} has no model fields {bad} as this config sets them")
