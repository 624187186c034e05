"""A real ComfyUI checkout, loaded in this process, that runs API-format workflows.

Follows ComfyUI's own start-up order (comfyui.md §6.1): CPU flag before model_management,
the root `utils` package before `nodes`, the built-in extra nodes, then the pack through the
real `load_custom_node` (which must return True). Workflows run through
`execution.validate_prompt` and `execution.PromptExecutor`, inside the executor's
`torch.inference_mode()`, exactly as the server runs them. A progress hook like main.py's
records progress events and honours interrupts; `interrupt_after` presses Cancel after that
many progress updates.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid
from pathlib import Path

import torch

PACK_DIR = Path(__file__).resolve().parents[2]


class StubServer:
    """What PromptExecutor needs from the server."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages: list = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, level=logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]

    def clear(self):
        self.records.clear()


class ComfyHarness:
    def __init__(self, comfy_path: str, base_dir: Path, device: str = "cpu"):
        self.comfy_path = str(Path(comfy_path).resolve())
        self.base = Path(base_dir)
        self.device = device
        self.progress: list[tuple] = []
        self.interrupt_after: int | None = None
        self.log = LogCapture()
        self.pack_loaded = False

    # -- start-up ------------------------------------------------------------------------
    def start(self) -> "ComfyHarness":
        if self.comfy_path not in sys.path:
            sys.path.insert(0, self.comfy_path)
        import comfy.cli_args

        comfy.cli_args.args.cpu = self.device == "cpu"
        comfy.cli_args.args.preview_method = comfy.cli_args.LatentPreviewMethod.Latent2RGB
        import utils.extra_config  # noqa: F401 - before `nodes`, or `utils` resolves to comfy/utils.py
        import folder_paths

        for sub in ("output", "input", "temp"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(self.base / "output"))
        folder_paths.set_input_directory(str(self.base / "input"))
        folder_paths.set_temp_directory(str(self.base / "temp"))
        for folder in ("checkpoints", "loras", "diffusion_models", "vae", "text_encoders", "spo_scorers"):
            (self.base / "models" / folder).mkdir(parents=True, exist_ok=True)
        for folder in ("checkpoints", "loras", "diffusion_models", "vae", "text_encoders"):
            folder_paths.add_model_folder_path(folder, str(self.base / "models" / folder), is_default=True)
        folder_paths.add_model_folder_path("loras", str(self.base / "output" / "loras"))
        folder_paths.models_dir = str(self.base / "models")  # where the pack registers spo_scorers

        logging.getLogger().addHandler(self.log)
        logging.getLogger().setLevel(logging.INFO)
        import comfy.utils
        import nodes

        comfy.utils.set_progress_bar_global_hook(self._hook)
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        self.pack_loaded = asyncio.run(nodes.load_custom_node(str(PACK_DIR)))
        self.pack_module = str(PACK_DIR).replace(".", "_x_")  # the module name ComfyUI gives a pack folder
        self.captured: dict = {}
        register_test_nodes(self)
        return self

    def _hook(self, value, total, preview, prompt_id=None, node_id=None):
        import comfy.model_management
        from comfy_execution.utils import get_executing_context

        context = get_executing_context()
        if node_id is None and context is not None:
            node_id = context.node_id
        self.progress.append((node_id, value, total, preview is not None))
        if self.interrupt_after is not None and len(self.progress) >= self.interrupt_after:
            self.interrupt_after = None
            comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()

    # -- access ----------------------------------------------------------------------------
    @property
    def nodes(self):
        import nodes

        return nodes

    def node_class(self, name: str):
        return self.nodes.NODE_CLASS_MAPPINGS[name]

    def run(self, prompt: dict, expect_success: bool = True) -> dict:
        """Validate and execute an API-format workflow; returns {"success", "outputs", "messages", "error"}."""
        import execution

        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise AssertionError(f"workflow does not validate: {valid[1]} {valid[3]}")
        server = StubServer()
        ex = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC)
        ex.execute(prompt, prompt_id, {}, valid[2])
        errors = [d for e, d in ex.status_messages if e == "execution_error"]
        result = {
            "success": ex.success,
            "outputs": ex.history_result.get("outputs", {}) if getattr(ex, "history_result", None) else {},
            "messages": ex.status_messages,
            "error": errors[0] if errors else None,
            "executor": ex,
        }
        if expect_success and not ex.success:
            err = result["error"] or {}
            raise AssertionError(f"workflow failed: {err.get('exception_type')}: {err.get('exception_message')}\n"
                                 + "".join(err.get("traceback", [])))
        return result


