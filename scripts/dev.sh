#!/usr/bin/env bash
# Set up a virtual environment for this checkout (once) and run the main job or the tests.
#
#   bash scripts/dev.sh demo [ARGS...]   # the main job: `spo demo` on the embedded world
#   bash scripts/dev.sh test [ARGS...]   # the test suite (pytest ARGS)
#   bash scripts/dev.sh spo ARGS...      # any `spo` command
#   bash scripts/dev.sh comfy-deps DIR   # a ComfyUI checkout's requirements, for its integration tests
#
# The venv lives in .venv (SPO_VENV overrides). torch is installed first as a matched
# torch/torchvision pair (SPO_TORCH_SPEC overrides, e.g. a CPU wheel index for your machine);
# then the pack with every extra, editable.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SPO_VENV:-.venv}"
PY="${PYTHON:-python3}"
TORCH_SPEC="${SPO_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[dev] creating $VENV"
  "$PY" -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip on machines with local wheel mirrors warns about every missing mirror folder: keep the log readable
quiet_pip() { "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
stamp="$VENV/.spo-installed"
want="$(cat pyproject.toml scripts/dev.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
    echo "[dev] installing $TORCH_SPEC"
    # shellcheck disable=SC2086
    quiet_pip $TORCH_SPEC
  fi
  echo "[dev] installing spo-pack[all,dev]"
  quiet_pip -e ".[all,dev]"
  echo "$want" > "$stamp"
  echo "[dev] environment ready after ${SECONDS}s"
fi

# no network at run time: nothing may reach a model hub
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
cmd="${1:-test}"; shift || true
case "$cmd" in
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  demo) exec "$VENV/bin/spo" demo "$@" ;;
  spo)  exec "$VENV/bin/spo" "$@" ;;
  comfy-deps)
    # ComfyUI's requirements into this venv, pinned to the torch/torchvision already here (torchaudio is
    # left out: no build matches every torch, and only ComfyUI's audio nodes need it)
    comfy="${1:?usage: bash scripts/dev.sh comfy-deps /path/to/ComfyUI}"
    "$VENV/bin/python" -m pip freeze 2>/dev/null | grep -iE '^(torch|torchvision)==' > "$VENV/.torch-pins.txt"
    grep -viE '^[[:space:]]*(torch|torchvision|torchaudio)([<>=~!; ]|$)' "$comfy/requirements.txt" > "$VENV/.comfy-requirements.txt"
    quiet_pip -c "$VENV/.torch-pins.txt" -r "$VENV/.comfy-requirements.txt" requests
    echo "[dev] ComfyUI's requirements installed; run: COMFYUI_PATH=$comfy bash scripts/dev.sh test tests/test_comfyui_integration.py" ;;
  *) echo "usage: bash scripts/dev.sh {demo|test|spo|comfy-deps} [ARGS...]" >&2; exit 2 ;;
esac
