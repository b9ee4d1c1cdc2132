"""The one error interop raises: a checkpoint jaxlm cannot load (or write) exactly."""


class InteropError(ValueError):
  """A checkpoint jaxlm cannot load exactly; the message names what and the fix."""
