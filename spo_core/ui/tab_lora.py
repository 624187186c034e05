"""The LoRA tools tab: inspect, convert, extract from a fine-tuned checkpoint, merge, resize."""

from __future__ import annotations

from . import actions
from .host import CHECKPOINT, LORA, UIHost
from .jobs import Job, message_html, progress_html
from .widgets import file_picker, g_update, gr, quick_handler, run_job_handler, status_box

FORMATS = ["webui", "diffusers", "peft"]
DTYPES = ["keep", "fp16", "bf16", "fp32"]


def inspect_status(name: str, data: dict) -> tuple[str, str]:
    """The status line of an inspection: green only when every key was used and the LoRA fits."""
    if data.get("model_mismatch"):
        return f"{name}: {data['model_mismatch']}", "error"
    if not data.get("ok"):
        issues = len(data.get("unmatched", [])) + len(data.get("problems", []))
        return (f"{name}: {data['arch']}, {issues} keys or modules cannot be used (see the report); it would load only "
                "partially or not at all", "error")
    return f"{name}: {data['format']} LoRA for {data['arch']}, {data['modules']} modules, all keys used", "ok"


def build_lora_tab(host: UIHost) -> None:
    g = gr()
    with g.Tab("LoRA tools", elem_id="spo_lora_tools"):
        g.Markdown("Read any LoRA format (diffusers, PEFT, kohya/webui, LDM names, ComfyUI), convert it, extract one from "
                   "a fine-tuned checkpoint, merge one into a checkpoint. The `webui` format loads as `<lora:name:1>`.")
        with g.Tab("Inspect"):
            src = file_picker(host, LORA, "LoRA file", elem_id="spo_inspect_src")
            btn = g.Button("Inspect", variant="primary", elem_id="spo_inspect_btn")
            status = status_box(elem_id="spo_inspect_status")
            report = g.Textbox(label="report", lines=16, max_lines=60, interactive=False, elem_id="spo_inspect_report")

            def inspect(path):
                p = host.resolve_input(LORA, path, "LoRA file")
                text, data = actions.inspect_lora(p, host.model_arch())
                return message_html(*inspect_status(p.name, data)), text

            btn.click(quick_handler("Inspect", inspect, 2), inputs=[src], outputs=[status, report], api_name="lora_inspect")

        with g.Tab("Convert"):
            src = file_picker(host, LORA, "LoRA file", elem_id="spo_convert_src")
            with g.Row():
                fmt = g.Radio(FORMATS, value="webui", label="to format")
                dtype = g.Dropdown(DTYPES, value="keep", label="dtype")
            out = g.Textbox(label="output name" + ("" if host.free_paths else " (written to the LoRA folder)"),
                            placeholder="spo_lora_webui", elem_id="spo_convert_out")
            with g.Row():
                overwrite = g.Checkbox(label="overwrite", value=False)
                partial = g.Checkbox(label="allow a partial match", value=False)
            btn = g.Button("Convert", variant="primary", elem_id="spo_convert_btn")
            status = status_box(elem_id="spo_convert_status")

            def convert(path, fmt_, dtype_, name, over, allow):
                p = host.resolve_input(LORA, path, "LoRA file")
                dst = host.output_path(LORA, name, suffix="/" if fmt_ == "peft" else ".safetensors")
                text = actions.convert_lora_file(p, dst, fmt_, dtype_, bool(over), bool(allow))
                note = host.after_write(LORA, dst)
                return (message_html(text.replace("\n", " | ") + (f" | {note}" if note else ""), "ok"),)

            btn.click(quick_handler("Convert", convert, 1), inputs=[src, fmt, dtype, out, overwrite, partial],
                      outputs=[status], api_name="lora_convert")

        with g.Tab("Extract"):
            g.Markdown("Factorize `tuned - base` layer by layer (SVD). For the SPO-SDXL release (a full UNet) pick SDXL base "
                       "and the SPO checkpoint.")
            base = file_picker(host, CHECKPOINT, "base checkpoint")
            tuned = file_picker(host, CHECKPOINT, "fine-tuned checkpoint")
            with g.Row():
                rank = g.Number(value=32, precision=0, label="rank (cap when energy is set)")
                energy = g.Number(value=0, label="energy fraction (0 = fixed rank, e.g. 0.9)")
                conv_rank = g.Number(value=0, precision=0, label="3x3 conv rank (0 = none)")
            with g.Row():
                method = g.Radio(["randomized", "full"], value="randomized", label="SVD")
                te = g.Radio(["auto", "yes", "no"], value="auto", label="text encoders")
                dtype = g.Dropdown(["fp16", "bf16", "fp32"], value="fp16", label="dtype")
            out = g.Textbox(label="output name", placeholder="extracted_lora")
            overwrite = g.Checkbox(label="overwrite", value=False)
            with g.Row():
                btn = g.Button("Extract", variant="primary")
                stop = g.Button("Stop")
            status = status_box()
            report = g.Textbox(label="per-layer report", lines=12, interactive=False)

            def extract(base_, tuned_, rank_, energy_, conv_, method_, te_, dtype_, name, over):
                def prepare():
                    b = host.resolve_input(CHECKPOINT, base_, "base checkpoint")
                    t = host.resolve_input(CHECKPOINT, tuned_, "fine-tuned checkpoint")
                    dst = host.output_path(LORA, name)

                    def work(job: Job) -> str:
                        text = actions.extract_lora_file(
                            b, t, dst, int(rank_ or 0) or None, float(energy_ or 0) or None, method_, te_,
                            int(conv_ or 0) or None, "webui", dtype_, host.device, bool(over), job.progress, job.cancelled)
                        note = host.after_write(LORA, dst)
                        return text + (f"\n{note}" if note else "")
                    return work

                yield from run_job_handler(host, "extract", "Extract", prepare,
                                           lambda s: (progress_html(s), s.result if s.status == "done" else g_update()), 2)

            btn.click(extract, inputs=[base, tuned, rank, energy, conv_rank, method, te, dtype, out, overwrite],
                      outputs=[status, report], api_name="lora_extract")
            stop.click(lambda: _stop("extract"), inputs=None, outputs=[status])

        with g.Tab("Merge"):
            ckpt = file_picker(host, CHECKPOINT, "checkpoint")
            lora = file_picker(host, LORA, "LoRA file")
            strength = g.Slider(minimum=-2.0, maximum=2.0, step=0.05, value=1.0, label="strength")
            out = g.Textbox(label="output name" + ("" if host.free_paths else " (written to the checkpoint folder)"),
                            placeholder="merged_model")
            with g.Row():
                overwrite = g.Checkbox(label="overwrite", value=False)
                partial = g.Checkbox(label="allow a partial match", value=False)
            with g.Row():
                btn = g.Button("Merge", variant="primary")
                stop = g.Button("Stop")
            status = status_box()
            result = g.Textbox(label="result", lines=2, interactive=False)

            def merge(ckpt_, lora_, strength_, name, over, allow):
                def prepare():
                    c = host.resolve_input(CHECKPOINT, ckpt_, "checkpoint")
                    lp = host.resolve_input(LORA, lora_, "LoRA file")
                    dst = host.output_path(CHECKPOINT, name, suffix="/" if c.is_dir() else ".safetensors")

                    def work(job: Job) -> str:
                        text = actions.merge_lora_file(c, lp, dst, float(strength_), bool(allow), bool(over),
                                                       progress=job.progress, cancel=job.cancelled)
                        note = host.after_write(CHECKPOINT, dst)
                        return text + (f"\n{note}" if note else "")
                    return work

                yield from run_job_handler(host, "merge", "Merge", prepare,
                                           lambda s: (progress_html(s), s.result if s.status == "done" else g_update()), 2,
                                           exclusive=False)

            btn.click(merge, inputs=[ckpt, lora, strength, out, overwrite, partial], outputs=[status, result],
                      api_name="lora_merge")
            stop.click(lambda: _stop("merge"), inputs=None, outputs=[status])

        with g.Tab("Resize"):
            src = file_picker(host, LORA, "LoRA file")
            with g.Row():
                rank = g.Number(value=8, precision=0, label="new rank (cap when energy is set)")
                energy = g.Number(value=0, label="energy fraction (0 = fixed rank)")
            out = g.Textbox(label="output name", placeholder="resized_lora")
            overwrite = g.Checkbox(label="overwrite", value=False)
            btn = g.Button("Resize", variant="primary")
            status = status_box()

            def resize(path, rank_, energy_, name, over):
                p = host.resolve_input(LORA, path, "LoRA file")
                dst = host.output_path(LORA, name)
                text = actions.resize_lora_file(p, dst, int(rank_ or 0) or None, float(energy_ or 0) or None, bool(over))
                note = host.after_write(LORA, dst)
                return (message_html(text.replace("\n", " | ") + (f" | {note}" if note else ""), "ok"),)

            btn.click(quick_handler("Resize", resize, 1), inputs=[src, rank, energy, out, overwrite], outputs=[status],
                      api_name="lora_resize")


def _stop(key: str) -> str:
    from .widgets import ACTIVE

    return ACTIVE.stop(key)

