"""The shared UI (spo_core.ui) on the installed gradio, standalone host: jobs (progress, stop,
errors in the page), paths, the LoRA tools, scoring, sampling and training on tiny models."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from spo_core.errors import Cancelled, ConfigError, LoRAFormatError, ModelMismatchError, OutputExistsError
from spo_core.progress import ProgressEvent, Reporter
from spo_core.ui import StandaloneHost, clean_output_name
from spo_core.ui.jobs import Job, describe_error, progress_html

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# -- jobs -------------------------------------------------------------------------------------------

def test_job_reports_progress_and_result():
    def work(job):
        r = Reporter("extract", 3, job.progress, job.cancelled)
        for i in range(3):
            r.update(i + 1, f"layer {i}", loss=1.0 / (i + 1))
        return "ok"

    job = Job("Extract", work).start()
    state = job.wait(10)
    assert state.status == "done" and state.result == "ok" and state.step == 3 and state.total == 3
    assert [h["loss"] for h in state.history] == [1.0, 0.5, pytest.approx(1 / 3)]
    html = progress_html(state)
    assert "width:100%" in html and "done" in html


def test_job_stop_and_errors_become_messages():
    started = threading.Event()

    def slow(job):
        r = Reporter("train", 1000, job.progress, job.cancelled)
        for i in range(1000):
            started.set()
            time.sleep(0.01)
            r.update(i + 1)

    job = Job("Training", slow).start()
    assert started.wait(5)
    job.stop()
    state = job.wait(10)
    assert state.status == "stopped" and 0 < state.step < 1000

    failed = Job("Convert", lambda job: (_ for _ in ()).throw(LoRAFormatError("x.safetensors: no key matches"))).start().wait(5)
    assert failed.status == "failed" and failed.error == "x.safetensors: no key matches"
    assert "Convert failed" in progress_html(failed) and "spo-error" in progress_html(failed)

    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "Out of GPU memory during training" in describe_error(oom, "training")
    assert describe_error(Cancelled("merge was cancelled"), "Merge") == "Merge was stopped."
    assert describe_error(Cancelled("nothing was trained yet"), "Training") == "Training was stopped: nothing was trained yet"
    assert "KeyError" in describe_error(KeyError("k"), "Score")


def test_host_runner_holds_the_gpu_lock():
    host = StandaloneHost("/tmp/unused")
    seen = {}

    def work(job):
        seen["busy"] = host.busy_reason()
        return 1

    Job("A", work, runner=host.run_exclusive).start().wait(5)
    assert "another job" in seen["busy"] and host.busy_reason() is None


# -- host paths -------------------------------------------------------------------------------------

def test_output_names_and_paths(tmp_path):
    assert clean_output_name(" my_lora.safetensors ") == "my_lora"
    for bad in ("", "../x", "a/b", "a\\b", "..", "x;rm"):
        with pytest.raises(ConfigError):
            clean_output_name(bad)
    host = StandaloneHost(tmp_path / "out")
    assert host.output_path("lora", "a") == tmp_path / "out" / "a.safetensors"
    assert host.output_path("lora", str(tmp_path / "x" / "b.safetensors")) == tmp_path / "x" / "b.safetensors"
    assert host.training_dir("run1") == tmp_path / "out" / "train" / "run1"
    with pytest.raises(Exception, match="not found"):
        host.resolve_input("lora", str(tmp_path / "missing.safetensors"), "LoRA file")
    with pytest.raises(ConfigError, match="choose a LoRA"):
        host.resolve_input("lora", "  ", "LoRA file")


# -- LoRA tools -------------------------------------------------------------------------------------

def _spo_lora(path: Path, arch: str = "sd15", fmt: str = "diffusers") -> Path:
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from lora_helpers import random_lora, spo_modules
    finally:
        sys.path.remove(str(ROOT / "tests"))
    from spo_core.lora import load_table, save_lora

    table = load_table(arch)
    save_lora(random_lora(table, spo_modules(table)), path, fmt=fmt)
    return path


def test_inspect_convert_and_refusals(tmp_path):
    from spo_core.lora import read_lora
    from spo_core.safe_io import read_safetensors_header
    from spo_core.ui import actions

    src = _spo_lora(tmp_path / "spo.safetensors")
    text, data = actions.inspect_lora(src, model_arch="sd15")
    assert "sd15" in text and data["modules"] == 128 and "model_mismatch" not in data
    text, data = actions.inspect_lora(src, model_arch="sdxl")
    assert text.startswith("warning: this LoRA is for SD1.5 but the loaded model is SDXL")

    dst = tmp_path / "out" / "spo_webui.safetensors"
    dst.parent.mkdir()
    msg = actions.convert_lora_file(src, dst, "webui", "fp16")
    assert "wrote" in msg
    _, meta = read_safetensors_header(dst)
    assert meta["ss_network_module"] == "networks.lora" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert read_lora(dst).modules.keys() == read_lora(src).modules.keys()
    with pytest.raises(OutputExistsError):
        actions.convert_lora_file(src, dst, "webui")
    with pytest.raises(ModelMismatchError, match="SDXL"):
        actions.check_lora_for_model("sdxl", "sd15", "the LoRA x")


def test_merge_refuses_a_lora_for_another_model(tmp_path):
    from safetensors.torch import save_file

    from spo_core.ui import actions

    # an SD1.5-shaped single-file checkpoint (the reader tells SD1.5 from SDXL by the cross-attention width)
    ckpt = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(640, 768)}, ckpt)
    lora = _spo_lora(tmp_path / "xl.safetensors", arch="sdxl", fmt="webui")
    with pytest.raises(ModelMismatchError, match="sdxl"):
        actions.merge_lora_file(ckpt, lora, tmp_path / "merged.safetensors")
    assert not (tmp_path / "merged.safetensors").exists()


# -- score ------------------------------------------------------------------------------------------

def test_score_files_ranks_by_jpeg_size(tmp_path):
    pytest.importorskip("spo_core.scorers")
    from spo_core.ui import actions

    flat, noisy = tmp_path / "flat.png", tmp_path / "noisy.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(flat)
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand((64, 64, 3), generator=g) * 255).to(torch.uint8).numpy()).save(noisy)
    scorer = actions.SCORERS.get("jpeg_incompressibility", None)
    rows = actions.score_files([str(flat), str(noisy)], "", scorer)
    assert [Path(p).name for p, _ in rows] == ["noisy.png", "flat.png"] and rows[0][1] > rows[1][1]
    assert actions.SCORERS.get("jpeg_incompressibility", None) is scorer  # cached
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(Exception, match="cannot read the image bad.png"):
        actions.score_files([str(bad)], "", scorer)
    with pytest.raises(ConfigError, match="no images"):
        actions.score_files([], "", scorer)
    assert actions.image_paths([str(flat), {"path": str(noisy)}, type("F", (), {"name": "x.png"})()]) == \
        [str(flat), str(noisy), "x.png"]


def test_missing_scorer_weights_message():
    pytest.importorskip("spo_core.scorers")
    from spo_core.errors import FileMissingError
    from spo_core.ui import actions

    with pytest.raises(FileMissingError, match="weights"):
        actions.SCORERS.get("spm", None)
    with pytest.raises(FileMissingError):
        actions.SCORERS.get("spm", "/nonexistent/spm.safetensors")


# -- the Blocks on the installed gradio -------------------------------------------------------------

def test_blocks_build_with_every_tab(tmp_path):
    gr = pytest.importorskip("gradio")
    from spo_core.ui import build_blocks

    demo = build_blocks(StandaloneHost(tmp_path))
    assert isinstance(demo, gr.Blocks)
    config = demo.get_config_file()
    labels = {c.get("props", {}).get("label") for c in config["components"]}
    for label in ("prompts (one per line)", "LoRA file", "images", "k candidates (fk: particles)", "loss / reward", "scorer"):
        assert label in labels, label
    api_names = {d.get("api_name") for d in config.get("dependencies", [])}
    assert {"train", "sample", "lora_inspect", "lora_convert", "lora_extract", "lora_merge", "score"} <= api_names


def test_picking_fk_moves_the_window_top_to_its_default_and_back(tmp_path):
    """FK pools over the whole trajectory (0:999, as `spo sample` and the ComfyUI node default), the chain policies
    in SPO's t <= 751: clicking the policy moves the field between the two, and leaves a typed value alone."""
    pytest.importorskip("gradio")
    from spo_core.ui import build_blocks

    demo = build_blocks(StandaloneHost(tmp_path))
    config = demo.get_config_file()
    ids = {c.get("props", {}).get("label"): c["id"] for c in config["components"]}
    policy, hi = ids["policy (fk: Feynman-Kac particles)"], ids["window: highest timestep"]
    index, dep = next((i, d) for i, d in enumerate(config["dependencies"])
                      if [policy, "input"] in [list(t) for t in d["targets"]])
    assert dep["inputs"] == [policy, hi] and dep["outputs"] == [hi]
    fn = (demo.fns[dep["id"]] if isinstance(demo.fns, dict) else demo.fns[index]).fn
    assert (fn("fk", 751), fn("greedy", 999), fn("softmax", 751), fn("fk", 600), fn("greedy", 600)) == (999, 751, 751, 600, 600)


