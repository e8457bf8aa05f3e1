"""The model families megatron_spava runs: one registry, one line per family. Each line
names the `family.py` of the family's folder, which declares its `models.family.ModelFamily`
(the interface: config, model, conversion, tiny checkpoint, prompt and preprocessing,
synthetic inputs, frames per group). Adding a family = one new folder + one line here
(or, for a folder outside the package, `register_module(...)` at run time and the
MEGATRON_SPAVA_FAMILIES environment variable for other processes, as
tests/test_toy_family.py does).

    family = resolve_family("auto", checkpoint_dir)   # --model, else config.json's model_type
    family = family_of_config(cfg)                     # the family of a config object

Reading the registry imports only the `family.py` records (no megatron-core, no transformers).
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Dict, Optional

from .family import ModelFamily

FAMILIES: Dict[str, ModelFamily] = {}
DEFAULT = "qwen2_5_vl"  # the family of the demo's shipped model and of --shape tiny


def register(family: ModelFamily) -> ModelFamily:
    """Add `family` (ValueError when its name or model_type is taken by another). Returns it."""
    for other in FAMILIES.values():
        if other.name != family.name and other.model_type == family.model_type:
            raise ValueError(f"model_type {family.model_type!r} is {other.name}'s already")
    if family.name in FAMILIES and FAMILIES[family.name] != family:
        raise ValueError(f"model family {family.name!r} is registered already")
    FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove a family registered at run time (tests)."""
    FAMILIES.pop(name, None)


def register_module(module: str) -> ModelFamily:
    """Register the `FAMILY` that `module` (a family folder's family.py) declares."""
    return register(importlib.import_module(module).FAMILY)


register_module("megatron_spava.models.qwen2_5_vl.family")
register_module("megatron_spava.models.internvl3.family")
register_module("megatron_spava.models.qwen3_vl.family")
register_module("megatron_spava.models.qwen3_vl.moe.family")

#: families from outside the package: a comma-separated list of family.py modules (on
#: sys.path) registered when the registry is first imported, in every process (the ranks a
#: launcher starts, the demo's subprocesses): how a family from its own folder reaches them
PLUGINS_ENV = "MEGATRON_SPAVA_FAMILIES"
for _module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
    register_module(_module)


def names():
    """The registered family names, in registration order."""
    return list(FAMILIES)


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose from {sorted(FAMILIES)}")
    return FAMILIES[name]


def detect_family(path: str) -> ModelFamily:
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


def resolve_family(name: Optional[str], path: Optional[str] = None) -> ModelFamily:
    """`name` ("auto" or None: detected from the checkpoint at `path`, or the default family
    without one)."""
    if name not in (None, "auto"):
        return get_family(name)
    return detect_family(path) if path is not None else get_family(DEFAULT)


def family_of_config(cfg) -> ModelFamily:
    """The family whose config class `cfg` is (exactly; families sharing a class, such as
    Qwen3-VL and its MoE, share everything read from a config, so the first registered
    answers). cfg None: the default family. ValueError for a config no family has."""
    if cfg is None:
        return get_family(DEFAULT)
    for family in FAMILIES.values():
        if type(cfg) is family.config_type():
            return family
    raise ValueError(f"{type(cfg).__name__} is the config of no registered model family "
                     f"({', '.join(FAMILIES)})")


def bench_shapes() -> Dict[str, tuple]:
    """The prefill benchmark's --shape names -> (family name, the family's shape); "tiny" is
    (None, None): the tiny config of the family --model picks."""
    shapes = {"tiny": (None, None)}
    for family in FAMILIES.values():
        for bench_name, shape in family.bench_shapes:
            shapes[bench_name] = (family.name, shape)
    return shapes


def bench_family(shape: str, model: str = "auto") -> str:
    """The family of the prefill benchmark's --shape / --model pair (`bench_shapes`; "tiny":
    `model`'s, default DEFAULT). ValueError for an unknown shape, or when they disagree."""
    shapes = bench_shapes()
    if shape not in shapes:
        raise ValueError(f"unknown benchmark shape {shape!r}; choose from {', '.join(sorted(shapes))}")
    family, _ = shapes[shape]
    if model != "auto" and family is not None and model != family:
        raise ValueError(f"--shape {shape} is a {family} shape, not {model}")
    return model if model != "auto" else (family or DEFAULT)


def bench_config(shape: str, model: str = "auto"):
    """The family's config (its config class) at the benchmark's --shape `shape`: the
    released shape's config.json (`tiny.shaped_hf_config`), or its tiny config for "tiny"."""
    family = get_family(bench_family(shape, model))
    tiny, name = family.tiny(), bench_shapes()[shape][1]
    return family.config(tiny.tiny_hf_config() if name is None else tiny.shaped_hf_config(name))


def needle_families():
    """The families with a needle-model kit (`ModelFamily.needle`), in registration order."""
    return [f.name for f in FAMILIES.values() if f.needle_module is not None]


def model_shapes():
    """Every released shape some family's tiny module can write (the demo's --model-shape)."""
    return ["tiny", *dict.fromkeys(s for f in FAMILIES.values() for s in f.shapes)]
