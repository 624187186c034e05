"""The WebUI extension against a stand-in `modules` package (tests/webui_stub): loading the script
the way A1111 does (symlinked and copied installs), registering the tab, settings, script and
sampler, the SPO sampler through KDiffusionSampler compared with spo_core's resampler, and the
WebUI host (folders, queue, busy refusal, list refresh)."""

from __future__ import annotations

import importlib
import sys
import threading
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STUB = Path(__file__).resolve().parent / "webui_stub"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread than on an oversubscribed shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _purge(prefixes):
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            del sys.modules[name]


@pytest.fixture
def webui(tmp_path, monkeypatch):
    """A fake WebUI root with the extension installed by `install.py --webui` (symlink), and the
    stub `modules` importable; yields a namespace with the loaded script module."""
    models = tmp_path / "webui" / "models"
    (models / "Lora").mkdir(parents=True)
    (models / "Stable-diffusion").mkdir()
    (models / "SPO").mkdir()
    (tmp_path / "webui" / "extensions").mkdir()
    monkeypatch.setenv("SPO_STUB_MODELS", str(models))
    monkeypatch.setenv("SPO_STUB_ROOT", str(tmp_path / "webui"))
    _purge(["modules", "spo_webui"])
    monkeypatch.syspath_prepend(str(STUB))
    saved_path = list(sys.path)
    ns = types.SimpleNamespace(root=tmp_path / "webui", models=models)

    def install(copy: bool = False):
        sys.path.insert(0, str(ROOT))
        install_mod = importlib.import_module("install")
        sys.path.remove(str(ROOT))
        target = Path(install_mod.link_webui_extension(str(ns.root), copy=copy))
        from modules import script_callbacks, scripts

        script_callbacks.clear_callbacks()
        scripts.scripts_data.clear()
        ns.target = target
        ns.module = scripts.load_script(str(target / "scripts" / "spo_pack.py"), str(target))
        return ns

    ns.install = install
    yield ns
    sys.path[:] = saved_path
    _purge(["modules", "spo_webui"])


def test_symlinked_install_registers_everything(webui):
    from modules import script_callbacks, scripts, sd_samplers, shared

    ns = webui.install(copy=False)
    assert ns.target.is_symlink()
    ext_dir = str(ns.target.resolve())
    # the loader restored sys.path; on_before_ui puts the pack's folders back for good
    assert ext_dir not in sys.path
    script_callbacks.before_ui_callback()
    assert ext_dir in sys.path and str(ROOT) in sys.path

    from spo_webui.sampler import SAMPLER_NAME

    assert SAMPLER_NAME in sd_samplers.all_samplers_map
    assert sd_samplers.samplers_map["spo"] == SAMPLER_NAME
    # loading again (Reload UI) does not add it twice
    scripts.load_script(str(ns.target / "scripts" / "spo_pack.py"), str(ns.target))
    assert [s.name for s in sd_samplers.all_samplers].count(SAMPLER_NAME) == 1

    titles = {cls().title() for cls in scripts.scripts_data}
    assert "SPO sampler" in titles
    script = next(cls() for cls in scripts.scripts_data if cls().title() == "SPO sampler")
    assert script.show(False) is scripts.AlwaysVisible

    script_callbacks.ui_settings_callback()
    for key in ("spo_scorer_dir", "spo_default_scorer", "spo_default_k", "spo_default_policy", "spo_default_scorer_weights"):
        assert key in shared.opts.data_labels
    assert shared.opts.spo_default_k == 4


def test_copied_install_finds_its_own_core(webui):
    from modules import script_callbacks

    ns = webui.install(copy=True)
    assert not ns.target.is_symlink() and (ns.target / "spo_core" / "lora").is_dir()
    script_callbacks.before_ui_callback()
    assert str(ns.target) in sys.path  # a copy carries spo_core inside the extension folder


def test_tab_and_script_controls_build(webui):
    gr = pytest.importorskip("gradio")
    from modules import script_callbacks, scripts, shared

    webui.install()
    script_callbacks.ui_settings_callback()
    tabs = script_callbacks.ui_tabs_callback()
    assert len(tabs) == 1
    blocks, title, elem_id = tabs[0]
    assert isinstance(blocks, gr.Blocks) and title == "SPO" and elem_id == "spo"
    labels = {getattr(b, "label", None) for b in blocks.blocks.values()}
    assert {"LoRA file", "scorer"} <= labels

    shared.opts.spo_default_k = 6
    (webui.models / "SPO" / "spm.safetensors").write_bytes(b"")
    script = next(cls() for cls in scripts.scripts_data if cls().title() == "SPO sampler")
    with gr.Blocks():
        components = script.ui(False)
    assert [c.value for c in components[:2]] == [6, "greedy"]
    assert "spm.safetensors" in components[5].choices or ("spm.safetensors", "spm.safetensors") in components[5].choices
    keys = [k for _, k in script.infotext_fields if isinstance(k, str)]
    assert {"SPO k", "SPO policy", "SPO scorer"} <= set(keys)
    window = [f for c, f in script.infotext_fields if callable(f)]
    assert window[0]({"SPO window": "100-700"}) == 100.0 and window[1]({"SPO window": "100-700"}) == 700.0