# -- sampling and training on tiny models -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    from spo_core.testing import tiny_sd15_pipeline

    folder = tmp_path_factory.mktemp("tiny") / "tiny-sd15"
    tiny_sd15_pipeline(seed=0).save_pretrained(folder)
    return folder


def test_the_app_draws_the_same_image_as_the_cli(tmp_path, tiny_folder):
    pytest.importorskip("spo_core.scorers")
    import numpy as np

    from spo_core.cli import main
    from spo_core.ui.tab_sample import SampleSettings, run_sampling

    host = StandaloneHost(tmp_path, model=str(tiny_folder))
    be = host.backend()
    for k, extra in ((1, []), (3, ["--scorer", "jpeg_compressibility", "--window", "0:999"])):
        settings = SampleSettings("a red cube", steps=5, cfg=4.0, seed=3, schedule="SPO DDIM", k=k, window_hi=999)
        from spo_core.scorers import load_scorer

        out = run_sampling(be, settings, load_scorer("jpeg_compressibility") if k > 1 else None)
        png = tmp_path / f"cli_{k}.png"
        assert main(["sample", "--model", str(tiny_folder), "--prompt", "a red cube", "--steps", "5", "--guidance-scale", "4",
                     "--seed", "3", "--k", str(k), *extra, "--out", str(png), "--no-progress"]) == 0
        cli = np.asarray(Image.open(png)).astype(int)
        app = (out["pixels"].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy().astype(int)
        assert np.abs(cli - app).max() == 0, k
        assert min(out["image"].size) >= 256  # a 32 px image is shown enlarged, not as a speck
    assert "5 steps" in out["summary"] and out["grid"] is not None and "3 candidates" in out["summary"]
    pooled = run_sampling(be, SampleSettings("a red cube", steps=5, seed=3, schedule="Karras", k=3, window_hi=999),
                          load_scorer("jpeg_compressibility"))
    assert pooled["grid"] is not None
    with pytest.raises(ConfigError, match="prompt is empty"):
        run_sampling(be, SampleSettings("  "), None)


def _form(**kw):
    from spo_core.ui.tab_train import TrainForm

    base = dict(method="spo", prompts_text="a red cube\na blue ball", scorer="jpeg_incompressibility", max_steps=2, k=2,
                steps=6, sample_batch_size=2, train_batch_size=2, checkpoint_every=0, validate_every=-1,
                output_name="t1", extra={"threshold": 0.0})
    base.update(kw)
    return TrainForm(**base)


def test_train_writes_a_webui_lora_and_refuses_overwrite(tmp_path, tiny_folder):
    pytest.importorskip("spo_core.scorers")
    from spo_core.safe_io import read_safetensors_header
    from spo_core.ui.tab_train import run_training

    host = StandaloneHost(tmp_path, model=str(tiny_folder))
    result = run_training(host, _form())
    lora = Path(result["lora"])
    assert lora == tmp_path / "t1.safetensors" and result["steps"] == 2 and not result["stopped"]
    tensors, meta = read_safetensors_header(lora)
    assert meta["spo_method"] == "spo" and meta["ss_steps"] == "2" and meta["ss_network_module"] == "networks.lora"
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in tensors)
    assert [h["step"] for h in result["history"]] == [1, 2] and "loss" in result["history"][0]
    with pytest.raises(OutputExistsError, match="exists"):
        run_training(host, _form())
    with pytest.raises(ConfigError, match="prompt list is empty"):
        run_training(host, _form(prompts_text="", output_name="t2"))
    assert not (tmp_path / "t2.safetensors").exists()


