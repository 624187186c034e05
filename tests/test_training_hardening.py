"""The trainer under the failures a new user meets (issue 15): a NaN whose advice must work,
runaway weights never kept as "good", a LoRA to start from that fits nothing, two runs into one
folder, a finished run resumed."""

from __future__ import annotations

import json

import pytest
import torch

from spo_core.errors import ConfigError, LoRAFormatError, TrainingDiverged
from spo_core.lora import save_lora
from spo_core.training import train
from spo_core.training.run_lock import RunLock
from test_training_support import BrightnessScorer, single_thread, spo_config, tiny_host
from test_training_loop import _Wrapped

from lora_helpers import random_lora, spo_modules


@pytest.fixture(scope="module")
def host():
    with single_thread():
        yield tiny_host()


def _events(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_the_advice_after_a_nan_works_resume_with_a_lower_learning_rate(host, tmp_path):
    wrapped = _Wrapped(host)

    def progress(event):
        if event.stage == "training" and event.step == 2:
            wrapped.fail = "nan"

    with pytest.raises(TrainingDiverged) as info:
        train(spo_config(tmp_path, max_steps=4, checkpoint_every=2), wrapped, BrightnessScorer(), progress=progress)
    message = str(info.value)
    assert "resume=auto" in message and "learning_rate=0.000333" in message and "step-000002" in message
    # doing what it says: resume from the last good checkpoint with the lower learning rate
    result = train(spo_config(tmp_path, max_steps=4, resume="auto", learning_rate=3.33e-4), host, BrightnessScorer())
    assert result.steps == 4
    start = [e for e in _events(tmp_path) if e.get("event") == "start"][-1]
    assert start["changed"] == {"learning_rate": [1e-3, 3.33e-4]}


def test_runaway_weights_are_never_kept_as_the_last_good_checkpoint(host, tmp_path):
    from spo_core.training import Trainer

    trainer = Trainer(spo_config(tmp_path, max_steps=5, checkpoint_every=2), host, BrightnessScorer())

    def progress(event):  # after step 2 (checkpointed), the weights run away
        if event.stage == "training" and event.step == 2:
            with torch.no_grad():
                next(iter(trainer.network.branches.values())).up.fill_(1e6)

    trainer.progress = progress
    with pytest.raises(TrainingDiverged, match="LoRA weights") as info:
        trainer.run()
    assert "step-000002" in str(info.value) and "step 3" in str(info.value)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-000002"]
    assert not (tmp_path / "spo_lora.safetensors").exists()  # nothing runaway is published


def test_an_init_lora_that_matches_nothing_is_an_error(host, tmp_path):
    from spo_core.lora.tables import load_table

    sd15 = load_table("sd15")
    other = tmp_path / "sd15.safetensors"
    save_lora(random_lora(sd15, spo_modules(sd15)[:8], rank=4), other)
    with pytest.raises(LoRAFormatError, match="init_lora"):
        train(spo_config(tmp_path / "a", init_lora=str(other)), host, BrightnessScorer())
    # the right model but another rank: named, not a silent fresh start
    table = host.module_table()
    wrong_rank = tmp_path / "rank8.safetensors"
    save_lora(random_lora(table, spo_modules(table), rank=8), wrong_rank)
    with pytest.raises(LoRAFormatError, match="rank 8"):
        train(spo_config(tmp_path / "b", init_lora=str(wrong_rank), rank=4), host, BrightnessScorer())


def test_a_second_run_into_the_same_folder_is_refused(host, tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(ConfigError, match="another training run is writing"):
            train(spo_config(tmp_path, max_steps=1), host, BrightnessScorer())
    assert not (tmp_path / "spo_lora.safetensors").exists()
    assert train(spo_config(tmp_path, max_steps=1), host, BrightnessScorer()).steps == 1  # released: runs


def test_the_lock_is_held_across_processes(tmp_path):
    import subprocess
    import sys

    code = ("import sys, time; from spo_core.training.run_lock import RunLock; "
            f"l = RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"process {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    RunLock(tmp_path).acquire().release()  # a killed holder leaves no stale lock


def test_a_scorer_off_spos_scale_gets_a_calibrated_threshold_and_makes_pairs(host, tmp_path):
    """JPEG sizes differ by bytes between candidates: SPO's 0.3 would make no pair (the WebUI stall).
    The first round's median pool gap becomes the threshold; half of the pools make pairs; a resumed
    run keeps the calibrated value."""
    from spo_core.scorers.jpeg import JPEGCompressibilityScorer

    cfg = spo_config(tmp_path, max_steps=2, checkpoint_every=1, threshold=0.3)
    result = train(cfg, host, JPEGCompressibilityScorer())
    events = _events(tmp_path)
    calibrated = [e for e in events if e.get("event") == "threshold_calibrated"]
    assert len(calibrated) == 1 and 0 < calibrated[0]["threshold"] < 0.3
    rounds = [e for e in events if e.get("event") == "round"]
    assert rounds[0]["pairs"] > 0 and result.steps == 2
    state = json.loads((tmp_path / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["source"]["threshold"] == calibrated[0]["threshold"]
    # asked for explicitly, the threshold is used as it is
    with pytest.raises(Exception, match="no candidate pair passed the threshold 0.3"):
        train(spo_config(tmp_path / "fixed", max_steps=1, threshold=0.3, auto_threshold=False), host,
              JPEGCompressibilityScorer())
