"""Callback registries (only the ones the extension uses)."""

callback_map = {"ui_tabs": [], "ui_settings": [], "before_ui": [], "app_started": []}


def clear_callbacks():
    for v in callback_map.values():
        v.clear()


def on_ui_tabs(callback, *, name=None):
    callback_map["ui_tabs"].append(callback)


def on_ui_settings(callback, *, name=None):
    callback_map["ui_settings"].append(callback)


def on_before_ui(callback, *, name=None):
    callback_map["before_ui"].append(callback)


def on_app_started(callback, *, name=None):
    callback_map["app_started"].append(callback)


def ui_tabs_callback():
    res = []
    for cb in callback_map["ui_tabs"]:
        res += cb() or []
    return res


def ui_settings_callback():
    for cb in callback_map["ui_settings"]:
        cb()


def before_ui_callback():
    for cb in callback_map["before_ui"]:
        cb()
