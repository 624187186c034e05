"""Contract tests of the ComfyUI nodes against a stand-in `comfy` (runs everywhere, no ComfyUI).

Every node is checked in both forms the pack registers: V3 (`comfy_api.latest` present) and
classic V1 (absent). The stand-in records what the nodes hand to ComfyUI, so these tests see
the calls into `spo_core` and into ComfyUI's patching. The real ComfyUI is exercised by
tests/test_comfyui_integration.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from comfy_support import fakes  # noqa: E402
from comfy_support.stub_env import stub_pack  # noqa: E402
from spo_core.errors import ConfigError, FileMissingError, LoRAFormatError, ModelMismatchError  # noqa: E402
from spo_core.lora import load_table, read_lora  # noqa: E402

EXPECTED = {
    "SPOLoadLoRA": ("Load SPO LoRA", ["MODEL", "CLIP", "STRING"]),
    "SPOLoadLoRAFromCheckpoint": ("Load SPO LoRA from Fine-tuned Checkpoint", ["MODEL", "CLIP", "STRING"]),
    "SPOSaveConvertLoRA": ("Save / Convert SPO LoRA", ["STRING", "STRING"]),
    "SPOExtractLoRAFromModels": ("Extract LoRA (from two models)", ["STRING", "STRING"]),
    "SPOExtractLoRAFromFiles": ("Extract LoRA (from checkpoint files)", ["STRING", "STRING"]),
    "SPOLoadScorer": ("Load Step-Aware Scorer", ["SPO_SCORER", "STRING"]),
    "SPOScoreImages": ("Score Images", ["FLOAT", "STRING", "IMAGE"]),
    "SPOPerStepResampler": ("SPO Per-Step Resampler", ["SAMPLER", "SPO_TRACE"]),
    "SPOResampling": ("SPO Resampling", ["MODEL", "SPO_TRACE"]),
    "SPOCandidateGrid": ("SPO Candidate Grid", ["IMAGE"]),
    "SPOTrainLoRA": ("Train SPO LoRA", ["MODEL", "STRING", "IMAGE", "STRING"]),
    "SPOTrainLoRAOnPairs": ("Train LoRA on Preference Pairs", ["MODEL", "STRING", "IMAGE", "STRING"]),
}


@pytest.fixture(params=["v3", "v1"])
def pack(request, tmp_path):
    with stub_pack(tmp_path, request.param) as p:
        import comfy.sd
        import comfy.utils

        comfy.sd.CALLS.clear()
        comfy.sd.NOT_LOADED.clear()
        comfy.utils.UPDATES.clear()
        for folder in ("loras", "checkpoints", "diffusion_models"):
            (tmp_path / "models" / folder).mkdir(parents=True)
        yield p


# -- LoRA files as other tools write them (keys written out here, not by our writer) --------------


def _factors(shape, rank, g):
    out_f = shape[0]
    in_f = 1
    for d in shape[1:]:
        in_f *= d
    return torch.randn(rank, in_f, generator=g) * 0.1, torch.randn(out_f, rank, generator=g) * 0.1


def spo_diffusers_lora(path: Path, unet_mods, te_mods=(), rank: int = 2, seed: int = 0) -> Path:
    """The layout of SPO's released *_lora_diffusers.safetensors: unet.<path>.lora.down/up.weight."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in unet_mods:
        down, up = _factors(m.shape, rank, g)
        sd[f"unet.{m.name}.lora.down.weight"] = down
        sd[f"unet.{m.name}.lora.up.weight"] = up
    for m in te_mods:
        prefix = "text_encoder" if m.component == "te1" else "text_encoder_2"
        down, up = _factors(m.shape, rank, g)
        sd[f"{prefix}.{m.name}.lora_linear_layer.down.weight"] = down
        sd[f"{prefix}.{m.name}.lora_linear_layer.up.weight"] = up
    save_file(sd, str(path))
    return path