def _processing(sd_model, options, seeds=(11, 12), prompts=("a red cube", "a blue ball")):
    return types.SimpleNamespace(sd_model=sd_model, seeds=list(seeds), all_seeds=list(seeds), prompts=list(prompts),
                                 cfg_scale=5.0, eta=None, steps=6, extra_generation_params={}, spo_options=options,
                                 is_hr_pass=False)


@pytest.fixture(scope="module")
def tiny_model():
    pytest.importorskip("diffusers")
    from spo_core.testing import tiny_sd15_pipeline

    sys.path.insert(0, str(STUB))
    try:
        from fake_model import StubSDModel
    finally:
        sys.path.remove(str(STUB))
    return StubSDModel(tiny_sd15_pipeline(seed=3))


def _conds(model, prompts):
    c = model.backend.encode_prompts(list(prompts))
    return c["cond"], c["uncond"]


def test_sampler_equals_spo_core_resampler(webui, tiny_model):
    """Through KDiffusionSampler (B rows per denoiser call, k calls per pool) the sampler gives
    exactly what spo_core's resampler gives on the whole k*B pool with the same seeds."""
    pytest.importorskip("spo_core.scorers")
    from modules import sd_samplers

    webui.install()
    from spo_core.sampling import ResamplerConfig, TensorConditioning, resample
    from spo_core.scorers import load_scorer
    from spo_webui.options import SPOOptions
    from spo_webui.sampler import SAMPLER_NAME, batch_seed

    options = SPOOptions(k=3, policy="greedy", window_lo=0, window_hi=999, scorer="jpeg_compressibility")
    p = _processing(tiny_model, options)
    cond, uncond = _conds(tiny_model, p.prompts)
    noise = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    sampler = sd_samplers.create_sampler(SAMPLER_NAME, tiny_model)
    out = sampler.sample(p, noise, cond, uncond)

    sigmas = tiny_model.get_sigmas(6)
    be = tiny_model.backend
    ref = resample(be.denoiser(5.0), TensorConditioning({"cond": cond, "uncond": uncond}), noise * sigmas[0], sigmas,
                   be.schedule, load_scorer("jpeg_compressibility"), be.decode, p.prompts,
                   ResamplerConfig(k=3, policy="greedy", window=(0, 999)),
                   generator=torch.Generator().manual_seed(batch_seed(p.seeds)))
    assert ref.pooled_steps == 5  # every step but the last (which ends at sigma 0)
    torch.testing.assert_close(out, ref.x, atol=2e-4, rtol=1e-4)
    # the denoiser's step counter followed the sampling step for every call of a pool
    assert sampler.model_wrap_cfg.steps_seen[:4] == [0, 1, 1, 1]
    info = p.extra_generation_params
    assert info["SPO k"] == 3 and info["SPO policy"] == "greedy" and info["SPO window"] == "0-999"
    assert info["SPO scorer"] == "jpeg_compressibility" and info["SPO pooled steps"] == 5

    # same seeds, same images; other seeds, other candidates
    again = sd_samplers.create_sampler(SAMPLER_NAME, tiny_model).sample(_processing(tiny_model, options), noise, cond, uncond)
    torch.testing.assert_close(again, out)
    other = sd_samplers.create_sampler(SAMPLER_NAME, tiny_model).sample(
        _processing(tiny_model, options, seeds=(5, 6)), noise, cond, uncond)
    assert not torch.allclose(other, out)


