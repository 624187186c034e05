from collections import namedtuple

SamplerData = namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])


class InterruptedException(BaseException):
    pass


def samples_to_images_tensor(sample, approximation=None, model=None):
    """[-1, 1] images: the full VAE decode of the model (A1111: model.decode_first_stage)."""
    return model.decode_first_stage(sample)
