"""folder_paths stand-in: the real lookup rules over folders a test points at `base_path`."""

import os

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
base_path = os.environ.get("SPO_STUB_COMFY_BASE", "/nonexistent-comfy-base")
models_dir = os.path.join(base_path, "models")
output_directory = os.path.join(base_path, "output")
folder_names_and_paths: dict = {}


def reset(base: str) -> None:
    """Point every folder at `base` (called by the test fixture)."""
    global base_path, models_dir, output_directory
    base_path = base
    models_dir = os.path.join(base, "models")
    output_directory = os.path.join(base, "output")
    folder_names_and_paths.clear()
    for name in ("checkpoints", "loras", "diffusion_models", "vae"):
        folder_names_and_paths[name] = ([os.path.join(models_dir, name)], set(supported_pt_extensions))


def map_legacy(name):
    return {"unet": "diffusion_models", "clip": "text_encoders"}.get(name, name)


def add_model_folder_path(folder_name, full_folder_path, is_default=False):
    folder_name = map_legacy(folder_name)
    if folder_name in folder_names_and_paths:
        paths = folder_names_and_paths[folder_name][0]
        if full_folder_path not in paths:
            paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)
    else:
        folder_names_and_paths[folder_name] = ([full_folder_path], set())


def get_folder_paths(folder_name):
    return folder_names_and_paths[map_legacy(folder_name)][0][:]


def get_output_directory():
    return output_directory


def get_input_directory():
    return os.path.join(base_path, "input")


def _ok(name, exts):
    return not exts or os.path.splitext(name)[1].lower() in exts


def get_filename_list(folder_name):
    paths, exts = folder_names_and_paths[map_legacy(folder_name)]
    out = set()
    for root in paths:
        if not os.path.isdir(root):
            continue
        for d, _dirs, files in os.walk(root, followlinks=True):
            for f in files:
                if _ok(f, exts):
                    out.add(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
    return sorted(out)


def get_full_path(folder_name, filename):
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        return None
    for root in folder_names_and_paths[folder_name][0]:
        path = os.path.join(root, os.path.relpath(os.path.join("/", filename), "/"))
        if os.path.isfile(path):
            return path
    return None


def get_full_path_or_raise(folder_name, filename):
    path = get_full_path(folder_name, filename)
    if path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return path