def test_sampler_errors_reach_the_page(webui, tiny_model):
    pytest.importorskip("spo_core.scorers")
    from modules import scripts, sd_samplers

    from spo_core.errors import ConfigError, WeightsNotFoundError

    webui.install()
    from spo_webui.options import SPOOptions
    from spo_webui.sampler import SAMPLER_NAME

    cond, uncond = _conds(tiny_model, ["a", "b"])
    noise = torch.randn((2, 4, 16, 16))
    p = _processing(tiny_model, SPOOptions(k=2, scorer="spm", weights=""), prompts=("a", "b"))
    p.spo_options.scorer_dir = webui.models / "SPO"
    with pytest.raises(WeightsNotFoundError, match="models/SPO|SPO"):
        sd_samplers.create_sampler(SAMPLER_NAME, tiny_model).sample(p, noise, cond, uncond)

    script = next(cls() for cls in scripts.scripts_data if cls().title() == "SPO sampler")
    p2 = _processing(tiny_model, None, prompts=("a", "b"))
    script.process(p2, 0, "greedy", 0, 751, "jpeg_compressibility", "None", 1)  # k = 0
    with pytest.raises(ConfigError, match="k must be"):
        sd_samplers.create_sampler(SAMPLER_NAME, tiny_model).sample(p2, noise, cond, uncond)


def test_script_args_and_defaults(webui):
    from modules import scripts, shared

    webui.install()
    from spo_webui.options import SPOOptions, from_args

    opts = from_args([3, "softmax", 100, 700, "jpeg_compressibility", "None", 2])
    assert (opts.k, opts.policy, opts.window_lo, opts.window_hi, opts.scorer, opts.weights, opts.score_every) == \
        (3, "softmax", 100.0, 700.0, "jpeg_compressibility", "", 2)
    assert from_args([5]).k == 5 and from_args([5]).policy == "greedy"  # API callers may give a prefix
    assert opts.infotext()["SPO window"] == "100-700"
    with pytest.raises(Exception, match="policy"):
        from_args([2, "best"])

    shared.opts.spo_default_k = 7
    script = next(cls() for cls in scripts.scripts_data if cls().title() == "SPO sampler")
    p = types.SimpleNamespace()
    script.process(p)  # no args: the settings' defaults
    assert isinstance(p.spo_options, SPOOptions) and p.spo_options.k == 7


def test_webui_host_folders_queue_and_refresh(webui):
    from modules import call_queue, shared

    webui.install()
    from spo_core.errors import ConfigError, FileMissingError
    from spo_core.progress import ProgressEvent
    from spo_core.ui.host import CHECKPOINT, LORA
    from spo_webui.host import WebUIHost

    host = WebUIHost()
    assert host.name == "AUTOMATIC1111" and not host.free_paths
    out = host.output_path(LORA, "my_spo")
    assert out == webui.models / "Lora" / "my_spo.safetensors"
    with pytest.raises(ConfigError, match="plain file name"):
        host.output_path(LORA, "../evil")
    (webui.models / "Lora" / "sub").mkdir()
    (webui.models / "Lora" / "sub" / "a.safetensors").write_bytes(b"x")
    assert host.choices(LORA) == [str(Path("sub") / "a.safetensors")]
    assert host.resolve_input(LORA, "sub/a.safetensors", "LoRA") == (webui.models / "Lora" / "sub" / "a.safetensors").resolve()
    outside = webui.root / "secret.safetensors"
    outside.write_bytes(b"x")
    with pytest.raises(FileMissingError, match="not in the allowed folders"):
        host.resolve_input(LORA, "../../secret.safetensors", "LoRA")
    with pytest.raises(FileMissingError):
        host.resolve_input(CHECKPOINT, str(outside), "checkpoint")

    refreshed = []
    sys.modules["networks"] = types.SimpleNamespace(list_available_networks=lambda: refreshed.append(1))
    try:
        note = host.after_write(LORA, out)
    finally:
        del sys.modules["networks"]
    assert refreshed == [1] and "<lora:my_spo:1>" in note

    # GPU work runs under the queue lock; errors come back as exceptions, not HTML
    seen = {}

    def work():
        seen["locked"] = call_queue.queue_lock.locked()
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        host.run_exclusive(work)
    assert seen["locked"] and not call_queue.queue_lock.locked()

    assert host.busy_reason() is None
    with call_queue.queue_lock:
        assert "generating" in host.busy_reason()
    shared.state.job_count = 1
    try:
        assert "busy" in host.busy_reason()
    finally:
        shared.state.job_count = 0

    host.on_progress(ProgressEvent("train", 3, 10, "step 3"))
    assert (shared.state.sampling_step, shared.state.sampling_steps) == (3, 10)
    assert "train" in shared.state.textinfo
    shared.state.interrupted = True
    assert host.host_cancel()
    shared.state.interrupted = False


