"""Qwen2.5-VL's entry in the model-family registry (`models.family.ModelFamily`)."""

from ..family import ModelFamily

FAMILY = ModelFamily(
    name="qwen2_5_vl", model_type="qwen2_5_vl", title="Qwen2.5-VL", package=__package__,
    config_class=".config:Qwen25VLConfig", model_class_name=".model:Qwen25VLModel",
    prompter_path="megatron_spava.video.prompt:VideoPrompter",
    hf_class="transformers:Qwen2_5_VLForConditionalGeneration",
    tiny_name="tiny-qwen2.5-vl", shapes=("3b", "7b"), bench_shapes=(("3b", "3b"), ("7b", "7b")),
    frames_per_group=2, group_unit="temporal group (2 frames)", group_units="temporal groups",
    needle_module=".needle",
    rope_conventions=True, shipped_model=True)
