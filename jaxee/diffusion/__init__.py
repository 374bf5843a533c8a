"""Diffusion schedules, Gaussian diffusion math, samplers and classifier-free guidance.

See `docs/ARCHITECTURE.md` for the denoiser contract the samplers follow.
"""
from jaxee.diffusion.gaussian import p_mean_variance
from jaxee.diffusion.gaussian import q_sample
from jaxee.diffusion.gaussian import sd_eps_loss
from jaxee.diffusion.gaussian import training_losses
from jaxee.diffusion.gaussian import vp_eps_loss
from jaxee.diffusion.guidance import dit_cfg
from jaxee.diffusion.guidance import make_denoiser
from jaxee.diffusion.guidance import no_guidance
from jaxee.diffusion.guidance import uvit_cfg
from jaxee.diffusion.samplers import SAMPLERS
from jaxee.diffusion.samplers import Sampler
from jaxee.diffusion.samplers import get_sampler
from jaxee.diffusion.samplers import nfe_times
from jaxee.diffusion.schedules import DiscreteDiffusion
from jaxee.diffusion.schedules import SDDiscreteSchedule
from jaxee.diffusion.schedules import VPSDE
from jaxee.diffusion.schedules import create_dit_diffusion
from jaxee.diffusion.schedules import get_schedule
from jaxee.diffusion.schedules import space_timesteps
