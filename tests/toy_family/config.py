"""The toy family's config: Qwen2.5-VL's fields, a class of its own (the registry maps a
config object to its family by class)."""

from megatron_spava.models.qwen2_5_vl.config import Qwen25VLConfig


class ToyConfig(Qwen25VLConfig):
    pass