def test_train_stop_saves_what_it_has(tmp_path, tiny_folder):
    pytest.importorskip("spo_core.scorers")
    from spo_core.ui.tab_train import run_training

    host = StandaloneHost(tmp_path, model=str(tiny_folder))
    events: list[ProgressEvent] = []

    def work(job):
        return run_training(host, _form(max_steps=50, output_name="stopped"), job)

    job = Job("Training", work)
    orig = job.progress

    def progress(event):
        orig(event)
        events.append(event)
        if event.stage == "training" and event.step >= 2:
            job.stop()

    job.progress = progress
    state = job.start().wait(120)
    assert state.status == "stopped", state.error  # not "done 50/50"
    assert f"{state.step}/50" in progress_html(state) and "stopped" in progress_html(state)
    r = state.result
    assert r["stopped"] and "cancelled at step" in r["stopped"]
    assert Path(r["lora"]).is_file() and not list(tmp_path.glob("*.partial"))
    from spo_core.safe_io import read_safetensors_header

    steps = int(read_safetensors_header(r["lora"])[1]["ss_steps"])
    assert 2 <= steps < 50


def test_cli_progress_bar_counts_time_from_the_stage_start():
    """A stage's first report may come after a chunk of work: its bar must not show a huge rate."""
    from spo_core.progress import ProgressEvent, TqdmProgress

    bars = TqdmProgress(disable=False, file=io.StringIO())
    bars(ProgressEvent(stage="sampling", step=32, total=48, elapsed_s=4.0))
    fmt = bars.bars["sampling"].format_dict
    assert fmt["elapsed"] >= 4.0 and 32 / fmt["elapsed"] < 9
    bars.close()