# -- test-only nodes: tiny models into workflows, values out of them -------------------------------


def register_test_nodes(h: "ComfyHarness") -> None:
    import nodes

    class TinyModel:
        @classmethod
        def INPUT_TYPES(cls):  # noqa: N802
            return {"required": {"seed": ("INT", {"default": 0}), "sdxl": ("BOOLEAN", {"default": False})}}

        RETURN_TYPES, FUNCTION, CATEGORY = ("MODEL",), "make", "testing"

        def make(self, seed, sdxl):
            return (tiny_model(seed, sdxl),)

    class TinyVAE:
        @classmethod
        def INPUT_TYPES(cls):  # noqa: N802
            return {"required": {"seed": ("INT", {"default": 0})}}

        RETURN_TYPES, FUNCTION, CATEGORY = ("VAE",), "make", "testing"

        def make(self, seed):
            return (tiny_vae(seed),)

    class TinyCond:
        @classmethod
        def INPUT_TYPES(cls):  # noqa: N802
            return {"required": {"seed": ("INT", {"default": 0}), "sdxl": ("BOOLEAN", {"default": False})}}

        RETURN_TYPES, FUNCTION, CATEGORY = ("CONDITIONING",), "make", "testing"

        def make(self, seed, sdxl):
            return (tiny_cond(1, seed=seed, sdxl=sdxl),)

    class TinyCLIP:
        @classmethod
        def INPUT_TYPES(cls):  # noqa: N802
            return {"required": {"seed": ("INT", {"default": 0})}}

        RETURN_TYPES, FUNCTION, CATEGORY = ("CLIP",), "make", "testing"

        def make(self, seed):
            return (tiny_clip(seed),)

    class BrightnessScorer:
        """An SPO_SCORER whose scores spread widely (100 x mean brightness): SPO finds pairs at once."""

        @classmethod
        def INPUT_TYPES(cls):  # noqa: N802
            return {"required": {}}

        RETURN_TYPES, FUNCTION, CATEGORY = ("SPO_SCORER",), "make", "testing"

        def make(self):
            from spo_core.scorers.base import Scorer

            class Brightness(Scorer):
                name, needs_prompt, step_aware = "brightness", False, False

                def _score(self, images, prompts, timesteps):
                    return images.mean(dim=(1, 2, 3)) * 100

            return (Brightness(),)

    class OOMScorer:
        """An SPO_SCORER that runs out of CUDA memory, as a too-large run would."""

        @classmethod
        def INPUT_TYPES(cls):  # noqa: N802
            return {"required": {}}

        RETURN_TYPES, FUNCTION, CATEGORY = ("SPO_SCORER",), "make", "testing"

        def make(self):
            from spo_core.scorers.base import Scorer

            class OOM(Scorer):
                name, needs_prompt = "oom", False

                def _score(self, images, prompts, timesteps):
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

            return (OOM(),)

    class Capture:
        @classmethod
        def INPUT_TYPES(cls):  # noqa: N802
            return {"required": {"value": (CAPTURE_TYPES, {}), "key": ("STRING", {"default": "out"})}}

        RETURN_TYPES, FUNCTION, CATEGORY, OUTPUT_NODE = (), "capture", "testing", True

        def capture(self, value, key):
            h.captured[key] = value
            return ()

    for name, cls in (("SPOTest_TinyModel", TinyModel), ("SPOTest_TinyVAE", TinyVAE), ("SPOTest_TinyCond", TinyCond),
                      ("SPOTest_TinyCLIP", TinyCLIP), ("SPOTest_BrightnessScorer", BrightnessScorer),
                      ("SPOTest_OOMScorer", OOMScorer),
                      ("SPOTest_Capture", Capture)):
        nodes.NODE_CLASS_MAPPINGS[name] = cls


CAPTURE_TYPES = "LATENT,IMAGE,STRING,FLOAT,MODEL,CLIP,SPO_TRACE,SAMPLER,CONDITIONING"


# -- tiny models built in code (no downloads) ---------------------------------------------------

