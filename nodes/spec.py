"""One declarative definition per node, turned into a V3 `io.ComfyNode` class where the
running ComfyUI has `comfy_api.latest`, or a classic V1 class otherwise.

A node is a `NodeSpec`: its id, display name, inputs (`In`), outputs (`Out`) and a plain
function `run(**inputs) -> tuple | Result`. The same spec yields the same sockets, widgets,
category and behaviour in both forms, so the pack works on ComfyUI versions before and after
the V3 schema, and the contract tests can check both through a stand-in `comfy_api`.
Set `SPO_COMFY_NODE_API=v1` to force the classic form.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

CATEGORY = "SPO"

# socket types that V3 has a class for; every other type is io.Custom(type)
_V3_TYPES = {
    "MODEL": "Model", "CLIP": "Clip", "VAE": "Vae", "IMAGE": "Image", "MASK": "Mask", "LATENT": "Latent",
    "CONDITIONING": "Conditioning", "SAMPLER": "Sampler", "SIGMAS": "Sigmas", "NOISE": "Noise", "GUIDER": "Guider",
    "INT": "Int", "FLOAT": "Float", "STRING": "String", "BOOLEAN": "Boolean", "COMBO": "Combo",
}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


@dataclass
class In:
    """One input: a socket (MODEL, IMAGE, SPO_SCORER...) or a widget (INT, FLOAT, STRING, BOOLEAN, COMBO)."""

    name: str
    type: str
    tooltip: str | None = None
    optional: bool = False
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    round: float | None = None
    multiline: bool = False
    options: Sequence[str] | Callable[[], Sequence[str]] | None = None  # COMBO: a list or a function giving it
    control_after_generate: bool | None = None
    force_input: bool | None = None

    def combo_options(self) -> list[str]:
        opts = self.options() if callable(self.options) else self.options
        return list(opts or [])


@dataclass
class Out:
    type: str
    name: str
    tooltip: str | None = None
    is_list: bool = False


@dataclass
class Result:
    """What a node returns: the output values and, optionally, a UI dict ({"text": [...], "images": [...]})."""

    values: tuple
    ui: dict | None = None


@dataclass
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: list[In]
    outputs: list[Out]
    run: Callable[..., Any]  # run(**inputs) -> tuple | Result; gets node_id= if wants_node_id
    category: str = CATEGORY
    output_node: bool = False
    not_idempotent: bool = False
    experimental: bool = False
    wants_node_id: bool = False  # pass the executing node's id (for ProgressBar / set_progress)
    fingerprint: Callable[..., Any] | None = None  # IS_CHANGED / fingerprint_inputs
    extra: dict = field(default_factory=dict)

    def call(self, kwargs: dict, node_id: str | None = None) -> Result:
        kwargs = dict(kwargs)
        kwargs.pop("unique_id", None)
        if self.wants_node_id:
            kwargs["node_id"] = node_id
        out = self.run(**kwargs)
        result = out if isinstance(out, Result) else Result(tuple(out))
        if len(result.values) != len(self.outputs):
            raise RuntimeError(f"{self.node_id} returned {len(result.values)} values for {len(self.outputs)} outputs")
        return result


# -- V1 ----------------------------------------------------------------------------------


def v1_input(i: In) -> tuple:
    opts: dict[str, Any] = {}
    for key in ("default", "min", "max", "step", "round", "tooltip"):
        value = getattr(i, key)
        if value is not None:
            opts[key] = value
    if i.multiline:
        opts["multiline"] = True
    if i.control_after_generate is not None:
        opts["control_after_generate"] = i.control_after_generate
    if i.force_input:
        opts["forceInput"] = True
    if i.type == "COMBO":
        return (i.combo_options(), opts)
    return (i.type, opts)


def v1_input_types(spec: NodeSpec) -> dict:
    types: dict[str, dict] = {"required": {}}
    for i in spec.inputs:
        types.setdefault("optional" if i.optional else "required", {})[i.name] = v1_input(i)
    if spec.wants_node_id:
        types["hidden"] = {"unique_id": ("UNIQUE_ID",)}
    return types


def build_v1(spec: NodeSpec) -> type:
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        return v1_input_types(spec)

    def execute(self, **kwargs):
        result = spec.call(kwargs, kwargs.get("unique_id"))
        if result.ui is not None:
            return {"ui": result.ui, "result": result.values}
        return result.values

    attrs = {
        "INPUT_TYPES": classmethod(INPUT_TYPES),
        "RETURN_TYPES": tuple(o.type for o in spec.outputs),
        "RETURN_NAMES": tuple(o.name for o in spec.outputs),
        "OUTPUT_TOOLTIPS": tuple(o.tooltip or "" for o in spec.outputs),
        "OUTPUT_IS_LIST": tuple(o.is_list for o in spec.outputs),
        "FUNCTION": "execute",
        "CATEGORY": spec.category,
        "DESCRIPTION": spec.description,
        "OUTPUT_NODE": spec.output_node,
        "EXPERIMENTAL": spec.experimental,
        "execute": execute,
        "SPO_SPEC": spec,
    }
    if spec.not_idempotent:
        attrs["NOT_IDEMPOTENT"] = True
    if spec.fingerprint is not None:
        attrs["IS_CHANGED"] = classmethod(lambda cls, **kw: spec.fingerprint(**kw))
    return type(spec.node_id, (), attrs)


# -- V3 ----------------------------------------------------------------------------------

_custom_types: dict[str, Any] = {}


def _v3_type(io, type_name: str):
    name = _V3_TYPES.get(type_name)
    if name is not None:
        return getattr(io, name)
    if type_name not in _custom_types:
        _custom_types[type_name] = io.Custom(type_name)
    return _custom_types[type_name]


def v3_input(io, i: In):
    common = dict(optional=i.optional, tooltip=i.tooltip)
    t = i.type
    if t == "COMBO":
        return io.Combo.Input(i.name, options=i.combo_options(), default=i.default, **common)
    if t == "INT":
        return io.Int.Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step,
                            control_after_generate=i.control_after_generate, force_input=i.force_input, **common)
    if t == "FLOAT":
        return io.Float.Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step, round=i.round,
                              force_input=i.force_input, **common)
    if t == "STRING":
        return io.String.Input(i.name, default=i.default, multiline=i.multiline, force_input=i.force_input, **common)
    if t == "BOOLEAN":
        return io.Boolean.Input(i.name, default=i.default, force_input=i.force_input, **common)
    return _v3_type(io, t).Input(i.name, **common)


def build_v3(spec: NodeSpec, io) -> type:
    def define_schema(cls):
        return io.Schema(
            node_id=spec.node_id,
            display_name=spec.display_name,
            category=spec.category,
            description=spec.description,
            inputs=[v3_input(io, i) for i in spec.inputs],
            outputs=[_v3_type(io, o.type).Output(display_name=o.name, tooltip=o.tooltip, is_output_list=o.is_list)
                     for o in spec.outputs],
            hidden=[io.Hidden.unique_id] if spec.wants_node_id else None,
            is_output_node=spec.output_node,
            not_idempotent=spec.not_idempotent,
            is_experimental=spec.experimental,
        )

    def execute(cls, **kwargs):
        hidden = getattr(cls, "hidden", None)
        node_id = getattr(hidden, "unique_id", None) if hidden is not None else None
        result = spec.call(kwargs, node_id)
        return io.NodeOutput(*result.values, ui=result.ui)

    attrs = {"define_schema": classmethod(define_schema), "execute": classmethod(execute), "SPO_SPEC": spec}
    if spec.fingerprint is not None:
        attrs["fingerprint_inputs"] = classmethod(lambda cls, **kw: spec.fingerprint(**kw))
    return type(spec.node_id, (io.ComfyNode,), attrs)


# -- choosing the form -------------------------------------------------------------------


def v3_io():
    """`comfy_api.latest.io` if this ComfyUI has it (and V1 is not forced), else None."""
    if os.environ.get("SPO_COMFY_NODE_API", "").lower() == "v1":
        return None
    try:
        from comfy_api.latest import io
    except ImportError:
        return None
    except Exception as exc:  # a broken optional dependency of comfy_api (e.g. av): use V1
        log.warning("SPO nodes: comfy_api.latest failed to import (%s); using classic V1 nodes", exc)
        return None
    return io


def build_node(spec: NodeSpec, io=None) -> type:
    return build_v3(spec, io) if io is not None else build_v1(spec)


def build_mappings(specs: Sequence[NodeSpec]) -> tuple[dict[str, type], dict[str, str]]:
    io = v3_io()
    classes, names = {}, {}
    for spec in specs:
        if spec.node_id in classes:
            raise RuntimeError(f"two SPO nodes share the id {spec.node_id}")
        classes[spec.node_id] = build_node(spec, io)
        names[spec.node_id] = spec.display_name
    return classes, names
