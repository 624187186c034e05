import os

models_path = os.environ.get("SPO_STUB_MODELS", "/tmp/spo-stub-models")
script_path = os.environ.get("SPO_STUB_ROOT", "/tmp/spo-stub-webui")