def test_long_action_refused_while_generating(webui):
    from modules import call_queue

    webui.install()
    from spo_core.ui.widgets import run_job_handler
    from spo_webui.host import WebUIHost

    ran = []
    with call_queue.queue_lock:
        outputs = list(run_job_handler(WebUIHost(), "t", "Training", lambda: (lambda job: ran.append(1)),
                                       lambda s: ("", ""), 2))
    assert ran == [] and len(outputs) == 1
    assert "cannot start Training now" in outputs[0][0] and "generating" in outputs[0][0]


def test_convert_into_lora_folder_refreshes(webui):
    """The LoRA tools write kohya/webui files with metadata into models/Lora and refresh the list."""
    webui.install()
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from lora_helpers import random_lora, spo_modules
    finally:
        sys.path.remove(str(ROOT / "tests"))
    from spo_core.lora import load_table, read_lora, save_lora
    from spo_core.safe_io import read_safetensors_header
    from spo_core.ui import actions
    from spo_core.ui.host import LORA
    from spo_webui.host import WebUIHost

    table = load_table("sd15")
    src = webui.models / "Lora" / "spo_release_diffusers.safetensors"
    save_lora(random_lora(table, spo_modules(table)), src, fmt="diffusers")
    host = WebUIHost()
    dst = host.output_path(LORA, "spo_webui")
    text = actions.convert_lora_file(host.resolve_input(LORA, src.name, "LoRA"), dst, "webui")
    assert "128 modules" in text
    _, meta = read_safetensors_header(dst)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["ss_base_model_version"] == "sd_v1"
    assert read_lora(dst).source_format.startswith("kohya") or "webui" in read_lora(dst).source_format
    assert not list((webui.models / "Lora").glob("*.partial")) and not list((webui.models / "Lora").glob(".*tmp*"))


def test_model_arch_from_loaded_model(webui, tiny_model):
    from modules import sd_models

    webui.install()
    from spo_webui.host import WebUIHost

    host = WebUIHost()
    assert host.model_arch() is None and "no checkpoint" in host.model_label()
    sd_models.model_data.sd_model = tiny_model
    try:
        assert host.model_arch() == "sd15" and "tiny-sd15" in host.model_label()
    finally:
        sd_models.model_data.sd_model = None


def test_batch_seed_depends_on_every_seed():
    sys.path.insert(0, str(ROOT / "webui_extension"))
    try:
        from spo_webui.sampler import batch_seed
    finally:
        sys.path.remove(str(ROOT / "webui_extension"))
        _purge(["spo_webui"])
    assert batch_seed([1, 2]) == batch_seed([1, 2])
    assert len({batch_seed([1, 2]), batch_seed([2, 1]), batch_seed([1, 3]), batch_seed([1]), batch_seed([1, 2], 1)}) == 5
    assert 0 <= batch_seed([2 ** 40, 7]) < 2 ** 63


def test_forge_flux_predictor_gives_the_flow_schedule_and_refuses_latent_scorers():
    """Forge's Flux predictor (prediction type 'const', mu) makes the sampler use the RF ancestral step that
    Forge's own Euler a runs on Flux (k = 1 is Forge's image); SD predictors keep the discrete schedule."""
    sys.path.insert(0, str(ROOT / "webui_extension"))
    try:
        from spo_webui.sampler import check_flow_scorer, schedule_of
    finally:
        sys.path.remove(str(ROOT / "webui_extension"))
        _purge(["spo_webui"])
    from spo_core.errors import ConfigError
    from spo_core.sampling import NoiseSchedule
    from spo_core.sampling.flow import FlowSchedule, exponential_time_shift

    flux = types.SimpleNamespace(prediction_type="const", mu=1.15, sigmas=exponential_time_shift(1.15, torch.arange(1, 10001) / 10000))
    schedule = schedule_of(types.SimpleNamespace(inner_model=types.SimpleNamespace(predictor=flux, sigmas=flux.sigmas)))
    assert isinstance(schedule, FlowSchedule) and schedule.step == "rf_ancestral" and schedule.mu == 1.15
    assert float(schedule.timestep(0.5)) == 500.0
    sd3 = types.SimpleNamespace(prediction_type="const", shift=3.0)
    assert schedule_of(types.SimpleNamespace(inner_model=types.SimpleNamespace(predictor=sd3))).shift == 3.0
    eps = types.SimpleNamespace(prediction_type="epsilon")
    sd = schedule_of(types.SimpleNamespace(inner_model=types.SimpleNamespace(predictor=eps, sigmas=NoiseSchedule.scaled_linear().sigmas)))
    assert isinstance(sd, NoiseSchedule)
    with pytest.raises(ConfigError, match="rectified-flow"):
        check_flow_scorer(types.SimpleNamespace(name="lrm", input_kind="latent"))
    check_flow_scorer(types.SimpleNamespace(name="spm", input_kind="pixels"))


