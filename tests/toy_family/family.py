"""The toy family's record (`megatron_spava.models.family.ModelFamily`)."""

from megatron_spava.models.family import ModelFamily

FAMILY = ModelFamily(
    name="toy_vl", model_type="toy_vl", title="Toy-VL", package=__package__,
    config_class=".config:ToyConfig", model_class_name="megatron_spava.models.qwen2_5_vl.model:Qwen25VLModel",
    prompter_path="megatron_spava.video.prompt:VideoPrompter", hf_class=".hf:ToyForConditionalGeneration",
    tiny_name="tiny-toy-vl", bench_module="megatron_spava.models.qwen2_5_vl.bench",
    hf_inputs_path="megatron_spava.models.qwen2_5_vl.reference:hf_inputs",
    frames_per_group=2, group_unit="temporal group (2 frames)", group_units="temporal groups",
    rope_conventions=True)  # Qwen2.5-VL's M-RoPE, with its choice of rule
