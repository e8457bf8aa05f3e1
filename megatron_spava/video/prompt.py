"""From (video clip, question) to model inputs, with the checkpoint's own tokenizer, chat
template and processor configuration.

HF's Qwen2.5-VL processor needs torchvision for video. Where it loads
(`AutoProcessor.from_pretrained(checkpoint)`), it is used as is; where it cannot (a CPU
machine without torchvision), `preprocess_frames` does the same preprocessing in plain
torch and the prompt is expanded the same way (one <|video_pad|> per merged token).
`backend` says which one runs.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .inputs import VideoQAInputs
from .io import VideoClip
from .preprocess import VideoPreprocessConfig, preprocess_frames

VIDEO_PAD = "<|video_pad|>"


def _chat_template(path: str, tokenizer) -> Optional[str]:
    """The processor's chat template if the checkpoint ships one, else the tokenizer's."""
    for name in ("chat_template.jinja", "chat_template.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            text = open(file).read()
            if name.endswith(".json"):
                import json
                text = json.loads(text)["chat_template"]
            return text
    return tokenizer.chat_template


class ChatPrompter:
    """What every family's prompter shares: the checkpoint's tokenizer and chat template, HF's
    processor when it loads (`backend` "hf") or the family's torch fallback ("torch"; the
    reason in `fallback_reason`), and the chat prompt of one video and a question.

    use_hf_processor: "auto" (HF's processor when it loads, else the torch fallback),
    True (require it) or False (always the fallback).
    """

    def __init__(self, checkpoint: str, use_hf_processor="auto"):
        from transformers import AutoTokenizer

        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"checkpoint directory not found: {checkpoint}")
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        self.chat_template = _chat_template(checkpoint, self.tokenizer)
        self.processor, self.fallback_reason = None, None
        if use_hf_processor:
            try:
                from transformers import AutoProcessor
                self.processor = AutoProcessor.from_pretrained(checkpoint, local_files_only=True)
            except Exception as err:  # torchvision missing, or an incomplete processor config
                if use_hf_processor is True:
                    raise
                first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
                self.fallback_reason = f"{type(err).__name__}: {first[:160]}"
        else:
            self.fallback_reason = "disabled"

    @property
    def backend(self) -> str:
        return "hf" if self.processor is not None else "torch"

    def prompt_text(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "video"},
                                                 {"type": "text", "text": question}]}]
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                  tokenize=False, add_generation_prompt=True)


class VideoPrompter(ChatPrompter):
    """Builds VideoQAInputs for a Qwen2.5-VL checkpoint directory (`ChatPrompter`'s
    use_hf_processor)."""

    def __init__(self, checkpoint: str, use_hf_processor="auto"):
        super().__init__(checkpoint, use_hf_processor)
        self.config = VideoPreprocessConfig.from_checkpoint(checkpoint)

    def __call__(self, clip: VideoClip, question: str) -> VideoQAInputs:
        text = self.prompt_text(question)
        if self.processor is not None:
            out = self.processor(text=[text], videos=[clip.frames], do_sample_frames=False,
                                 video_metadata=[{"fps": clip.fps, "total_num_frames": len(clip.frames)}],
                                 return_tensors="pt")
            return VideoQAInputs(out["input_ids"], out["pixel_values_videos"], out["video_grid_thw"],
                                 torch.as_tensor(out["second_per_grid_ts"], dtype=torch.float32))
        pixels, grid = preprocess_frames(clip.frames, self.config)
        tokens = int(grid.prod()) // self.config.merge_size ** 2
        if text.count(VIDEO_PAD) != 1:
            raise ValueError(f"the chat template must produce one {VIDEO_PAD} per video")
        text = text.replace(VIDEO_PAD, VIDEO_PAD * tokens)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        seconds = torch.tensor([self.config.temporal_patch_size / clip.fps])
        return VideoQAInputs(ids, pixels, grid, seconds)