def kohya_lora(path: Path, arch: str, unet_mods, te_mods=(), rank: int = 2, alpha: float = 1.0, seed: int = 0,
               extra: dict | None = None) -> Path:
    """kohya sd-scripts layout: lora_unet_<diffusers path> (SD1) / <LDM path> (SDXL), lora_te*_, alpha."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in list(unet_mods) + list(te_mods):
        if m.component == "unet":
            name = "lora_unet_" + (m.ldm if arch == "sdxl" else m.name).replace(".", "_")
        else:
            head = "lora_te_" if arch == "sd15" else ("lora_te1_" if m.component == "te1" else "lora_te2_")
            name = head + m.name.replace(".", "_")
        down, up = _factors(m.shape, rank, g)
        sd[name + ".lora_down.weight"] = down
        sd[name + ".lora_up.weight"] = up
        sd[name + ".alpha"] = torch.tensor(alpha)
    sd.update(extra or {})
    save_file(sd, str(path))
    return path


# -- registration ------------------------------------------------------------------------------


def test_every_node_is_registered_with_its_sockets(pack):
    assert set(EXPECTED) <= set(pack.nodes)
    names = pack.module.NODE_DISPLAY_NAME_MAPPINGS
    for node_id, (display, outputs) in EXPECTED.items():
        cls = pack.nodes[node_id]
        assert names[node_id] == display
        if pack.form == "v3":
            import comfy_api.latest

            assert issubclass(cls, comfy_api.latest.io.ComfyNode)
            schema = cls.define_schema()
            assert schema.category == "SPO" and schema.node_id == node_id
            assert [o.io_type for o in schema.outputs] == outputs
        else:
            assert cls.CATEGORY == "SPO"
            assert list(cls.RETURN_TYPES) == outputs
            assert hasattr(cls, cls.FUNCTION)
    types = pack.nodes["SPOLoadLoRA"].INPUT_TYPES()
    assert types["required"]["model"][0] == "MODEL"
    assert types["optional"]["clip"][0] == "CLIP"
    assert types["required"]["strength_model"][0] == "FLOAT"
    assert types["required"]["strength_model"][1]["default"] == 1.0
    assert types["required"]["allow_partial"][0] == "BOOLEAN"
    assert isinstance(types["required"]["lora_name"][0], list)
    assert "hidden" not in types
    assert pack.nodes["SPOExtractLoRAFromFiles"].INPUT_TYPES()["hidden"] == {"unique_id": ("UNIQUE_ID",)}


def test_combo_lists_files_of_the_loras_folder(pack):
    (pack.base / "models" / "loras" / "sub").mkdir()
    kohya_lora(pack.base / "models" / "loras" / "sub" / "a.safetensors", "sd15", fakes.unet_modules("sd15", limit=1))
    options = pack.nodes["SPOLoadLoRA"].INPUT_TYPES()["required"]["lora_name"][0]
    assert "sub/a.safetensors" in options


# -- Load SPO LoRA ----------------------------------------------------------------------------


def test_spo_diffusers_lora_is_converted_and_every_module_patched(pack):
    unet = fakes.unet_modules("sdxl", block="down_blocks.1.attentions.0")
    te = fakes.te_modules("sdxl")
    spo_diffusers_lora(pack.base / "models" / "loras" / "spo.safetensors", unet, te)
    model, clip = fakes.fake_model("sdxl", unet), fakes.fake_clip("sdxl", te)
    (new_model, new_clip, text), ui = pack.run("SPOLoadLoRA", model=model, lora_name="spo.safetensors",
                                               strength_model=0.8, strength_clip=0.5, allow_partial=False, clip=clip)
    import comfy.sd

    call = comfy.sd.CALLS[-1]
    assert call["strength_model"] == 0.8 and call["strength_clip"] == 0.5
    assert comfy.sd.NOT_LOADED == []  # every key handed to ComfyUI was taken
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in call["lora"])  # converted to kohya
    assert len(new_model.patches) == len(unet) and set(new_model.patches) == set(model.model.state_dict())
    assert len(new_clip.patcher.patches) == len(te)
    assert "sdxl" in text and "diffusers" in text and f"applied {len(unet)} UNet modules" in text
    assert ui == {"text": [text]}
    assert model.patches == {}  # the input MODEL is not changed (ComfyUI clones)


def test_sd15_kohya_lora_without_clip_patches_unet_and_says_so(pack):
    unet = fakes.unet_modules("sd15", block="down_blocks.0")
    te = fakes.te_modules("sd15")
    kohya_lora(pack.base / "models" / "loras" / "k.safetensors", "sd15", unet, te, alpha=1.0)
    model = fakes.fake_model("sd15", unet)
    (new_model, new_clip, text), _ = pack.run("SPOLoadLoRA", model=model, lora_name="k.safetensors",
                                              strength_model=1.0, strength_clip=1.0, allow_partial=False)
    import comfy.sd

    assert new_clip is None
    assert len(new_model.patches) == len(unet) and comfy.sd.NOT_LOADED == []
    assert not any(k.startswith("lora_te") for k in comfy.sd.CALLS[-1]["lora"])
    assert f"{len(te)} text-encoder modules not applied: no CLIP is connected" in text
    # kohya alpha kept: ComfyUI scales by alpha / rank
    alphas = {float(v) for k, v in comfy.sd.CALLS[-1]["lora"].items() if k.endswith(".alpha")}
    assert alphas == {1.0}


def test_sdxl_lora_on_sd15_model_is_refused_before_patching(pack):
    kohya_lora(pack.base / "models" / "loras" / "xl.safetensors", "sdxl", fakes.unet_modules("sdxl", limit=40))
    model = fakes.fake_model("sd15", fakes.unet_modules("sd15", limit=40))
    with pytest.raises(ModelMismatchError, match="made for sdxl but the model is sd15"):
        pack.run("SPOLoadLoRA", model=model, lora_name="xl.safetensors", strength_model=1.0, strength_clip=1.0,
                 allow_partial=True)
    import comfy.sd

    assert comfy.sd.CALLS == []


def test_partial_match_is_refused_unless_allowed(pack):
    unet = fakes.unet_modules("sd15", block="down_blocks.0")
    extra = {"lora_unet_not_a_module.lora_down.weight": torch.zeros(2, 4), "lora_unet_not_a_module.lora_up.weight": torch.zeros(4, 2)}
    kohya_lora(pack.base / "models" / "loras" / "p.safetensors", "sd15", unet, extra=extra)
    model = fakes.fake_model("sd15", unet)
    kwargs = dict(model=model, lora_name="p.safetensors", strength_model=1.0, strength_clip=1.0)
    with pytest.raises(LoRAFormatError, match="partial match"):
        pack.run("SPOLoadLoRA", allow_partial=False, **kwargs)
    (new_model, _, text), _ = pack.run("SPOLoadLoRA", allow_partial=True, **kwargs)
    assert len(new_model.patches) == len(unet)
    assert "partial match allowed: 2 keys" in text


def test_module_missing_from_the_model_stops_the_load(pack):
    unet = fakes.unet_modules("sd15", block="down_blocks.0")
    kohya_lora(pack.base / "models" / "loras" / "m.safetensors", "sd15", unet)
    model = fakes.fake_model("sd15", unet[:-3])  # a model without three of the LoRA's layers
    with pytest.raises(ModelMismatchError, match="3 modules of this LoRA do not exist"):
        pack.run("SPOLoadLoRA", model=model, lora_name="m.safetensors", strength_model=1.0, strength_clip=1.0,
                 allow_partial=False)
    import comfy.sd

    assert comfy.sd.CALLS == []


def test_missing_lora_file_names_the_folder(pack):
    model = fakes.fake_model("sd15", fakes.unet_modules("sd15", limit=2))
    with pytest.raises(FileMissingError, match="'gone.safetensors' was not found in .*loras"):
        pack.run("SPOLoadLoRA", model=model, lora_name="gone.safetensors", strength_model=1.0, strength_clip=1.0,
                 allow_partial=False)


def test_both_strengths_zero_applies_nothing(pack):
    unet = fakes.unet_modules("sd15", limit=4)
    kohya_lora(pack.base / "models" / "loras" / "z.safetensors", "sd15", unet)
    model = fakes.fake_model("sd15", unet)
    (new_model, _, text), _ = pack.run("SPOLoadLoRA", model=model, lora_name="z.safetensors", strength_model=0.0,
                                       strength_clip=0.0, allow_partial=False)
    assert new_model is model and "nothing applied" in text


def test_lora_file_is_read_once_until_it_changes(pack, monkeypatch):
    unet = fakes.unet_modules("sd15", limit=4)
    path = kohya_lora(pack.base / "models" / "loras" / "c.safetensors", "sd15", unet)
    bridge = sys.modules[pack.module.__name__ + ".nodes.lora_bridge"]
    calls = []
    real = bridge.read_lora
    monkeypatch.setattr(bridge, "read_lora", lambda p: calls.append(p) or real(p))
    model = fakes.fake_model("sd15", unet)
    kw = dict(model=model, lora_name="c.safetensors", strength_model=1.0, strength_clip=1.0, allow_partial=False)
    pack.run("SPOLoadLoRA", **kw)
    pack.run("SPOLoadLoRA", **kw)
    assert len(calls) == 1
    kohya_lora(path, "sd15", unet, seed=5)  # rewritten: read again
    import os

    os.utime(path, ns=(1, 10**18))
    pack.run("SPOLoadLoRA", **kw)
    assert len(calls) == 2


# -- Save / Convert -----------------------------------------------------------------------------


def test_convert_writes_webui_file_into_output_loras(pack):
    unet = fakes.unet_modules("sdxl", block="down_blocks.1.attentions.0")
    src = spo_diffusers_lora(pack.base / "models" / "loras" / "spo.safetensors", unet)
    (path, text), ui = pack.run("SPOSaveConvertLoRA", lora_name="spo.safetensors", format="webui", dtype="fp16",
                                output_name="converted/spo_webui", allow_partial=False, overwrite=False)
    assert Path(path) == pack.base / "output" / "loras" / "converted" / "spo_webui.safetensors"
    out = read_lora(path)
    ref = read_lora(src)
    assert out.source_format == "kohya-ldm" and out.arch == "sdxl"
    assert set(out.modules) == set(ref.modules)
    for k, m in ref.modules.items():
        assert torch.allclose(out.modules[k].delta(), m.delta(), atol=2e-3)
    # a second run does not overwrite: a counter is added
    (path2, _), _ = pack.run("SPOSaveConvertLoRA", lora_name="spo.safetensors", format="webui", dtype="keep",
                             output_name="converted/spo_webui", allow_partial=False, overwrite=False)
    assert Path(path2).name == "spo_webui_00001.safetensors"


def test_convert_refuses_a_name_outside_output(pack):
    kohya_lora(pack.base / "models" / "loras" / "a.safetensors", "sd15", fakes.unet_modules("sd15", limit=2))
    with pytest.raises(ConfigError, match="not a valid file name"):
        pack.run("SPOSaveConvertLoRA", lora_name="a.safetensors", format="webui", dtype="keep",
                 output_name="../../escape", allow_partial=False, overwrite=False)


# -- Extract ------------------------------------------------------------------------------------


def _checkpoint_pair(base: Path, arch: str, mods, rank: int, seed: int = 0):
    """Single-file checkpoints (model.diffusion_model.* keys) that differ by an exact rank-`rank` delta."""
    g = torch.Generator().manual_seed(seed)
    a, b = {}, {}
    probe = load_table(arch).get("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
    a[f"model.diffusion_model.{probe.ldm}.weight"] = b[f"model.diffusion_model.{probe.ldm}.weight"] = torch.zeros(probe.shape)
    for m in mods:
        w = torch.randn(m.shape, generator=g) * 0.02
        down, up = _factors(m.shape, rank, g)
        key = f"model.diffusion_model.{m.ldm}.weight"
        a[key] = w
        b[key] = w + (up @ down).reshape(m.shape)
    save_file(a, str(base / "models" / "checkpoints" / "base.safetensors"))
    save_file(b, str(base / "models" / "checkpoints" / "tuned.safetensors"))


def test_extract_from_checkpoint_files_recovers_the_difference(pack):
    mods = fakes.unet_modules("sd15", block="down_blocks.0.attentions.0", limit=6)
    _checkpoint_pair(pack.base, "sd15", mods, rank=3)
    (path, text), _ = pack.run("SPOExtractLoRAFromFiles", base_checkpoint="base.safetensors",
                               tuned_checkpoint="tuned.safetensors", rank=3, energy=0.0, output_name="x",
                               overwrite=False, text_encoders="no")
    lora = read_lora(path)
    assert lora.arch == "sd15" and len(lora.modules) == len(mods)
    assert "retained energy" in text
    import comfy.utils

    assert comfy.utils.UPDATES and comfy.utils.UPDATES[-1][0] == "7"  # progress on this node's bar


def test_load_from_checkpoint_extracts_once_and_applies(pack, monkeypatch):
    mods = fakes.unet_modules("sd15", block="down_blocks.0.attentions.0", limit=6)
    _checkpoint_pair(pack.base, "sd15", mods, rank=2)
    lora_nodes = sys.modules[pack.module.__name__ + ".nodes.lora_nodes"]
    calls = []
    real = lora_nodes.extract_lora
    monkeypatch.setattr(lora_nodes, "extract_lora", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = fakes.fake_model("sd15", mods)
    kw = dict(model=model, base_checkpoint="base.safetensors", tuned_checkpoint="tuned.safetensors", rank=2,
              strength_model=1.0, strength_clip=1.0, text_encoders="no")
    (new_model, _, text), _ = pack.run("SPOLoadLoRAFromCheckpoint", **kw)
    pack.run("SPOLoadLoRAFromCheckpoint", **kw)
    assert len(calls) == 1
    assert len(new_model.patches) == len(mods)
    with pytest.raises(ConfigError, match="same file"):
        pack.run("SPOLoadLoRAFromCheckpoint", **{**kw, "tuned_checkpoint": "base.safetensors"})


def test_extract_from_two_models_sees_their_lora_patches(pack):
    """tuned = base + a LoRA applied through ComfyUI's patches: extraction gives that LoRA back."""
    mods = fakes.unet_modules("sd15", block="down_blocks.0.attentions.0", limit=6)
    kohya_lora(pack.base / "models" / "loras" / "l.safetensors", "sd15", mods, rank=2, alpha=2.0)
    base = fakes.fake_model("sd15", mods, device="cpu")
    (tuned, _, _), _ = pack.run("SPOLoadLoRA", model=base, lora_name="l.safetensors", strength_model=1.0,
                                strength_clip=0.0, allow_partial=False)
    (path, _), _ = pack.run("SPOExtractLoRAFromModels", base_model=base, tuned_model=tuned, rank=2, energy=0.0,
                            output_name="from_models", overwrite=False)
    got = read_lora(path)
    ref = read_lora(pack.base / "models" / "loras" / "l.safetensors")
    assert set(got.modules) == set(ref.modules)
    for k, m in ref.modules.items():
        torch.testing.assert_close(got.modules[k].delta(), m.delta(), atol=1e-5, rtol=1e-4)


