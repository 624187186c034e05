"""Stand-in for comfy.k_diffusion.sampling: the seeded noise source of ComfyUI's ancestral
samplers (a torch.Generator on the latent's device seeded with the sampler seed; one standard
normal draw of the latent's shape per step)."""

import torch


def default_noise_sampler(x, seed=None):
    generator = torch.Generator(device=x.device).manual_seed(seed) if seed is not None else None

    def draw(sigma, sigma_next):
        return torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)

    return draw
