"""The package layout of project issue 11 (`docs/ARCHITECTURE.md`).

* inference never imports training code: no module under `jaxee/exits/`, `jaxee/models/`,
  `jaxee/sharded/`, `jaxee/diffusion/` nor `jaxee/sampling.py` / `jaxee/validation.py` imports
  `jaxee.train`, directly or through other jaxee modules (imports parsed with `ast`, function-level
  imports included);
* every objective lives in `jaxee/train/objectives/`, the demo in the `jaxee/demo/` package, and the
  modules they replaced are gone;
* no module is longer than 500 lines.
"""
import ast
import functools
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "jaxee"
INFERENCE = ("exits", "models", "sharded", "diffusion", "sampling.py", "validation.py")
MAX_LINES = 500


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _files(*names):
  for name in names:
    path = PKG / name
    if path.is_dir():
      yield from sorted(path.rglob("*.py"))
    elif path.exists():
      yield path


def _imports(path: pathlib.Path):
  """The absolute names of the modules `path` imports (at any depth, `from X import y` giving both
  `X` and `X.y`, since `y` may be a submodule)."""
  module = _module_name(path)
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      names.add(base)
      names.update(f"{base}.{alias.name}" for alias in node.names)
  return names


@functools.lru_cache(maxsize=None)
def _jaxee_graph():
  """Module name -> (path, jaxee modules it imports), over every module of the package."""
  paths = {_module_name(p): p for p in PKG.rglob("*.py")}
  graph = {}
  for name, path in paths.items():
    deps = set()
    for imported in _imports(path):
      # The module and the packages above it (importing `a.b.c` runs `a/__init__.py` first).
      parts = imported.split(".")
      deps.update(".".join(parts[:i]) for i in range(1, len(parts) + 1)
                  if ".".join(parts[:i]) in paths)
    graph[name] = (path, deps - {name})
  return graph


def _is_training(name: str) -> bool:
  return name == "jaxee.train" or name.startswith("jaxee.train.")


@pytest.mark.parametrize("path", list(_files(*INFERENCE)),
                         ids=lambda p: str(p.relative_to(PKG)))
def test_inference_never_imports_training_code(path):
  direct = sorted(n for n in _imports(path) if _is_training(n))
  assert not direct, f"{path.relative_to(ROOT)} imports {direct}"
  # ... nor through other jaxee modules (package `__init__`s on the way included).
  graph = _jaxee_graph()
  start = _module_name(path)
  chain = {start: None}
  todo = [start]
  while todo:
    name = todo.pop()
    for dep in sorted(graph.get(name, (None, set()))[1]):
      if dep in chain:
        continue
      chain[dep] = name
      if _is_training(dep):
        route = [dep]
        while chain[route[-1]] is not None:
          route.append(chain[route[-1]])
        pytest.fail(f"{start} reaches training code: {' <- '.join(route)}")
      todo.append(dep)


def test_the_inference_files_exist():
  names = {str(p.relative_to(PKG)) for p in _files(*INFERENCE)}
  for expected in ("sampling.py", "exits/plan.py", "models/backbone.py"):
    assert expected in names


def test_objectives_live_in_one_package():
  objectives = PKG / "train" / "objectives"
  for name in ("__init__", "diffusion", "ase", "duodiff", "deediff", "masks", "masks_teacher"):
    assert (objectives / f"{name}.py").exists(), name
  doc = ast.get_docstring(ast.parse((objectives / "__init__.py").read_text()))
  assert "loss_fn(params, batch, rng, *, train_state_extras) -> (loss, metrics)" in doc
  for old in ("losses.py", "train/objective.py", "train/deediff_loss.py", "train/masks_opt.py",
              "train/masks_teacher.py"):
    assert not (PKG / old).exists(), old


def test_demo_is_a_package():
  demo = PKG / "demo"
  for name in ("__init__", "__main__", "setup", "methods", "evaluate", "report"):
    assert (demo / f"{name}.py").exists(), name
  for old in ("demo.py", "demo_setup.py", "demo_methods.py", "demo_eval.py", "demo_report.py"):
    assert not (PKG / old).exists(), old


def test_modules_are_at_most_500_lines():
  long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py")
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_branching_on_the_model_family_in_exits_and_train():
  """Runners and objectives are written against the backbone contract (issue: no family code).

  Comparing a plan's recorded family with the model's (`plan.family != model.family`) is a
  generic check and allowed; comparing against a family name, or choosing by one, is not.
  """
  import re  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).resolve().parents[1] / "jaxee"
  forbidden = re.compile(r"""(==|!=)\s*["'](dit|uvit)["']|["'](dit|uvit)["']\s*(==|!=|if\b)|"""
                         r"""family\s+in\s+\(|isinstance\([^)]*\b(DiT|UViT)\b""")
  offenders = []
  for sub in ("exits", "train"):
    for path in sorted((root / sub).rglob("*.py")):
      for n, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("#", 1)[0]
        if forbidden.search(code):
          offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
  assert not offenders, "\n".join(offenders)
