"""comfy_api.latest stand-in: the subset of the V3 schema the SPO nodes use."""

from . import _io as io  # noqa: F401


class ComfyExtension:
    async def on_load(self) -> None:
        pass

    async def get_node_list(self):
        return []
