"""Qwen2.5-VL configuration: read an HF config.json (flat hub layout or nested
text_config/vision_config) into the fields the megatron-core model needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple, Union

from .vision import VisionConfig


@dataclass(frozen=True)
class Qwen25VLConfig:
    """Language-model fields (Qwen2) plus the vision config and special token ids."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: Tuple[int, int, int] = (16, 24, 24)
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_ids: Tuple[int, ...] = (151645,)
    vision: VisionConfig = field(default_factory=VisionConfig)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def vision_token_id(self) -> int:
        """The placeholder token the vision embeddings replace (videos: <|video_pad|>)."""
        return self.video_token_id

    def query_length(self, input_ids) -> int:
        """Query tokens of a prompt [1, S]: those after the last <|vision_end|> (question +
        assistant prefix). Raises ValueError for a prompt without a video."""
        ends = (input_ids[0] == self.vision_end_token_id).nonzero()
        if ends.numel() == 0:
            raise ValueError("the prompt has no <|vision_end|>: no video in it")
        return input_ids.shape[1] - int(ends[-1]) - 1

    @classmethod
    def from_hf(cls, source: Union[str, dict]) -> "Qwen25VLConfig":
        """From an HF checkpoint directory, a config.json path, or its dict."""
        from ..common.checkpoint_io import read_hf_config
        cfg = read_hf_config(source)
        text = dict(cfg.get("text_config") or {})
        for key, value in cfg.items():  # flat hub layout: text fields at the top level
            if key not in ("text_config", "vision_config"):
                text.setdefault(key, value)
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        mrope = rope.get("mrope_section", [16, 24, 24])
        theta = rope.get("rope_theta", text.get("rope_theta", 1e6))
        eos = text.get("eos_token_id", cfg.get("eos_token_id", 151645))
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        out = cls(
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"], num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"],
            num_kv_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            mrope_section=tuple(mrope), tie_word_embeddings=bool(tie),
            image_token_id=cfg.get("image_token_id", 151655),
            video_token_id=cfg.get("video_token_id", 151656),
            vision_start_token_id=cfg.get("vision_start_token_id", 151652),
            vision_end_token_id=cfg.get("vision_end_token_id", 151653),
            eos_token_ids=eos, vision=VisionConfig.from_hf(cfg.get("vision_config") or {}))
        out.validate()
        return out

    def validate(self, tensor_parallel: int = 1) -> None:
        """Raise ValueError when the shapes cannot work (at this TP size)."""
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} % num_attention_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_attention_heads {self.num_heads} % num_key_value_heads {self.num_kv_heads}")
        if 2 * sum(self.mrope_section) != self.head_dim:
            problems.append(f"mrope_section {list(self.mrope_section)} must sum to head_dim/2 = "
                            f"{self.head_dim // 2}")
        if self.vision.out_hidden_size != self.hidden_size:
            problems.append(f"vision out_hidden_size {self.vision.out_hidden_size} != hidden_size "
                            f"{self.hidden_size}")
        if self.vision.hidden_size % self.vision.num_heads:
            problems.append(f"vision hidden_size {self.vision.hidden_size} % num_heads {self.vision.num_heads}")
        tp = tensor_parallel
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            problems.append(f"num_key_value_heads {self.num_kv_heads} and tensor parallel size {tp}: "
                            f"one must divide the other")
        for name, value in (("num_attention_heads", self.num_heads),
                            ("vision num_heads", self.vision.num_heads), ("vocab_size", self.vocab_size),
                            ("intermediate_size", self.intermediate_size),
                            ("vision intermediate_size", self.vision.intermediate_size)):
            if value % tp:
                problems.append(f"{name} {value} is not divisible by tensor parallel size {tp}")
        if problems:
            raise ValueError("Qwen2.5-VL config: " + "; ".join(problems))
