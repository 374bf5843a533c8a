"""jaxee: early-exit sampling for diffusion transformers in JAX/Flax."""