TINY_UNET = {
    "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": [1, 1], "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1, "context_dim": 32, "num_heads": 2,
    "use_linear_in_transformer": False, "adm_in_channels": None, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "image_size": 32, "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


def tiny_model(seed: int = 0, sdxl: bool = False):
    """A ~1 M-parameter SD1.5-class (or SDXL-class) EPS ModelPatcher with random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    cfg = dict(TINY_UNET)
    if sdxl:
        cfg["adm_in_channels"] = 32 + 6 * 256
        cfg["num_classes"] = "sequential"
        config = comfy.supported_models.SDXL(cfg)
        config.unet_config["num_head_channels"] = 16  # SDXL's 64-channel heads would leave a 32-wide UNet no head
        model = config.get_model({})
    else:
        model = comfy.supported_models.SD15(cfg).get_model({})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=torch.device("cpu"))


TINY_CLIP = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": 32, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 1,
    "projection_dim": 32, "torch_dtype": "float32", "vocab_size": 49408,
}


def tiny_clip(seed: int = 0):
    """A comfy.sd.CLIP with a 2-layer, 32-wide SD1-style text encoder and ComfyUI's bundled tokenizer."""
    import functools

    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip

    te = comfy.sd1_clip.SD1ClipModel(clip_model=functools.partial(
        comfy.sd1_clip.SDClipModel, textmodel_json_config=dict(TINY_CLIP), return_projected_pooled=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in te.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    cpu = torch.device("cpu")
    clip = comfy.sd.CLIP(no_init=True)
    clip.cond_stage_model = te
    clip.tokenizer = comfy.sd1_clip.SD1Tokenizer(embedding_directory=None, tokenizer_data={})
    clip.patcher = comfy.model_patcher.ModelPatcher(te, load_device=cpu, offload_device=cpu)
    clip.layer_idx = None
    clip.tokenizer_options = {}
    clip.use_clip_schedule = False
    clip.apply_hooks_to_conds = None
    return clip


def tiny_vae(seed: int = 0):
    import comfy.sd
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in taesd.state_dict().items():
        sd[k] = v if k in ("vae_scale", "vae_shift") else torch.randn(v.shape, generator=g) * 0.05
    return comfy.sd.VAE(sd=sd)


def tiny_cond(batch: int = 1, ctx: int = 32, seed: int = 0, sdxl: bool = False):
    g = torch.Generator().manual_seed(seed)
    extras = {"pooled_output": torch.randn(batch, 32, generator=g)} if sdxl else {}
    return [[torch.randn(batch, 77, ctx, generator=g), extras]]


def comfyui_version(comfy_path: str) -> str:
    ns: dict = {}
    p = Path(comfy_path) / "comfyui_version.py"
    if p.is_file():
        exec(p.read_text(), ns)
    return ns.get("__version__", "unknown")


def env_comfy_path() -> str | None:
    path = os.environ.get("COMFYUI_PATH")
    return path if path and (Path(path) / "nodes.py").is_file() else None


_STARTED: ComfyHarness | None = None


def get_harness(base_dir: Path) -> ComfyHarness:
    """The one ComfyUI of this test process (ComfyUI's modules are process-global)."""
    global _STARTED
    if _STARTED is None:
        path = env_comfy_path()
        if path is None:
            raise RuntimeError("COMFYUI_PATH is not set to a ComfyUI checkout")
        device = "cuda" if os.environ.get("SPO_TEST_DEVICE") == "cuda" and torch.cuda.is_available() else "cpu"
        _STARTED = ComfyHarness(path, base_dir, device=device).start()
    return _STARTED


def meta_clip(te):
    """A comfy.sd.CLIP around text encoders built on `meta` (no tokenizer: its key maps and patches only)."""
    import comfy.model_patcher
    import comfy.sd

    cpu = torch.device("cpu")
    clip = comfy.sd.CLIP(no_init=True)
    clip.cond_stage_model = te
    clip.patcher = comfy.model_patcher.ModelPatcher(te, load_device=cpu, offload_device=cpu)
    clip.tokenizer = None
    clip.layer_idx = None
    clip.tokenizer_options = {}
    clip.use_clip_schedule = False
    clip.apply_hooks_to_conds = None
    return clip


def meta_model_and_clip(arch: str):
    """Real-size SD1.5 / SDXL UNet and text encoders as ComfyUI builds them, on the meta device.

    ComfyUI picks its own model config from the UNet's shapes (a diffusers UNet of the shipped
    config, also on meta), so the key maps are ComfyUI's for the real architecture.
    """
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd1_clip
    import comfy.sdxl_clip

    from spo_core.testing import real_unet

    sd = real_unet(arch, device="meta").state_dict()
    config = comfy.model_detection.model_config_from_unet_config(comfy.model_detection.unet_config_from_diffusers_unet(sd))
    cpu = torch.device("cpu")
    with torch.device("meta"):
        model = config.get_model({})
        te = comfy.sd1_clip.SD1ClipModel() if arch == "sd15" else comfy.sdxl_clip.SDXLClipModel()
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu), meta_clip(te)


def run_node_class(cls, unique_id: str = "1", **inputs):
    """Execute a node class as the executor does (inference mode; V3 on a class clone); returns the values."""
    with torch.inference_mode():
        if hasattr(cls, "PREPARE_CLASS_CLONE"):
            out = cls.PREPARE_CLASS_CLONE({"UNIQUE_ID": unique_id}).EXECUTE_NORMALIZED(**inputs)
            return tuple(out.args)
        if "unique_id" in cls.INPUT_TYPES().get("hidden", {}):
            inputs["unique_id"] = unique_id
        out = getattr(cls(), cls.FUNCTION)(**inputs)
        return tuple(out["result"]) if isinstance(out, dict) else tuple(out)


def tiny_sd3_transformer(seed: int = 0):
    """A diffusers SD3Transformer2DModel that ComfyUI detects as SD3 (16 latent channels, hidden = 64 x depth, one
    head per 64), conditioned on the tiny CLIP's 32-wide states and pooled output."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16)


def tiny_sd3_model(seed: int = 0):
    """ComfyUI's own SD3 MODEL (MMDiT, CONST sampling, shift 3) loaded from the diffusers weights, as a
    diffusion-model loader loads a diffusers-format SD3 file."""
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in tiny_sd3_transformer(seed).state_dict().items()})


def tiny_flux_model(seed: int = 0):
    """ComfyUI's own Flux MODEL (guidance-distilled, ModelSamplingFlux) at a tiny size: one double and one single
    block of 128 channels (one head, as ComfyUI's 128-wide rope heads), random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.Flux({
        "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32,
        "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 1, "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 56, 56],
        "theta": 10000, "qkv_bias": True, "guidance_embed": True})
    model = config.get_model({})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=torch.device("cpu"))


