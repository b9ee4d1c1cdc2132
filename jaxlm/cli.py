"""What jaxlm's config-driven command lines share: `--config.<field>` overrides checked up front."""

import sys

from absl import app, flags

from jaxlm.config import ConfigError, check_overrides


def run(main, prog: str) -> None:
  """absl's app.run(main), after checking that every --config.x.y override names a real field
  (absl would otherwise fail on a typo with a long trace), exiting with `prog: <message>`."""
  def parse(argv):
    try:
      check_overrides(argv)
    except ConfigError as e:
      sys.exit(f"{prog}: {e}")
    return flags.FLAGS(argv)
  app.run(main, flags_parser=parse)
