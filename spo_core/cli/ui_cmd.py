"""`spo ui`: the SPO app (Train, Sample, LoRA tools, Score) in the browser, on diffusers models."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("ui", help="serve the SPO app in the browser (127.0.0.1 by default)",
                       description="The same tabs as the WebUI extension, standalone on diffusers models.")
    p.add_argument("--model", help="diffusers model folder (or SD1.5/SDXL .safetensors) for sampling and training; "
                   "'world': the embedded tiny model")
    p.add_argument("--output-dir", default="spo-outputs", help="where LoRAs and merged models are written (default: %(default)s)")
    p.add_argument("--listen", nargs="?", const="0.0.0.0", default="127.0.0.1", metavar="ADDRESS",
                   help="listen on this address instead of 127.0.0.1 (bare --listen: all interfaces)")
    p.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free one)")
    p.add_argument("--device", help="cuda, cuda:1, cpu, mps (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="model dtype (default: fp16 on GPU, fp32 on CPU)")
    p.set_defaults(handler=_ui)


def _check_port(listen: str, port: int) -> None:
    import socket

    from ..errors import ConfigError

    with socket.socket() as s:
        try:
            s.bind((listen, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {listen}:{port} ({exc.strerror or exc}): another program uses that port; "
                              "pick another with --port, or leave --port out for the next free one") from None


def _ui(args: argparse.Namespace) -> int:
    from ..errors import require
    from ..model_names import is_world
    from ..safe_io import check_exists

    if args.model and not is_world(args.model):
        check_exists(args.model, "model")
    if args.port is not None:
        _check_port(args.listen, args.port)
    require("gradio", "spo ui", "ui")
    from ..ui import StandaloneHost, launch

    host = StandaloneHost(output_dir=args.output_dir, model=args.model, device=args.device, dtype=args.dtype)
    launch(host, listen=args.listen, port=args.port, block=True)
    return 0
