"""jaxee: early-exit and block-skipping samplers for diffusion transformers in JAX/Flax.

    from jaxee import models, convert
    model = models.create('dit_xl_2')
    params = convert.from_torch('DiT-XL-2-256x256.pt', 'dit_xl_2')
    samples = jaxee.sample(model, params, rng, num=8, sampler='ddim', steps=50, labels=y,
                           guidance=1.5, plan=jaxee.exits.ase.schedule('D3-DiT'))
"""
from jaxee import convert, models
from jaxee.sampling import sample

__all__ = ["convert", "models", "sample"]
__version__ = "0.1.0"
