"""`jaxee-demo`: the end-to-end demo on bundled data (`python -m jaxee.cli.demo` is the same).

    jaxee-demo --out runs/demo

The demo itself (`jaxee.demo.run`, its stages and report) lives in `jaxee.demo`; this module only
forwards the command line to `jaxee.demo.main(argv) -> int` (see `docs/DEMO.md`).
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
  """Runs the demo's command line on `argv` (default `sys.argv[1:]`); returns the exit status."""
  from jaxee import demo  # pylint: disable=g-import-not-at-top
  return demo.main(argv)


def run() -> None:
  """The `jaxee-demo` entry point: `main(sys.argv[1:])`, exiting with its status."""
  sys.argv[0] = "jaxee-demo"  # argparse's usage line names the command, not cli/demo.py
  sys.exit(main())


if __name__ == "__main__":
  run()
