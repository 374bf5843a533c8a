"""`python -m jaxee.main`: the old spelling of `jaxee-train` (`jaxee/cli/train.py`).

The training library lives in `jaxee/train/` (`jaxee.train.launch.train_and_evaluate`).
"""
if __name__ == "__main__":
  from jaxee.cli import train  # pylint: disable=g-import-not-at-top
  train.run()
