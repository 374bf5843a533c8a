"""The command-line programs (console scripts declared in `pyproject.toml`).

| console script | module (`python -m ...` is the same) | what it runs |
|---|---|---|
| `jaxee-sample` | `jaxee.cli.sample` | `jaxee.sharded.run.run_sampling` (resumable shards) |
| `jaxee-train`  | `jaxee.cli.train`  | `jaxee.train.launch.train_and_evaluate` |
| `jaxee-convert`| `jaxee.cli.convert`| PyTorch → Orbax conversion (`jaxee.convert`) |
| `jaxee-fid`    | `jaxee.cli.fid`    | `jaxee.eval.fid_shards.fid_from_shards` |
| `jaxee-demo`   | `jaxee.cli.demo`   | `jaxee.demo.run` |
| `jaxee-search` | `jaxee.cli.search` | `jaxee.exits.search.search_plan` (plan under a budget) |

Each module has `main(argv) -> int` (the exit status; tests call it) and `run()`, the console
script's entry point, which reads `sys.argv` and exits with `main`'s status. Only argument
handling lives here; the work is done by the library modules named above. The old spellings
`python -m jaxee.main`, `python -m jaxee.convert` and `python -m jaxee.eval.fid_shards` still
work (they forward here).
"""

import sys

HELP_FLAGS = frozenset({"-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml"})


def show_doc_in_absl_help(doc: str) -> None:
  """Makes absl's `--help` print `doc`: absl reads `__main__.__doc__`, which is a console
  script's generated stub (no docstring) or a forwarding module such as `jaxee.main`."""
  main = sys.modules.get("__main__")
  if main is not None:
    main.__doc__ = doc
