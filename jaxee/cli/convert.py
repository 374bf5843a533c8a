"""`jaxee-convert`: convert a PyTorch checkpoint into a jaxee Orbax checkpoint.

`python -m jaxee.cli.convert` and `python -m jaxee.convert` are the same command.

    jaxee-convert --arch dit_xl_2 --src DiT-XL-2-256x256.pt --out ckpt/dit_xl_2_256
    jaxee-convert --arch uvit_h2_imagenet256 --src imagenet256_uvit_huge.pth --out ckpt/h2
    jaxee-convert --arch vae --src sd-vae-ft-ema/diffusion_pytorch_model.bin --out ckpt/vae
    jaxee-convert --arch dit --set input_size=8 --set hidden_size=64 --set depth=3 \
        --set num_heads=4 --set num_classes=10 --src dit_tiny.pt --out /tmp/dit_tiny

The output directory holds `params/` (Orbax) and `config.json` (the model config, so
`jaxee.convert.load_converted(DIR)` rebuilds the same model). Nothing is written unless the whole
checkpoint converted cleanly. Exit status 2 on a bad checkpoint, with every problem listed.
A checkpoint with NaN/Inf weights is refused, naming the tensors, unless `--allow-nonfinite`
(then it is converted with a warning naming them). `--overwrite` replaces only a previous
converted checkpoint (see `jaxee.convert.orbax_io.save_converted`), never another directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from jaxee import models
from jaxee import validation
from jaxee.convert import backbone_rules, orbax_io, torch_reader, vae_rules
from jaxee.convert.errors import CheckpointError
from jaxee.models import vae as vae_lib


def parse_overrides(items: list[str]) -> dict:
  """`key=value` pairs; values are parsed as JSON (numbers, true/false, null) or kept as text."""
  out = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"--set expects key=value, got {item!r}")
    key, value = item.split("=", 1)
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="jaxee-convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--arch", required=True,
                      help=f"'vae' (SD KL-f8, CompVis or diffusers layout, config inferred; "
                      f"--set layout=... scale_factor=...) or one of: {', '.join(models.list_archs())}")
  parser.add_argument("--src", required=True, help=".pt/.pth/.bin/.safetensors or U-ViT .ckpt dir")
  parser.add_argument("--out", required=True, help="output directory (must be new or empty)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="constructor override, original keyword names (repeatable)")
  parser.add_argument("--prefer", default="ema", choices=("ema", "model"),
                      help="which weights of a training checkpoint to convert")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing --out that is a converted checkpoint")
  parser.add_argument("--config-json", default=None, metavar="PATH",
                      help="U-Net archs: a diffusers config.json (e.g. beside the weights of a "
                           "downloaded model folder); --set overrides it")
  parser.add_argument("--allow-nonfinite", action="store_true",
                      help="convert even if some weights are NaN/Inf (warns, naming them)")
  args = parser.parse_args(argv)
  try:
    state = torch_reader.load_state_dict(args.src, prefer=args.prefer)
    bad = validation.nonfinite_tensors(state)
    if bad:
      names = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
      if not args.allow_nonfinite:
        raise ValueError(f"{args.src}: {len(bad)} tensor(s) hold NaN/Inf: {names}; samples "
                         f"from it would be NaN (pass --allow-nonfinite to convert anyway)")
      print(f"warning: {args.src}: {len(bad)} tensor(s) hold NaN/Inf: {names}", file=sys.stderr)
    if args.arch == "vae":
      overrides = parse_overrides(args.set)
      layout = overrides.pop("layout", "auto")
      config, params = vae_rules.load_vae(state, layout=layout)
      if overrides:
        config = dataclasses.replace(config, **overrides)
      model = vae_lib.AutoencoderKL(config)
    else:
      overrides = parse_overrides(args.set)
      if args.config_json:
        overrides = {**models.unet_config_json(args.config_json, args.arch), **overrides}
      model = models.create(args.arch, **overrides)
      params = backbone_rules.params_from_state_dict(state, model, source=os.fspath(args.src))
    out = orbax_io.save_converted(
        args.out, model, params, overwrite=args.overwrite,
        extra={"arch": args.arch, "source": os.path.abspath(args.src), "prefer": args.prefer})
  except (CheckpointError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # the output location: missing parent, read-only, full
    print(f"error: cannot write {args.out}: {e.strerror or e} ({e.filename}); choose a "
          f"writable --out", file=sys.stderr)
    return 2
  n = backbone_rules.count_params(params)
  print(json.dumps({"out": str(out), "arch": args.arch, "params": n}))
  return 0


def run() -> None:
  """The `jaxee-convert` entry point: `main(sys.argv[1:])`, exiting with its status."""
  sys.exit(main())


if __name__ == "__main__":
  run()
