"""Install what the SPO pack needs into the running Python, never upgrading what is there.

Follows the host conventions:
- ComfyUI-Manager / comfy-cli run `python install.py` inside `custom_nodes/<pack>` with
  ComfyUI's interpreter;
- the AUTOMATIC1111 / Forge WebUI runs `webui_extension/install.py` (which calls `main()`
  here) with `launch.run_pip` / `launch.is_installed` available;
- standalone users run `python install.py --extras all`.

Only packages that are missing are installed, and pip is given a constraints file that pins
every distribution already present to its installed version, so installing a missing
package can never move one of the host's pins (gradio, transformers, huggingface_hub,
fastapi, pydantic, diffusers, torch...). torch itself is never installed: it must match the
user's GPU, which only the user (or the host's own installer) knows.

    python install.py                   # what this host needs
    python install.py --extras scorers  # also the optional scorer packages
    python install.py --webui PATH      # link webui_extension/ into PATH/extensions/spo-pack
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.abspath(__file__))

# (distribution name, pip requirement) the pack needs in every host
CORE = [("safetensors", "safetensors>=0.4"), ("numpy", "numpy>=1.23"), ("pillow", "pillow>=9.0"), ("tqdm", "tqdm>=4.60")]
if sys.version_info < (3, 11):  # TOML training configs: tomllib arrived in 3.11 (A1111 runs 3.10)
    CORE.append(("tomli", "tomli>=1.1"))

# optional groups; in a WebUI only the groups that cannot collide with its pins are allowed
EXTRAS = {
    "scorers": [("transformers", "transformers>=4.30"), ("open_clip_torch", "open_clip_torch>=2.20")],
    "diffusers": [("diffusers", "diffusers>=0.27"), ("transformers", "transformers>=4.38"), ("accelerate", "accelerate>=0.24")],
    "peft": [("peft", "peft>=0.10")],
    "ui": [("gradio", "gradio>=3.41")],
}
EXTRAS["all"] = [req for group in ("scorers", "diffusers", "peft", "ui") for req in EXTRAS[group]]

# never installed into a WebUI venv, whatever was asked (their pins keep the WebUI working)
WEBUI_NEVER = {"gradio", "huggingface_hub", "huggingface-hub", "fastapi", "pydantic", "transformers", "diffusers", "peft", "torch"}


def detect_host() -> str:
    """'webui' when the WebUI's launcher is importable, 'comfyui' inside custom_nodes, else 'standalone'."""
    if os.environ.get("SPO_INSTALL_HOST"):
        return os.environ["SPO_INSTALL_HOST"]
    try:
        import launch  # noqa: F401  (A1111/Forge put their root on PYTHONPATH for install.py)

        if hasattr(launch, "run_pip"):
            return "webui"
    except Exception:
        pass
    if os.path.basename(os.path.dirname(ROOT)) == "custom_nodes":
        return "comfyui"
    return "standalone"


def is_installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def installed_constraints() -> str:
    """A pip constraints file pinning every installed distribution to its current version."""
    lines = set()
    for d in importlib.metadata.distributions():
        name, version = d.metadata.get("Name"), d.version
        if name and version and "+" not in version and " " not in version:
            lines.add(f"{name}=={version}")
    fd, path = tempfile.mkstemp(prefix="spo_constraints_", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(sorted(lines)) + "\n")
    return path


def missing(requirements: list[tuple[str, str]], host: str) -> list[str]:
    out = []
    for dist, req in requirements:
        if host == "webui" and dist.lower() in WEBUI_NEVER:
            continue
        if not is_installed(dist) and req not in out:
            out.append(req)
    return out


def pip_install(reqs: list[str], host: str, dry_run: bool = False) -> int:
    if not reqs:
        print("[spo-pack] nothing to install: all requirements are present")
        return 0
    print(f"[spo-pack] installing missing packages: {' '.join(reqs)}")
    if dry_run:
        return 0
    if host == "webui":
        import launch

        for req in reqs:
            launch.run_pip(f"install {req}", f"{req} for spo-pack")
        return 0
    constraints = installed_constraints()
    try:
        cmd = [sys.executable, "-m", "pip", "install", "-c", constraints, *reqs]
        return subprocess.call(cmd)
    finally:
        os.unlink(constraints)


def link_webui_extension(webui: str, copy: bool = False, overwrite: bool = False) -> str:
    """Put webui_extension/ into <webui>/extensions/spo-pack (symlink, or a copy)."""
    ext_dir = os.path.join(os.path.abspath(os.path.expanduser(webui)), "extensions")
    if not os.path.isdir(ext_dir):
        raise SystemExit(f"error: {ext_dir} does not exist; pass the WebUI root folder (the one with webui.py)")
    source = os.path.join(ROOT, "webui_extension")
    target = os.path.join(ext_dir, "spo-pack")
    if os.path.lexists(target):
        if not overwrite:
            raise SystemExit(f"error: {target} exists; pass --overwrite to replace it")
        if os.path.islink(target) or os.path.isfile(target):
            os.unlink(target)
        else:
            shutil.rmtree(target)
    if copy:
        shutil.copytree(source, target)
        # a copied extension cannot reach spo_core next to it: copy the library too
        shutil.copytree(os.path.join(ROOT, "spo_core"), os.path.join(target, "spo_core"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(os.path.join(ROOT, "install.py"), os.path.join(target, "install.py"))
    else:
        os.symlink(source, target, target_is_directory=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extras", default="", help="comma-separated optional groups: " + ", ".join(EXTRAS))
    parser.add_argument("--host", choices=["comfyui", "webui", "standalone"], help="override host detection")
    parser.add_argument("--webui", metavar="PATH", help="link webui_extension/ into this WebUI's extensions/")
    parser.add_argument("--copy", action="store_true", help="with --webui: copy instead of symlinking")
    parser.add_argument("--overwrite", action="store_true", help="with --webui: replace an existing extensions/spo-pack")
    parser.add_argument("--dry-run", action="store_true", help="print what would be installed")
    args = parser.parse_args(argv)

    if args.webui:
        target = link_webui_extension(args.webui, copy=args.copy, overwrite=args.overwrite)
        print(f"[spo-pack] WebUI extension installed at {target}; restart the WebUI")
        return 0

    host = args.host or detect_host()
    reqs = list(CORE)
    for group in filter(None, (g.strip() for g in args.extras.split(","))):
        if group not in EXTRAS:
            raise SystemExit(f"error: unknown extras group {group!r}; choose from {', '.join(EXTRAS)}")
        reqs += EXTRAS[group]
    try:
        import torch  # noqa: F401
    except ImportError:
        print("[spo-pack] torch is not installed: install the build for your GPU first "
              "(https://pytorch.org/get-started/locally/)", file=sys.stderr)
        return 1
    todo = missing(reqs, host)
    skipped = [d for d, _ in reqs if host == "webui" and d.lower() in WEBUI_NEVER and not is_installed(d)]
    if skipped:
        print(f"[spo-pack] not installing {', '.join(skipped)} into the WebUI (its pins must not move); "
              "features that need them say so when used")
    return pip_install(todo, host, dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
