import types

model_data = types.SimpleNamespace(sd_model=None)
listed = []


def list_models():
    listed.append(True)
