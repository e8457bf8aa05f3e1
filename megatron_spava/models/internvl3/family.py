"""InternVL3's entry in the model-family registry (`models.family.ModelFamily`): HF's
"internvl" checkpoints (the OpenGVLab/InternVL3-*-hf format)."""

from ..family import ModelFamily

FAMILY = ModelFamily(
    name="internvl3", model_type="internvl", title="InternVL3", package=__package__,
    config_class=".config:InternVL3Config", model_class_name=".model:InternVL3Model",
    prompter_path=".prompt:InternVLPrompter",
    hf_class="transformers:InternVLForConditionalGeneration",
    tiny_name="tiny-internvl3", shapes=("2b",), bench_shapes=(("internvl3-2b", "2b"),),
    frames_per_group=1, group_unit="frame", group_units="frames")