def test_extract_of_identical_models_says_there_is_nothing(pack):
    mods = fakes.unet_modules("sd15", limit=3)
    base = fakes.fake_model("sd15", mods, device="cpu")
    with pytest.raises(ConfigError, match="do not differ"):
        pack.run("SPOExtractLoRAFromModels", base_model=base, tuned_model=base.clone(), rank=2, energy=0.0,
                 output_name="none", overwrite=False)
    assert not (pack.base / "output" / "loras" / "none.safetensors").exists()


# -- Scorers ------------------------------------------------------------------------------------


def _images(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # images of different detail: more noise compresses worse
    return torch.stack([torch.rand(size, size, 3, generator=g) * (i / n) + 0.2 for i in range(n)]).clamp(0, 1)


def test_score_images_with_jpeg_scorer_matches_the_core_and_sorts(pack):
    from spo_core.scorers import load_scorer

    (scorer, info), _ = pack.run("SPOLoadScorer", scorer="jpeg_compressibility", weights="(none)", device="cpu", dtype="fp32")
    assert scorer.name == "jpeg_compressibility" and "none needed" in info
    images = _images()
    (scores, table, sorted_images), ui = pack.run("SPOScoreImages", images=images, prompt="", scorer=scorer, timestep=0)
    ref = load_scorer("jpeg_compressibility").score(images.movedim(-1, 1), None).tolist()
    assert scores == pytest.approx(ref)
    order = sorted(range(len(ref)), key=lambda i: -ref[i])
    torch.testing.assert_close(sorted_images, images[order])
    assert table.splitlines()[1].split()[:2] == ["1", str(order[0])]
    if pack.form == "v1":
        assert pack.nodes["SPOScoreImages"].OUTPUT_IS_LIST == (True, False, False)


def test_scorer_needing_weights_says_which_file(pack):
    with pytest.raises(ConfigError, match="needs weights in models/spo_scorers"):
        pack.run("SPOLoadScorer", scorer="spm", weights="(none)", device="cpu", dtype="fp32")
    with pytest.raises(FileMissingError, match="'gone.safetensors' were not found in .*spo_scorers"):
        pack.run("SPOLoadScorer", scorer="spm", weights="gone.safetensors", device="cpu", dtype="fp32")


def test_spo_scorers_folder_is_registered_and_listed(pack):
    import folder_paths

    root = Path(folder_paths.get_folder_paths("spo_scorers")[0])
    assert root == pack.base / "models" / "spo_scorers"
    (root / "pickscore").mkdir(parents=True)
    (root / "spm.safetensors").write_bytes(b"")
    options = pack.nodes["SPOLoadScorer"].INPUT_TYPES()["required"]["weights"][0]
    assert options == ["(none)", "pickscore/", "spm.safetensors"]


def test_managed_scorer_is_loaded_by_comfy_model_management(pack):
    from spo_core.scorers.base import Scorer

    class Brightness(Scorer):
        name = "brightness"
        needs_prompt = False

        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(1, 1)
            torch.nn.init.ones_(self.head.weight)
            torch.nn.init.zeros_(self.head.bias)

        def _score(self, images, prompts, timesteps):
            return self.head(images.mean(dim=(1, 2, 3)).unsqueeze(1)).squeeze(1)

        def modules(self):
            return [self.head]

    mod = sys.modules[pack.module.__name__ + ".nodes.scorer_nodes"]
    managed = mod.ManagedScorer(Brightness(), torch.device("cpu"), torch.device("cpu"))
    import comfy.model_management

    comfy.model_management.LOADED.clear()
    images = _images(3)
    (scores, _, _), _ = pack.run("SPOScoreImages", images=images, prompt="", scorer=managed, timestep=0)
    assert comfy.model_management.LOADED == [[managed.patcher]]
    assert scores == pytest.approx(images.mean(dim=(1, 2, 3)).tolist(), abs=1e-6)
    assert list(managed.patcher.model.parameters())[0] is managed.scorer.head.weight


def test_prompt_is_required_by_prompt_scorers(pack):
    class NeedsPrompt:
        name, needs_prompt = "p", True

    with pytest.raises(ConfigError, match="enter the prompt"):
        pack.run("SPOScoreImages", images=_images(2), prompt="  ", scorer=NeedsPrompt(), timestep=0)


# -- Resampler ----------------------------------------------------------------------------------

RESAMPLER_OPTIONS = dict(prompt="a cat", k=3, policy="greedy", eta=1.0, window_t_min=0, window_t_max=999, score_every=1,
                         temperature=1.0, lookahead_steps=0)


class _ModelSampling:
    def __init__(self):
        from spo_core.sampling import NoiseSchedule

        self.sigmas = NoiseSchedule.scaled_linear().sigmas.float()


class _Base:
    model_sampling = _ModelSampling()

    @staticmethod
    def process_latent_out(x):
        return x / 0.18215


class _Guider:
    inner_model = _Base()


class _ModelK:
    """What a ComfyUI sampler function gets: model(x, sigma, **extra_args) -> x0 (here x0 = x / (1 + sigma^2))."""

    inner_model = _Guider()

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, denoise_mask=None, model_options=None, seed=None):
        self.calls.append((x.shape[0], float(sigma[0])))
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)