def tiny_vae16(seed: int = 0):
    """A TAESD-style VAE with 16 latent channels (SD3 / Flux latents)."""
    import comfy.sd
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD(latent_channels=16)
    g = torch.Generator().manual_seed(seed)
    sd = {k: v if k in ("vae_scale", "vae_shift") else torch.randn(v.shape, generator=g) * 0.05 for k, v in taesd.state_dict().items()}
    return comfy.sd.VAE(sd=sd)


def meta_flow_model_and_clip(arch: str):
    """Real-size SD3.5 / Flux.1 transformer and text encoders (SD3: CLIP-L, CLIP-G, T5-XXL; Flux: CLIP-L, T5-XXL)
    as ComfyUI builds them, on the meta device. ComfyUI detects its model config from the original-layout keys
    and shapes of the shipped diffusers config's transformer, as it does for a real checkpoint."""
    import json

    import comfy.model_detection
    import comfy.model_patcher
    import diffusers
    from comfy.text_encoders import flux, sd3_clip

    from spo_core.lora import load_table
    from spo_core.lora.tables import CONFIG_DIR
    from test_lora_flow_formats import original_state_dict

    config = json.loads((CONFIG_DIR / arch / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        transformer = getattr(diffusers, config["_class_name"]).from_config(config)
    original = original_state_dict(load_table(arch), transformer.state_dict())
    model_config = comfy.model_detection.model_config_from_unet_config(comfy.model_detection.detect_unet_config(original, ""), original)
    cpu = torch.device("cpu")
    with torch.device("meta"):
        model = model_config.get_model({})
    te = (flux.FluxClipModel if arch.startswith("flux") else sd3_clip.SD3ClipModel)(device="meta", dtype=torch.float16)
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu), meta_clip(te)
