"""Qwen3-VL MoE's entry in the model-family registry (`models.family.ModelFamily`): the
dense family's config, model, conversion, prompt and synthetic prompts (they read the MoE
fields), its own tiny checkpoint (8 experts, top 2)."""

from ...family import ModelFamily

FAMILY = ModelFamily(
    name="qwen3_vl_moe", model_type="qwen3_vl_moe", title="Qwen3-VL MoE", package=__package__,
    config_class="..config:Qwen3VLConfig", model_class_name="..model:Qwen3VLModel",
    prompter_path="..prompt:Qwen3VLPrompter", hf_inputs_path="...qwen2_5_vl.reference:hf_inputs",
    hf_class="transformers:Qwen3VLMoeForConditionalGeneration",
    tiny_name="tiny-qwen3-vl-moe", convert_module="..convert", bench_module="..bench",
    frames_per_group=2, group_unit="temporal group (2 frames)", group_units="temporal groups")
