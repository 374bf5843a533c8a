"""`python -m jaxee.demo --out runs/demo [--seed 0] [--scale micro]` (see `jaxee.demo`)."""
from jaxee.demo import main

if __name__ == "__main__":
  raise SystemExit(main())
