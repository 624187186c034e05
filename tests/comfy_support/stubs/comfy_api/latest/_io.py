"""V3 `io` stand-in: the same constructor signatures as ComfyUI 0.3.64 for what the SPO nodes
use; `Schema.get_v1_info` gives the V1 view (as ComfyUI serves /object_info) for the tests."""

from dataclasses import dataclass
from enum import Enum


def _prune(d):
    return {k: v for k, v in d.items() if v is not None}


class Input:
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, extra_dict=None):
        self.id, self.display_name, self.optional, self.tooltip, self.lazy = id, display_name, optional, tooltip, lazy

    def as_dict(self):
        return _prune({"display_name": self.display_name, "tooltip": self.tooltip, "lazy": self.lazy})

    def get_io_type(self):
        return self.io_type


class WidgetInput(Input):
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                 socketless=None, widget_type=None, force_input=None, extra_dict=None):
        super().__init__(id, display_name, optional, tooltip, lazy)
        self.default, self.force_input = default, force_input

    def as_dict(self):
        return super().as_dict() | _prune({"default": self.default, "forceInput": self.force_input})


class Output:
    def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, is_output_list


def _type(io_type, input_cls=Input):
    class T:
        pass

    class In(input_cls):
        pass

    class Out(Output):
        pass

    In.io_type = Out.io_type = io_type
    T.io_type, T.Input, T.Output = io_type, In, Out
    return T


def Custom(io_type):
    return _type(io_type)


class Int:
    io_type = "INT"

    class Input(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, min=None,
                     max=None, step=None, control_after_generate=None, display_mode=None, socketless=None, force_input=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.extra = _prune({"min": min, "max": max, "step": step, "control_after_generate": control_after_generate})

        io_type = "INT"

        def as_dict(self):
            return super().as_dict() | self.extra

    Output = _type("INT").Output


class Float:
    io_type = "FLOAT"

    class Input(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, min=None,
                     max=None, step=None, round=None, display_mode=None, socketless=None, force_input=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.extra = _prune({"min": min, "max": max, "step": step, "round": round})

        io_type = "FLOAT"

        def as_dict(self):
            return super().as_dict() | self.extra

    Output = _type("FLOAT").Output


class String:
    io_type = "STRING"

    class Input(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, multiline=False,
                     placeholder=None, default=None, dynamic_prompts=None, socketless=None, force_input=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.multiline = multiline

        io_type = "STRING"

        def as_dict(self):
            return super().as_dict() | _prune({"multiline": self.multiline or None})

    Output = _type("STRING").Output


class Boolean:
    io_type = "BOOLEAN"

    class Input(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     label_on=None, label_off=None, socketless=None, force_input=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)

        io_type = "BOOLEAN"

    Output = _type("BOOLEAN").Output


class Combo:
    io_type = "COMBO"

    class Input(WidgetInput):
        def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     control_after_generate=None, upload=None, image_folder=None, remote=None, socketless=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless)
            self.options = options

        io_type = "COMBO"

        def get_io_type(self):
            return self.options


Model, Clip, Vae, Image, Mask, Latent = (_type(t) for t in ("MODEL", "CLIP", "VAE", "IMAGE", "MASK", "LATENT"))
Conditioning, Sampler, Sigmas, Noise, Guider = (_type(t) for t in ("CONDITIONING", "SAMPLER", "SIGMAS", "NOISE", "GUIDER"))


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"


class HiddenHolder:
    def __init__(self, unique_id=None):
        self.unique_id = unique_id


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = None
    outputs: list = None
    hidden: list = None
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False

    def get_v1_info(self):
        inputs = {"required": {}}
        for i in self.inputs or []:
            inputs.setdefault("optional" if i.optional else "required", {})[i.id] = (i.get_io_type(), i.as_dict())
        for h in self.hidden or []:
            inputs.setdefault("hidden", {})[h.name] = (h.value,)
        return inputs


class NodeOutput:
    def __init__(self, *args, ui=None, expand=None, block_execution=None):
        self.args, self.ui = args, ui

    @property
    def result(self):
        return self.args if self.args else None


class ComfyNode:
    """Like the real one: classmethods define_schema/execute; V1 attributes derived from the schema."""

    hidden = None

    @classmethod
    def GET_SCHEMA(cls):
        return cls.define_schema()

    @classmethod
    def INPUT_TYPES(cls):
        return cls.define_schema().get_v1_info()

    @classmethod
    def PREPARE_CLASS_CLONE(cls, hidden_inputs):
        clone = type(cls.__name__, (cls,), {})
        clone.hidden = HiddenHolder(hidden_inputs.get("UNIQUE_ID"))
        return clone
