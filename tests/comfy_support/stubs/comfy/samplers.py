"""comfy.samplers stand-in: KSAMPLER keeps its function and options (as the real one)."""


class Sampler:
    def max_denoise(self, model_wrap, sigmas):
        return True


class KSAMPLER(Sampler):
    def __init__(self, sampler_function, extra_options={}, inpaint_options={}):
        self.sampler_function = sampler_function
        self.extra_options = extra_options
        self.inpaint_options = inpaint_options
