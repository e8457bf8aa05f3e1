"""Qwen3-VL's (dense) entry in the model-family registry (`models.family.ModelFamily`)."""

from ..family import ModelFamily

FAMILY = ModelFamily(
    name="qwen3_vl", model_type="qwen3_vl", title="Qwen3-VL", package=__package__,
    config_class=".config:Qwen3VLConfig", model_class_name=".model:Qwen3VLModel",
    prompter_path=".prompt:Qwen3VLPrompter", hf_inputs_path="..qwen2_5_vl.reference:hf_inputs",
    hf_class="transformers:Qwen3VLForConditionalGeneration",
    tiny_name="tiny-qwen3-vl", shapes=("8b",), bench_shapes=(("qwen3-vl-8b", "8b"),),
    frames_per_group=2, group_unit="temporal group (2 frames)", group_units="temporal groups",
    needle_module=".needle")