# -- hardening from real use (issue 15) ------------------------------------------------------------

def test_stop_before_the_first_step_publishes_nothing(tmp_path, tiny_folder):
    pytest.importorskip("spo_core.scorers")
    from spo_core.ui.tab_train import run_training

    host = StandaloneHost(tmp_path, model=str(tiny_folder))

    def work(job):
        return run_training(host, _form(max_steps=5, output_name="early"), job)

    job = Job("Training", work)
    orig = job.progress

    def progress(event):
        orig(event)
        if event.stage == "sampling":
            job.stop()  # inside the first sampling round: no optimizer step yet

    job.progress = progress
    state = job.start().wait(120)
    assert state.status == "stopped" and "nothing was trained" in state.error
    assert not list(host.folders("lora")[0].glob("early*")), "an untrained LoRA was published"


def test_the_bar_counts_training_steps_not_sampling_substeps():
    def work(job):
        for step in range(1, 4):
            for sub in range(1, 21):
                job.progress(ProgressEvent("sampling", sub, 20, "sampling candidate pools"))
            job.progress(ProgressEvent("training", step, 3, f"spo step {step}/3", {"loss": 0.5}))
            if step == 1:
                job.progress(ProgressEvent("warning", step, 3, "no candidate pair passed the threshold"))
        return "ok"

    seen = []
    job = Job("Training", work, main_stage="training", total=3)
    orig = job.progress

    def spy(event):
        orig(event)
        seen.append((job.state.step, job.state.total))

    job.progress = spy
    state = job.start().wait(10)
    assert all(total == 3 for _, total in seen) and max(step for step, _ in seen) == 3
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)  # never jumps back to a sampling sub-step
    assert "no candidate pair passed" in progress_html(state)


def test_a_running_status_carries_a_notice_for_a_dead_server():
    from spo_core.ui.jobs import JobState

    running = progress_html(JobState("Training", status="running", step=1, total=5))
    assert "spo-stale" in running and "may have stopped" in running and "animation" in running
    assert "spo-stale" not in progress_html(JobState("Training", status="done", step=5, total=5))


