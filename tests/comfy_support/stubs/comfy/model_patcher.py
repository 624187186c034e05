"""comfy.model_patcher stand-in: a ModelPatcher that holds a module, patches and wrappers."""

import copy

import torch


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.size = size
        self.patches: dict = {}
        self.backup: dict = {}
        self.model_options: dict = {"transformer_options": {}}
        self.wrappers: dict = {}
        self.additional_models: dict = {}
        self.weight_wrappers: dict = {}
        self.loaded_to = None

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.backup = self.backup
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {k: {kk: list(vv) for kk, vv in v.items()} for k, v in self.wrappers.items()}
        n.additional_models = dict(self.additional_models)
        n.weight_wrappers = dict(self.weight_wrappers)
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        sd = self.model.state_dict()
        added = []
        for k, v in patches.items():
            if k in sd:
                self.patches.setdefault(k, []).append((strength_patch, v, strength_model, None, None))
                added.append(k)
        return added

    def add_wrapper_with_key(self, wrapper_type, key, fn):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(fn)

    def set_additional_models(self, key, models):
        self.additional_models[key] = models

    def add_weight_wrapper(self, name, function):
        self.weight_wrappers[name] = function

    def model_state_dict(self, filter_prefix=None):
        sd = self.model.state_dict()
        return {k: v for k, v in sd.items() if filter_prefix is None or k.startswith(filter_prefix)}

    def get_key_patches(self, filter_prefix=None):
        return {k: [(v, lambda a, **kw: a)] + self.patches.get(k, []) for k, v in self.model_state_dict(filter_prefix).items()}

    def model_load(self, device):
        self.loaded_to = device
        self.model.to(device)

    def model_size(self):
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def get_model_object(self, name):
        return getattr(self.model, name)
