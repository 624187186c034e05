#!/usr/bin/env bash
# Build the gradio compatibility venvs of tests/test_ui_compat.py:
#   gradio-3.41  AUTOMATIC1111's pins (gradio 3.41.2, fastapi 0.94.0, pydantic 1.10, httpx 0.24.1, hub 0.25)
#   gradio-4.40  Forge's pins (gradio 4.40.0, fastapi 0.104.1, pydantic 2.8.2, hub 0.26.2, httpx 0.24.1)
# Only the pinned packages (and their dependencies) are installed into each venv; a .pth file then
# appends the base venv's site-packages to sys.path, so torch, safetensors... come from there while
# the venv's own packages come first and shadow the base's (check_ui.py prints where each resolves).
#
#   bash tests/compat/make_venvs.sh [BASE_PYTHON] [DEST]     # defaults: .venv/bin/python, .compat
set -euo pipefail
cd "$(dirname "$0")/../.."
BASE_PY="${1:-${SPO_BASE_PYTHON:-.venv/bin/python}}"
DEST="${2:-${SPO_COMPAT_DIR:-.compat}}"
base_site="$("$BASE_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export PIP_DISABLE_PIP_VERSION_CHECK=1

build() {
  local name=$1; shift
  local dir="$DEST/$name" start=$SECONDS
  if [ -x "$dir/bin/python" ] && [ -f "$dir/.spo-pins" ] && [ "$(cat "$dir/.spo-pins")" = "$*" ]; then
    echo "[compat] $dir is up to date"; return
  fi
  rm -rf "$dir"
  "$BASE_PY" -m venv "$dir"
  "$dir/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2)
  local site
  site="$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$base_site" > "$site/zz_spo_base_venv.pth"
  echo "$*" > "$dir/.spo-pins"
  echo "[compat] built $dir in $((SECONDS - start)) s"
}

build gradio-3.41 "gradio==3.41.2" "fastapi==0.94.0" "pydantic==1.10.17" "httpx==0.24.1" "huggingface_hub==0.25.2" \
  "numpy==1.26.2" "pillow==9.5.0"
build gradio-4.40 "gradio==4.40.0" "fastapi==0.104.1" "pydantic==2.8.2" "huggingface-hub==0.26.2" "httpx==0.24.1" \
  "numpy==1.26.2" "pillow==9.5.0"