def test_concurrent_jobs_wait_for_the_queue(webui):
    """A job started while another holds the queue waits for it (FIFO), then runs."""
    from modules import call_queue

    webui.install()
    from spo_webui.host import WebUIHost

    host = WebUIHost()
    order = []
    call_queue.queue_lock.acquire()
    t = threading.Thread(target=lambda: host.run_exclusive(lambda: order.append("job")))
    t.start()
    t.join(0.3)
    order.append("generation done")
    call_queue.queue_lock.release()
    t.join(5)
    assert order == ["generation done", "job"]


class _LDMLike:
    """An ldm-style sd_model over a tiny diffusers pipeline: apply_model(VP input, DDPM t, cond) -> eps."""

    is_sd1, is_sd2, is_sdxl = True, False, False
    parameterization = "eps"

    def __init__(self, stub_model):
        self.backend = stub_model.backend
        self.model = types.SimpleNamespace(diffusion_model=self.backend.unet)
        self.alphas_cumprod = self.backend.pipe.scheduler.alphas_cumprod
        self.scale_factor = 0.18215
        self.sd_checkpoint_info = types.SimpleNamespace(title="tiny [stub]", name_for_extra="tiny", sha256="ab" * 32)

    def apply_model(self, x, t, cond):
        return self.backend.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]

    def get_learned_conditioning(self, prompts):
        ids = self.backend.pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                          return_tensors="pt").input_ids
        return self.backend.pipe.text_encoder(ids)[0]

    def decode_first_stage(self, z):
        return self.backend.decode(z) * 2 - 1


def test_training_host_denoiser_matches_diffusers(webui, tiny_model):
    """The WebUI training host's x0 (VP scaling, DDPM timestep, CFG, cond rows) equals the diffusers
    backend's denoiser on the same UNet; conditioning, decoding and LoRA-reset behave."""
    webui.install()
    from spo_core.sampling import TensorConditioning
    from spo_webui.training import WebUITrainingHost

    sd = _LDMLike(tiny_model)
    sys.modules["networks"] = types.SimpleNamespace(loaded_networks=["some_lora"])
    try:
        host = WebUITrainingHost(sd)
        assert sys.modules["networks"].loaded_networks == []  # the base weights come back on the next forward
    finally:
        del sys.modules["networks"]
    assert host.arch == "sd15" and host.default_size == 512 and host.model_info()["hash"] == "ab" * 32
    cond = host.encode_prompts(["a red cube", "a blue ball"], negative_prompt="blurry")
    ref_cond = tiny_model.backend.encode_prompts(["a red cube", "a blue ball"], negative_prompt=["blurry", "blurry"])
    torch.testing.assert_close(cond.tensors["c"], ref_cond["cond"])
    torch.testing.assert_close(cond.tensors["u"], ref_cond["uncond"])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 3
    sigma = torch.tensor([2.5, 0.7])
    with torch.no_grad():
        got = host.denoiser(5.0)(x, sigma, cond)
        want = tiny_model.backend.denoiser(5.0)(x, sigma, ref_cond)
        rows = host.denoiser(5.0)(x[[1, 1]], sigma[[1, 1]], cond.take(torch.tensor([1, 1])))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows[0], want[1], atol=1e-5, rtol=1e-5)
    # differentiable: gradients reach the input
    xg = x.clone().requires_grad_(True)
    host.denoiser(1.0)(xg, sigma, cond).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    img = host.decode(x[:1] * 0.1)
    assert img.shape == (1, 3, 32, 32) and 0 <= float(img.min()) and float(img.max()) <= 1
    assert host.latent_shape(2) == (2, 4, 64, 64)


def test_training_tab_on_a_forge_flux_checkpoint_says_where_flux_trains(webui):
    from spo_core.errors import ConfigError

    sys.path.insert(0, str(ROOT / "webui_extension"))
    try:
        from spo_webui.training import WebUITrainingHost
    finally:
        sys.path.remove(str(ROOT / "webui_extension"))

    flux = type("Flux", (), {"forge_objects": object(), "is_sdxl": False, "is_sd1": False})()
    with pytest.raises(ConfigError, match="Flux model.*ComfyUI's Train SPO LoRA node or `spo train"):
        WebUITrainingHost(flux)
    other = type("Other", (), {})()
    with pytest.raises(ConfigError, match="not SD1.5, SD2 or SDXL"):
        WebUITrainingHost(other)
