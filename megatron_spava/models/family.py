"""The model-family interface: what the main job (`video_qa`), the benchmarks (`perf`), the
evaluation (`tasks`), the TP x CP check, the conversion and the placement check need of a
family, in one frozen record. Each family's folder declares one (`<folder>/family.py`:
``FAMILY = ModelFamily(...)``) and `models/registry.py` lists it in one line.

    family = registry.resolve_family("auto", checkpoint_dir)  # or get_family("internvl3")
    cfg = family.config(checkpoint_dir)                        # the family's config class
    model = family.model_class()(cfg, tensor_parallel=tp, context_parallel=cp, ...)
    family.convert().load_hf_into_model(model, checkpoint_dir, tp_rank=r, tp_size=tp)
    inputs = family.prompter(checkpoint_dir)(clip, question)   # preprocessing + prompt
    family.tiny().make_tiny_checkpoint(out_dir)                # a tiny random checkpoint
    family.bench().synthetic_inputs(cfg, n, seed)              # a synthetic prompt of ~n tokens
    family.frame_group_error(groups, cp)                       # the one frame-group check

A family's parts are modules named by "module" or "module:attr" strings, relative to its
folder (`package`) when they start with a dot, and imported on use: reading the record (and
the registry) needs neither megatron-core nor transformers.

The modules a family's folder provides (what each part must hold):
  config      the config class (`config_class`): `from_hf(dir | config.json path | dict)`,
              `validate(tp)`, `query_length(ids)`, `vision_token_id`
  model       the model class (`model_class_name`): `(cfg, tensor_parallel=, context_parallel=,
              dtype=, backend=, core_attention=, use_cpu_initialization=,
              perform_initialization=)`, a `models.common.VideoLanguageModel`
  convert     `load_hf_into_model`, `load_dist_into_model`, `hf_to_dist`, `dist_to_hf`
              (`models.common.checkpoint_io.CheckpointFamily`'s, bound to the family)
  tiny        `make_tiny_checkpoint(out_dir, shape=None)`, `tiny_hf_config()`,
              `shaped_hf_config(shape)` (the released shapes in `shapes`)
  bench       `prompt_lengths(n, cfg, multiple)`, `synthetic_inputs(cfg, n, seed, multiple)`,
              `vision_flops_per_group(cfg)`: the benchmarks' synthetic prompts
  prompter    "module:Class": `Class(checkpoint_dir)(clip, question)` -> the family's inputs
              (`video.inputs`), with `.tokenizer`, `.backend`, `.fallback_reason`
  hf_class    "module:Class" of the transformers model the conformance suite compares with
  hf_inputs   "module:function" (inputs, hf_config) -> the HF model's forward kwargs
  needle      (optional) the needle-model kit the needle training and evaluation use
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional, Tuple


def _resolve(spec: str, package: str):
    """`spec` "module[:attr]" (relative to `package` when it starts with a dot) -> the object."""
    module, _, attr = spec.partition(":")
    mod = importlib.import_module(module, package=package if module.startswith(".") else None)
    return getattr(mod, attr) if attr else mod


@dataclass(frozen=True)
class ModelFamily:
    """One model family.

    name: the `--model` choice; model_type: config.json's model_type; title: its name in
    reports ("Qwen2.5-VL"); package: the module of its folder; config_class, model_class_name,
    convert_module, tiny_module, bench_module, prompter_path, hf_class: its parts (see the
    module docstring); tiny_name: the directory name of its generated tiny checkpoint;
    shapes: the released shapes `tiny.shaped_hf_config` knows (random weights); bench_shapes:
    (--shape name of the prefill benchmark, the family's shape) pairs; frames_per_group:
    video frames per frame group (the unit frame-parallel vision splits over CP ranks);
    group_unit / group_units: a group's name in messages; rope_conventions: the family's
    M-RoPE takes `--rope-convention` (qwen | hf); shipped_model: the package ships a trained
    model of this family (the demo's default checkpoint, `tasks.model`); needle_module: its
    needle-model kit (`needle.py`, `tasks.model.needle_kit`), None without one.
    """

    name: str
    model_type: str
    title: str
    package: str
    config_class: str
    model_class_name: str
    prompter_path: str
    hf_class: str
    tiny_name: str
    shapes: Tuple[str, ...] = ()
    bench_shapes: Tuple[Tuple[str, str], ...] = ()
    frames_per_group: int = 2
    group_unit: str = "temporal group (2 frames)"
    group_units: str = "temporal groups"
    rope_conventions: bool = False
    shipped_model: bool = False
    convert_module: str = ".convert"
    tiny_module: str = ".tiny"
    bench_module: str = ".bench"
    needle_module: Optional[str] = None
    hf_inputs_path: str = ".reference:hf_inputs"

    def part(self, spec: str):
        """A part named by "module[:attr]" (relative to the family's folder when it starts with '.')."""
        return _resolve(spec, self.package)

    def config_type(self) -> type:
        return self.part(self.config_class)

    def config(self, source):
        """The family's config from an HF checkpoint directory, a config.json path or its dict."""
        return self.config_type().from_hf(source)

    def model_class(self):
        return self.part(self.model_class_name)

    def convert(self):
        """The family's conversion module (load_hf_into_model, load_dist_into_model, hf_to_dist,
        dist_to_hf)."""
        return self.part(self.convert_module)

    def tiny(self):
        """The family's tiny/shaped checkpoint module (make_tiny_checkpoint, tiny_hf_config,
        shaped_hf_config)."""
        return self.part(self.tiny_module)

    def bench(self):
        """The family's synthetic prompts (prompt_lengths, synthetic_inputs, vision_flops_per_group)."""
        return self.part(self.bench_module)

    def needle(self):
        """The family's needle-model module (`needle.py`: what the needle training and
        evaluation need, `megatron_spava.tasks.model.needle_kit`); ValueError without one."""
        if self.needle_module is None:
            raise ValueError(f"model family {self.name!r} has no needle model "
                             f"(`models.registry.needle_families()` lists those with one)")
        return self.part(self.needle_module)

    def prompter(self, checkpoint: str, **kwargs):
        return self.part(self.prompter_path)(checkpoint, **kwargs)

    def hf_model_class(self):
        """The transformers class of the family's HF checkpoints (the conformance suite's reference)."""
        return self.part(self.hf_class)

    def hf_inputs(self, inputs, hf_config) -> dict:
        """The HF forward / generate kwargs of one of the family's inputs (the conformance
        suite's reference run)."""
        return self.part(self.hf_inputs_path)(inputs, hf_config)

    def frame_group_error(self, groups: int, cp: int) -> Optional[str]:
        """Why `groups` frame groups cannot be split over `cp` ranks, or None (`frame_group_error`)."""
        return frame_group_error(groups, cp, unit=self.group_unit, units=self.group_units)


def frame_group_error(groups: int, cp: int, *, unit: str = "frame group",
                      units: str = "frame groups") -> Optional[str]:
    """The one frame-group check (SPAVA.md section 1's limit of frame-parallel vision): why a
    video of `groups` frame groups cannot be split over `cp` context-parallel ranks (fewer
    groups than ranks), or None. The main job (before any rank starts, from the frame count),
    the launch check (`placement.fit_error`, before any collective) and the vision encoders
    (`models.common.frame_parallel.split_groups`) all ask it. Pure."""
    if groups >= cp:
        return None
    return (f"frame-parallel vision needs at least one {unit} per context-parallel rank: the video "
            f"has {groups} {units} for {cp} ranks (CP={cp} needs at least {cp}); sample more frames "
            f"(--fps, --max-frames) or use fewer ranks")