def test_the_form_exposes_threshold_and_beta_and_auto_picks_the_world_preset(tmp_path):
    from spo_core.ui.tab_train import TrainForm, build_config

    form = TrainForm(method="spo", prompts_text="a red circle", threshold=0.05, beta=50)
    cfg = build_config(form, "custom-sd1", tmp_path, world=True)
    assert (cfg.threshold, cfg.beta, cfg.preset, cfg.learning_rate) == (0.05, 50.0, "spo-world", 3e-3)
    keep = build_config(TrainForm(method="spo", prompts_text="a"), "sd15", tmp_path)
    assert (keep.threshold, keep.beta, keep.preset) == (0.3, 10.0, "spo-sd15")
    assert build_config(TrainForm(method="spo", prompts_text="a"), "sdxl", tmp_path).preset == "spo-sdxl"


def test_the_app_trains_grpo_on_the_worlds_flow_model_and_samples_it(tmp_path):
    """world-flow in the app: the Train tab picks the world's flow preset and SPM, writes a LoRA of the
    transformer (kohya MMDiT names); the Sample tab draws on the same FlowBackend."""
    pytest.importorskip("spo_core.scorers")
    from spo_core.safe_io import read_safetensors_header
    from spo_core.ui.tab_sample import SampleSettings, run_sampling
    from spo_core.ui.tab_train import TrainForm, build_config, run_training

    host = StandaloneHost(tmp_path, model="world-flow")
    form = TrainForm(method="grpo", prompts_text="a red circle\na blue square", scorer="spm", max_steps=1, steps=4,
                     sample_batch_size=2, train_batch_size=4, checkpoint_every=0, validate_every=-1, output_name="flow1",
                     extra={"group_size": 2})
    result = run_training(host, form)
    tensors, meta = read_safetensors_header(Path(result["lora"]))
    assert meta["spo_method"] == "grpo" and result["steps"] == 1
    assert any(k.startswith("lora_unet_joint_blocks_0_x_block_attn_qkv.") for k in tensors)
    assert build_config(TrainForm(method="spo", prompts_text="a"), "world-flow", tmp_path, world=True, flow=True).preset == \
        "spo-world-flow"
    with pytest.raises(ConfigError, match="rectified-flow"):
        build_config(TrainForm(method="lpo", prompts_text="a"), "world-flow", tmp_path, world=True, flow=True)
    out = run_sampling(host.backend(), SampleSettings("a red circle", steps=4, seed=1, schedule="Karras", k=1), None)
    assert out["pixels"].shape[-1] == 32


def test_no_pairs_are_reported_within_two_rounds_with_what_to_change(tmp_path, tiny_folder):
    pytest.importorskip("spo_core.scorers")
    from spo_core.ui.tab_train import run_training

    host = StandaloneHost(tmp_path, model=str(tiny_folder))
    warnings = []

    def work(job):
        return run_training(host, _form(max_steps=1, output_name="nopairs", extra={"threshold": 0.999, "auto_threshold": False}), job)

    job = Job("Training", work, main_stage="training", total=1)
    orig = job.progress

    def progress(event):
        orig(event)
        if event.stage == "warning":
            warnings.append(event.message)
            job.stop()

    job.progress = progress
    state = job.start().wait(120)
    assert len(warnings) == 1 and "in 2 sampling rounds" in warnings[0] and "Lower the threshold to about" in warnings[0]
    assert "Lower the threshold" in progress_html(state)


def test_the_app_on_the_world_needs_no_scorer_weights(tmp_path):
    pytest.importorskip("spo_core.scorers")
    from spo_core.ui.tab_sample import SampleSettings, run_sampling
    from spo_core.ui.tab_score import load_scorer_for

    host = StandaloneHost(tmp_path, model="world")
    scorer = load_scorer_for(host, "spm", "")
    out = run_sampling(host.backend(), SampleSettings("a red circle", steps=4, k=2, window_hi=999), scorer)
    assert out["grid"] is not None and out["image"].size[0] >= 256


def test_the_inspect_status_is_green_only_for_a_clean_lora():
    from spo_core.ui.tab_lora import inspect_status

    assert inspect_status("a", {"ok": True, "format": "kohya", "arch": "sd15", "modules": 128})[1] == "ok"
    text, kind = inspect_status("b", {"ok": False, "arch": "unknown", "unmatched": ["x"] * 32, "problems": []})
    assert kind == "error" and "32" in text
    assert inspect_status("c", {"ok": True, "model_mismatch": "for sdxl, loaded sd15"})[1] == "error"