class _VAE:
    def decode(self, latents):
        return torch.sigmoid(latents[:, :3]).movedim(1, -1).repeat_interleave(2, 1).repeat_interleave(2, 2)


def _jpeg():
    from spo_core.scorers import load_scorer

    return load_scorer("jpeg_compressibility")


def test_resampler_node_gives_a_ksampler_running_the_core_resampler(pack):
    from spo_core.sampling import NoiseSchedule

    (sampler, trace), _ = pack.run("SPOPerStepResampler", scorer=_jpeg(), vae=_VAE(), **RESAMPLER_OPTIONS)
    import comfy.samplers

    assert isinstance(sampler, comfy.samplers.KSAMPLER)
    opts = sampler.extra_options["spo"]
    assert opts.config.k == 3 and opts.config.window == (0.0, 999.0) and opts.trace is trace
    sigmas = NoiseSchedule.scaled_linear().ddim_sigmas(5, final="zero")
    x = torch.randn(2, 4, 8, 8) * float(sigmas[0])
    model, steps = _ModelK(), []
    out = sampler.sampler_function(model, x, sigmas, extra_args={"seed": 7, "denoise_mask": None, "model_options": {}},
                                   callback=steps.append, disable=True, **sampler.extra_options)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert [c[0] for c in model.calls] == [2] + [6] * 4  # one batch of k*B rows per pool
    assert [d["i"] for d in steps] == [0, 1, 2, 3, 4] and set(steps[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert trace.runs == 1 and sum(r.pooled for r in trace.result.trace) == 4
    model2 = _ModelK()
    again = sampler.sampler_function(model2, x, sigmas, extra_args={"seed": 7, "denoise_mask": None, "model_options": {}},
                                     callback=None, disable=True, **sampler.extra_options)
    torch.testing.assert_close(again, out)
    grid, = pack.run("SPOCandidateGrid", trace=trace, samples={"samples": out}, cell_size=32)[0]
    assert grid.shape[0] == 2 and grid.shape[-1] == 3


def test_resampler_refuses_a_noise_mask_with_batch_above_one(pack):
    from spo_core.sampling import NoiseSchedule

    (sampler, _), _ = pack.run("SPOPerStepResampler", scorer=_jpeg(), vae=_VAE(), **RESAMPLER_OPTIONS)
    sigmas = NoiseSchedule.scaled_linear().ddim_sigmas(3, final="zero")
    with pytest.raises(ConfigError, match="batch size 1 only"):
        sampler.sampler_function(_ModelK(), torch.randn(2, 4, 8, 8), sigmas,
                                 extra_args={"seed": 0, "denoise_mask": torch.ones(2, 4, 8, 8)}, **sampler.extra_options)


def test_resampler_settings_that_cannot_work_fail_in_the_node(pack):
    with pytest.raises(ConfigError, match="eta = 0"):
        pack.run("SPOPerStepResampler", scorer=_jpeg(), vae=_VAE(), **{**RESAMPLER_OPTIONS, "eta": 0.0})
    with pytest.raises(ConfigError, match="above window_t_max"):
        pack.run("SPOPerStepResampler", scorer=_jpeg(), vae=_VAE(), **{**RESAMPLER_OPTIONS, "window_t_min": 800, "window_t_max": 100})
    (_, trace), _ = pack.run("SPOPerStepResampler", scorer=_jpeg(), vae=_VAE(), **RESAMPLER_OPTIONS)
    with pytest.raises(ConfigError, match="no candidate pools"):  # the grid before any sampling run
        pack.run("SPOCandidateGrid", trace=trace, samples={}, cell_size=32)


def test_resampling_patch_wraps_sampler_sample_and_loads_scorer_with_the_model(pack):
    import comfy.patcher_extension

    class Managed:
        patcher = object()
        needs_prompt = False
        name = "m"

    model = fakes.fake_model("sd15", fakes.unet_modules("sd15", limit=1))
    (patched, trace), _ = pack.run("SPOResampling", model=model, scorer=Managed(), vae=_VAE(), **RESAMPLER_OPTIONS)
    assert patched is not model and model.wrappers == {}
    wrappers = patched.wrappers[comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE]["spo_resampler"]
    assert len(wrappers) == 1 and callable(wrappers[0])
    assert patched.additional_models["spo_resampler"] == [Managed.patcher]


# -- Training (the node's side: settings into spo_core's trainer, outputs, cancel) ---------------------

TRAIN_COMMON = dict(train_steps=5, learning_rate=0.0, rank=0, width=0, height=0, seed=3, output_name="my_spo", resume=False,
                    overwrite=False, mixed_precision="no", gradient_checkpointing=False, checkpoint_every=2, preview_every=0)


class _FakeTrainer:
    """Stands in for spo_core.training.train and the ComfyUI host: records the config, writes the LoRA file
    the trainer would (a real kohya file for the fake model's modules), or is cancelled after writing it."""

    def __init__(self, modules):
        self.modules = modules
        self.calls = []
        self.cancel_after_write = False

    def host(self, model, clip, vae, model_name=None):
        from types import SimpleNamespace

        return SimpleNamespace(arch="sd15", release=lambda: None, encode_images=lambda x: x[:, :3, ::8, ::8] * 0 + x.mean())

    def __call__(self, cfg, host, scorer, prompts=None, pairs=None, progress=None, cancel=None):
        from types import SimpleNamespace

        from spo_core.errors import Cancelled
        from spo_core.lora import read_lora

        if callable(pairs):
            pairs = pairs(host)
        if pairs is not None and not cfg.pairs:  # as the Trainer does for in-memory pairs
            import dataclasses

            cfg = dataclasses.replace(cfg, pairs="<in memory>")
        self.calls.append(SimpleNamespace(cfg=cfg.resolved(), scorer=scorer, prompts=prompts, pairs=pairs))
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = kohya_lora(out / f"{cfg.output_name}.safetensors", "sd15", self.modules)
        if self.cancel_after_write:
            raise Cancelled("training was cancelled")
        return SimpleNamespace(lora_path=path, lora=read_lora(path), steps=cfg.max_steps, output_dir=out, curves_path=None,
                               metrics={"loss": 0.5})


@pytest.fixture
def fake_trainer(pack, monkeypatch):
    mods = fakes.unet_modules("sd15", block="down_blocks.0.attentions.0", limit=4)
    fake = _FakeTrainer(mods)
    train_nodes = sys.modules[pack.module.__name__ + ".nodes.train_nodes"]
    monkeypatch.setattr(train_nodes, "train", fake)
    monkeypatch.setattr(train_nodes, "ComfyTrainingHost", fake.host)
    fake.model = fakes.fake_model("sd15", mods)
    return fake


def test_train_node_maps_its_inputs_onto_the_spo_preset_and_publishes_the_lora(pack, fake_trainer):
    (model, path, curves, report), ui = pack.run(
        "SPOTrainLoRA", model=fake_trainer.model, clip=object(), vae=object(), scorer=_jpeg(), prompts="a cat\n\n a dog \n",
        method="spo", preset="auto", sampling_steps=20, guidance_scale=5.0, k=0, batch_size=0, pair_threshold=-1.0,
        **TRAIN_COMMON)
    call = fake_trainer.calls[-1]
    cfg = call.cfg
    assert call.prompts == ["a cat", "a dog"] and cfg.prompt_list == ["a cat", "a dog"]
    assert (cfg.method, cfg.k, cfg.threshold, cfg.beta, cfg.rank, cfg.learning_rate) == ("spo", 4, 0.3, 10.0, 4, 6e-5)
    assert cfg.max_steps == 5 and cfg.seed == 3 and cfg.checkpoint_every == 2 and cfg.resume is None
    assert Path(cfg.output_dir) == pack.base / "output" / "spo_training" / "my_spo"
    assert Path(path) == pack.base / "output" / "loras" / "my_spo.safetensors" and Path(path).is_file()
    assert len(model.patches) == 4 and model is not fake_trainer.model
    assert curves.shape == (1, 64, 64, 3) and "spo LoRA trained for 5 steps" in report
    # overrides: rank sets alpha, k and threshold and batch size replace the preset's
    pack.run("SPOTrainLoRA", model=fake_trainer.model, clip=object(), vae=object(), scorer=_jpeg(), prompts="a cat",
             method="spo", preset="spo-sdxl", sampling_steps=10, guidance_scale=7.0, k=3, batch_size=1, pair_threshold=0.1,
             **{**TRAIN_COMMON, "rank": 16, "learning_rate": 1e-4, "resume": True})
    cfg = fake_trainer.calls[-1].cfg
    assert (cfg.rank, cfg.alpha, cfg.k, cfg.threshold, cfg.inner_steps, cfg.learning_rate) == (16, 16.0, 3, 0.1, 3, 1e-4)
    assert (cfg.steps, cfg.guidance_scale, cfg.sample_batch_size, cfg.train_batch_size, cfg.resume) == (10, 7.0, 1, 1, "auto")


def test_train_node_refuses_bad_input_before_training(pack, fake_trainer):
    kw = dict(model=fake_trainer.model, clip=object(), vae=object(), scorer=_jpeg(), method="spo", preset="auto",
              sampling_steps=20, guidance_scale=5.0, k=0, batch_size=0, pair_threshold=-1.0, **TRAIN_COMMON)
    with pytest.raises(ConfigError, match="the prompt list is empty"):
        pack.run("SPOTrainLoRA", prompts=" \n  ", **kw)
    with pytest.raises(ConfigError, match="preset ddpo is for ddpo, not spo"):
        pack.run("SPOTrainLoRA", prompts="a cat", **{**kw, "preset": "ddpo"})
    with pytest.raises(FileMissingError, match="prompt file not found"):
        pack.run("SPOTrainLoRA", prompts="", prompt_file="missing.txt", **kw)
    (pack.base / "output" / "loras").mkdir(parents=True)
    (pack.base / "output" / "loras" / "my_spo.safetensors").write_bytes(b"someone else's file")
    from spo_core.errors import OutputExistsError

    with pytest.raises(OutputExistsError, match="choose another output_name"):
        pack.run("SPOTrainLoRA", prompts="a cat", **kw)
    assert fake_trainer.calls == []


def test_train_node_reads_a_prompt_file_from_the_input_folder(pack, fake_trainer):
    (pack.base / "input").mkdir()
    (pack.base / "input" / "prompts.json").write_text('[{"caption": "a lake"}, "a hill"]')
    pack.run("SPOTrainLoRA", model=fake_trainer.model, clip=object(), vae=object(), scorer=_jpeg(), prompts="",
             prompt_file="prompts.json", method="spo", preset="auto", sampling_steps=20, guidance_scale=5.0, k=0,
             batch_size=0, pair_threshold=-1.0, **TRAIN_COMMON)
    assert fake_trainer.calls[-1].prompts == ["a lake", "a hill"]


def test_cancelled_training_publishes_the_partial_lora_and_reports_an_interrupt(pack, fake_trainer):
    import comfy.model_management

    fake_trainer.cancel_after_write = True
    with pytest.raises(comfy.model_management.InterruptProcessingException, match="partial LoRA"):
        pack.run("SPOTrainLoRA", model=fake_trainer.model, clip=object(), vae=object(), scorer=_jpeg(), prompts="a cat",
                 method="spo", preset="auto", sampling_steps=20, guidance_scale=5.0, k=0, batch_size=0,
                 pair_threshold=-1.0, **TRAIN_COMMON)
    assert read_lora(pack.base / "output" / "loras" / "my_spo.safetensors").modules


def test_training_progress_turns_the_ui_interrupt_into_the_trainers_cancel(pack):
    import comfy.model_management
    import comfy.utils

    from spo_core.progress import ProgressEvent

    train_nodes = sys.modules[pack.module.__name__ + ".nodes.train_nodes"]
    progress = train_nodes.TrainingProgress(10, "5")
    progress(ProgressEvent("sampling", 1, 4))  # the first round, before any step, moves the bar
    assert comfy.utils.UPDATES[-1][:3] == ("5", 25, 1000)
    progress(ProgressEvent("training", 1, 10))
    assert comfy.utils.UPDATES[-1][:3] == ("5", 100, 1000)
    assert not progress.cancelled()
    comfy.model_management.interrupt_current_processing(True)
    progress(ProgressEvent("sampling", 2, 4))  # must not raise inside the trainer
    assert progress.cancelled()
    assert comfy.utils.UPDATES[-1][:3] == ("5", 150, 1000)


def test_pairs_node_takes_image_batches_or_a_pairs_file(pack, fake_trainer):
    kw = dict(model=fake_trainer.model, clip=object(), vae=object(), method="diffusion_dpo", preset="auto", **TRAIN_COMMON)
    red, blue = torch.zeros(3, 16, 16, 3), torch.ones(3, 16, 16, 3)
    pack.run("SPOTrainLoRAOnPairs", prompts="a square", winners=red, losers=blue, **kw)
    call = fake_trainer.calls[-1]
    assert call.cfg.method == "diffusion_dpo" and call.cfg.beta == 2500.0 and (call.cfg.width, call.cfg.height) == (16, 16)
    assert call.pairs.prompts == ["a square"] * 3 and call.pairs.win.shape[0] == 3
    with pytest.raises(ConfigError, match="3 winner images but 2 loser images"):
        pack.run("SPOTrainLoRAOnPairs", prompts="a square", winners=red, losers=blue[:2], **{**kw, "overwrite": True})
    with pytest.raises(ConfigError, match="2 prompts for 3 pairs"):
        pack.run("SPOTrainLoRAOnPairs", prompts="a\nb", winners=red, losers=blue, **{**kw, "overwrite": True})
    with pytest.raises(ConfigError, match="no preference pairs"):
        pack.run("SPOTrainLoRAOnPairs", prompts="a", **{**kw, "overwrite": True})
    pack.run("SPOTrainLoRAOnPairs", prompts="", pairs_path="pairs.jsonl", **{**kw, "method": "ncp_dpo", "overwrite": True})
    cfg = fake_trainer.calls[-1].cfg
    assert cfg.method == "ncp_dpo" and cfg.pairs == str(pack.base / "input" / "pairs.jsonl") and cfg.width == 512


# -- example workflows ------------------------------------------------------------------------------

STOCK_NODES = {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage",
               "PreviewImage", "PreviewAny", "BasicScheduler", "SamplerCustom", "UNETLoader", "DualCLIPLoader", "VAELoader",
               "FluxGuidance", "EmptySD3LatentImage"}


def test_example_workflows_are_consistent_with_the_nodes(pack):
    from comfy_support.workflows import EXAMPLES, load_examples, ui_to_api, widget_names

    examples = load_examples()
    assert set(examples) == set(EXAMPLES) and len(examples) >= 4
    for name, wf in examples.items():
        ids = {n["id"] for n in wf["nodes"]}
        for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
            source = next(n for n in wf["nodes"] if n["id"] == src)
            target = next(n for n in wf["nodes"] if n["id"] == dst)
            assert source["outputs"][src_slot]["type"] == typ and link_id in source["outputs"][src_slot]["links"]
            assert target["inputs"][dst_slot]["link"] == link_id
        spo = [n for n in wf["nodes"] if n["type"].startswith("SPO")]
        assert spo and {n["type"] for n in wf["nodes"]} <= STOCK_NODES | set(pack.nodes), name
        classes = {n["type"]: pack.nodes[n["type"]] for n in spo}
        sub = {**wf, "nodes": spo, "links": [link for link in wf["links"] if link[3] in {n["id"] for n in spo}]}
        prompt = ui_to_api(sub, classes)
        for node in spo:
            cls = pack.nodes[node["type"]]
            assert len(node["widgets_values"]) == len(widget_names(cls)), (name, node["type"])
            required = cls.INPUT_TYPES()["required"]
            assert set(required) <= set(prompt[str(node["id"])]["inputs"]), (name, node["type"])
        assert ids
