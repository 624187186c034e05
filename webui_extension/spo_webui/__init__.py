"""The WebUI side of the SPO pack (AUTOMATIC1111 and Forge): the tab's host adapter, the SPO
sampler and its options, settings. Imported by `scripts/spo_pack.py`; imports `modules.*`
lazily so that its pure parts can be tested without a WebUI."""

NAME = "SPO"
