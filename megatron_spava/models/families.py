"""The model families megatron_spava runs, by the name `--model` takes, and how a checkpoint
tells which one it is (config.json's model_type).

    family = resolve_family("auto", checkpoint_dir)    # or "qwen2_5_vl" / "internvl3" / "qwen3_vl"
    cfg = family.config(checkpoint_dir)                 # Qwen25VLConfig / InternVL3Config
    model = family.model_class()(cfg, tensor_parallel=tp, context_parallel=cp, ...)
    family.convert().load_hf_into_model(model, checkpoint_dir, tp_rank=r, tp_size=tp)
    inputs = family.prompter(checkpoint_dir)(clip, question)

Everything is imported on use, so reading this table needs neither megatron-core nor
transformers.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Family:
    """One model family.

    name: the `--model` choice; model_type: config.json's model_type; package: its module
    under megatron_spava.models; config_class / model_class: names in that package;
    prompter: "module:Class" of its prompt builder (checkpoint dir -> (clip, question) ->
    inputs); tiny_name: the directory name of its generated tiny checkpoint; shapes: the
    released shapes its `tiny.make_tiny_checkpoint(shape=...)` writes (random weights).
    """

    name: str
    model_type: str
    package: str
    config_class: str
    model_class_name: str
    prompter_path: str
    tiny_name: str
    shapes: Tuple[str, ...]

    def _module(self, sub: str = ""):
        return importlib.import_module(f"megatron_spava.models.{self.package}{sub}")

    def config(self, source):
        """The family's config from an HF checkpoint directory, a config.json path or its dict."""
        return getattr(importlib.import_module(f"megatron_spava.models.{self.package}.config"),
                       self.config_class).from_hf(source)

    def model_class(self):
        return getattr(self._module(), self.model_class_name)

    def convert(self):
        """The family's conversion module (load_hf_into_model, load_dist_into_model, hf_to_dist,
        dist_to_hf)."""
        return self._module(".convert")

    def tiny(self):
        """The family's tiny/shaped checkpoint module (make_tiny_checkpoint, shaped_hf_config)."""
        return self._module(".tiny")

    def needle(self):
        """The family's needle-model module (`needle.py`: what the needle training and
        evaluation need, `megatron_spava.tasks.model.needle_kit`); ValueError without one."""
        try:
            return self._module(".needle")
        except ModuleNotFoundError as err:
            if not (err.name or "").endswith(".needle"):
                raise
            raise ValueError(f"model family {self.name!r} has no needle model "
                             f"(families with one: qwen2_5_vl, qwen3_vl)") from None

    def prompter(self, checkpoint: str, **kwargs):
        module, cls = self.prompter_path.split(":")
        return getattr(importlib.import_module(module), cls)(checkpoint, **kwargs)


FAMILIES: Dict[str, Family] = {
    "qwen2_5_vl": Family("qwen2_5_vl", "qwen2_5_vl", "qwen2_5_vl", "Qwen25VLConfig", "Qwen25VLModel",
                         "megatron_spava.video.prompt:VideoPrompter", "tiny-qwen2.5-vl", ("3b", "7b")),
    "internvl3": Family("internvl3", "internvl", "internvl3", "InternVL3Config", "InternVL3Model",
                        "megatron_spava.models.internvl3.prompt:InternVLPrompter", "tiny-internvl3",
                        ("2b",)),
    "qwen3_vl": Family("qwen3_vl", "qwen3_vl", "qwen3_vl", "Qwen3VLConfig", "Qwen3VLModel",
                       "megatron_spava.models.qwen3_vl.prompt:Qwen3VLPrompter", "tiny-qwen3-vl", ("8b",)),
    "qwen3_vl_moe": Family("qwen3_vl_moe", "qwen3_vl_moe", "qwen3_vl.moe", "Qwen3VLConfig", "Qwen3VLModel",
                           "megatron_spava.models.qwen3_vl.prompt:Qwen3VLPrompter", "tiny-qwen3-vl-moe", ()),
}
DEFAULT = "qwen2_5_vl"


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose from {sorted(FAMILIES)}")
    return FAMILIES[name]


def detect_family(path: str) -> Family:
    """The family of a checkpoint directory, from its config.json's model_type. Raises
    FileNotFoundError without a config.json, ValueError for another model_type."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"checkpoint not found: no config.json in {path}")
    with open(config) as f:
        model_type = json.load(f).get("model_type")
    for family in FAMILIES.values():
        if model_type == family.model_type:
            return family
    raise ValueError(f"{config}: model_type {model_type!r} is not one of "
                     f"{sorted(f.model_type for f in FAMILIES.values())}; pass --model")


def resolve_family(name: Optional[str], path: Optional[str] = None) -> Family:
    """`name` ("auto" or None: detected from the checkpoint at `path`, or the default family
    without one)."""
    if name not in (None, "auto"):
        return get_family(name)
    return detect_family(path) if path is not None else get_family(DEFAULT)
