"""KDiffusionSampler as A1111 calls a sampler function (sample(): x * sigmas[0], initialize(p)
sets model_wrap_cfg.p and step, eta/sigmas passed when the function's signature has them)."""

import inspect

from modules import sd_samplers_common, shared


class KDiffusionSampler:
    def __init__(self, funcname, sd_model, options=None):
        self.func = funcname
        self.model_wrap_cfg = sd_model.make_cfg_denoiser()
        self.config = None

    def callback_state(self, d):
        shared.state.sampling_step = d["i"]

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        sigmas = p.sd_model.get_sigmas(steps or p.steps)
        x = x * sigmas[0]
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.step = 0
        kw = {}
        params = inspect.signature(self.func).parameters
        if "sigmas" in params:
            kw["sigmas"] = sigmas
        if "eta" in params:
            kw["eta"] = p.eta if p.eta is not None else 1.0
        extra_args = {"cond": conditioning, "image_cond": image_conditioning, "uncond": unconditional_conditioning,
                      "cond_scale": p.cfg_scale, "s_min_uncond": 0.0}
        try:
            return self.func(self.model_wrap_cfg, x, extra_args=extra_args, disable=False, callback=self.callback_state, **kw)
        except sd_samplers_common.InterruptedException:
            return x
