"""Diffusion processes, losses and samplers (ADM, EDM, SiT/REPA interpolants) and guidance."""
from .gaussian import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, get_named_beta_schedule, min_snr_weight  # noqa: F401
from .respace import SpacedDiffusion, create_diffusion, space_timesteps  # noqa: F401
from .edm import EDMPrecond, edm_loss, edm_loss_from_output  # noqa: F401
from .edm_sampling import edm_sampler, heun_sampler, karras_sigmas  # noqa: F401
from .guidance import ClassifierFreeGuidance, cfg_combine, forward_with_cfg, in_guidance_interval, interval_scale, power_cosine_scale  # noqa: F401
from .transport import GVPPath, LinearPath, Transport, VPPath, create_transport, make_path  # noqa: F401
from .ode import integrate_ode, sample_ode  # noqa: F401
from .sde import sample_sde  # noqa: F401
from .likelihood import ode_likelihood, prior_logp  # noqa: F401
from .repa import projection_loss, repa_euler_maruyama_sampler, repa_euler_sampler, repa_to_sit_model, repa_training_losses, sit_to_repa_model  # noqa: F401
