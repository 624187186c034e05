all_samplers = []
all_samplers_map = {}
samplers = []
samplers_map = {}


def set_samplers():
    global samplers
    samplers = list(all_samplers)
    samplers_map.clear()
    for s in all_samplers:
        samplers_map[s.name.lower()] = s.name
        for a in s.aliases:
            samplers_map[a.lower()] = s.name


def create_sampler(name, model):
    config = all_samplers_map[name]
    sampler = config.constructor(model)
    sampler.config = config
    return sampler
