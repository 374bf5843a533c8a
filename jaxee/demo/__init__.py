"""The end-to-end demo: every jaxee method trained and sampled on real digits, on a CPU.

    python -m jaxee.demo --out runs/demo [--seed 0] [--scale micro]   # `make demo`
    python -m jaxee.demo.report A/report.json B/report.json           # claims of two runs

`main(argv=None) -> int` is the command line and `run(out, seed, scale, log) -> report` the
whole pipeline (`pipeline.py`, whose docstring describes the stages). Modules:

* `setup`: the demo scales, the stage training configs and the digits;
* `methods`: the training stages of one backbone through the library's entry points, and the
  sampling variants rebuilt from their exports (DeeDiff θ calibration included);
* `evaluate`: sampling, scoring and alternating wall-clock timing of the variants;
* `report`: `report.json` / `report.md`, grids and plots, and the comparison of two runs.

`import jaxee.demo` loads only `pipeline` and `setup`; the other modules are imported when `run`
needs them.
"""
from jaxee.demo.pipeline import MARKER, fit_metric, machine_info, main, run

__all__ = ["MARKER", "fit_metric", "machine_info", "main", "run"]
