"""The console scripts (`[project.scripts]`) and their `python -m jaxee.cli.X` modules.

Every declared `jaxee-*` script must resolve to a callable, live in `jaxee.cli`, and its module
must answer `--help` with status 0 (argument parsing only: nothing is compiled or run).
"""
import importlib.metadata
import os
import pathlib
import subprocess
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _declared():
  """`[project.scripts]` of pyproject.toml (read as text: `tomllib` needs Python 3.11)."""
  text = (ROOT / "pyproject.toml").read_text()
  section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S).group(1)
  return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, re.M))


DECLARED = _declared()
NAMES = ("sample", "train", "convert", "fid", "demo", "search")


def _installed():
  return {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")
          if ep.name.startswith("jaxee-")}


def test_declared_scripts_are_the_cli_modules():
  assert sorted(DECLARED) == sorted(f"jaxee-{n}" for n in NAMES)
  for name, target in DECLARED.items():
    assert target == f"jaxee.cli.{name.removeprefix('jaxee-')}:run", (name, target)


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_console_script_entry_point_resolves(name):
  installed = _installed()
  assert name in installed, f"{name} not installed: pip install -e . again"
  ep = installed[name]
  assert ep.value == DECLARED[name]
  assert callable(ep.load())


@pytest.mark.parametrize("name", NAMES)
def test_help_exits_zero(name):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", f"jaxee.cli.{name}", "--help"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"jaxee-{name}" in proc.stdout + proc.stderr
