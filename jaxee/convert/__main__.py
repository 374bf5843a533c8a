"""`python -m jaxee.convert`: the same command as `jaxee-convert` (`jaxee/cli/convert.py`)."""
from jaxee.cli import convert
convert.run()
