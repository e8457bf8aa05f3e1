"""The Qwen2.5-VL needle model (`megatron_spava/assets/needle_qwen/`): this family's entry of
the needle-model interface (`megatron_spava.tasks.model.needle_kit`). It lives in
`megatron_spava/tasks/model.py`, where the first needle model was written; re-exported here."""

from ...tasks.model import (ASSET_DIR, NeedlePrompter, build_tokenizer, hf_classes,  # noqa: F401
                            hf_config, preprocess_config, write_checkpoint_files)
