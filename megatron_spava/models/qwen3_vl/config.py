"""Qwen3-VL configuration: an HF config.json (nested text_config / vision_config, the
layout of Qwen/Qwen3-VL-*-Instruct) read into the fields the megatron-core model needs.
Dense models (model_type qwen3_vl) and MoE ones (qwen3_vl_moe: Qwen3-VL-30B-A3B /
235B-A22B, every LLM layer a mixture of experts; megatron-core's MoE layers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple, Union


@dataclass(frozen=True)
class Qwen3VLVisionConfig:
    """The vision_config fields of an HF Qwen3-VL config.json."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: Tuple[int, ...] = (8, 16, 24)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @classmethod
    def from_hf(cls, cfg: dict) -> "Qwen3VLVisionConfig":
        names = set(cls.__dataclass_fields__)
        values = {k: v for k, v in cfg.items() if k in names}
        values.setdefault("depth", cfg.get("num_hidden_layers", cls.depth))
        values.setdefault("num_heads", cfg.get("num_attention_heads", cls.num_heads))
        if "deepstack_visual_indexes" in values:
            values["deepstack_visual_indexes"] = tuple(values["deepstack_visual_indexes"])
        rope = cfg.get("rope_parameters") or {}
        if "rope_theta" in rope:
            values["rope_theta"] = float(rope["rope_theta"])
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: channels x temporal x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def grid_side(self) -> int:
        """Side of the square learned position-embedding grid."""
        return int(round(self.num_position_embeddings ** 0.5))


@dataclass(frozen=True)
class Qwen3VLConfig:
    """Language-model fields (Qwen3: GQA, no QKV bias, QK-norm, explicit head_dim) plus the
    vision config and special token ids."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5e6
    mrope_section: Tuple[int, int, int] = (24, 20, 20)
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_ids: Tuple[int, ...] = (151645,)
    vision: Qwen3VLVisionConfig = field(default_factory=Qwen3VLVisionConfig)
    num_experts: int = 0            # MoE: experts per layer (0: dense)
    experts_per_token: int = 0      # MoE: top-k
    moe_intermediate_size: int = 0  # MoE: each expert's FFN width

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def vision_token_id(self) -> int:
        """The placeholder token the vision embeddings replace (videos: <|video_pad|>)."""
        return self.video_token_id

    @property
    def deepstack_layers(self) -> int:
        """LLM layers (the first ones) whose outputs get DeepStack features added."""
        return len(self.vision.deepstack_visual_indexes)

    def query_length(self, input_ids) -> int:
        """Query tokens of a prompt [1, S]: those after the last <|vision_end|> (question +
        assistant prefix). Raises ValueError for a prompt without a video."""
        ends = (input_ids[0] == self.vision_end_token_id).nonzero()
        if ends.numel() == 0:
            raise ValueError("the prompt has no <|vision_end|>: no video in it")
        return input_ids.shape[1] - int(ends[-1]) - 1

    @classmethod
    def from_hf(cls, source: Union[str, dict]) -> "Qwen3VLConfig":
        """From an HF checkpoint directory, a config.json path, or its dict."""
        from ..common.checkpoint_io import read_hf_config
        cfg = read_hf_config(source)
        model_type = cfg.get("model_type", "qwen3_vl")
        if model_type not in ("qwen3_vl", "qwen3_vl_moe"):
            raise ValueError(f"Qwen3-VL config: model_type {model_type!r} is not 'qwen3_vl' or 'qwen3_vl_moe'")
        text = dict(cfg.get("text_config") or {})
        for key, value in cfg.items():  # a flat layout: text fields at the top level
            if key not in ("text_config", "vision_config"):
                text.setdefault(key, value)
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"Qwen3-VL config: rope_type {rope['rope_type']!r} is not supported "
                             f"(only the default M-RoPE; YaRN would need scaled frequencies)")
        if not rope.get("mrope_interleaved", True):
            raise ValueError("Qwen3-VL config: mrope_interleaved false is Qwen2.5-VL's M-RoPE")
        eos = text.get("eos_token_id", cfg.get("eos_token_id", 151645))
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        heads = text["num_attention_heads"]
        moe = {}
        if model_type == "qwen3_vl_moe":
            step, dense = text.get("decoder_sparse_step", 1), list(text.get("mlp_only_layers") or [])
            if step != 1 or dense:
                raise ValueError(f"Qwen3-VL MoE config: decoder_sparse_step {step}, mlp_only_layers "
                                 f"{dense}: only models whose every layer is MoE are supported")
            moe = dict(num_experts=text.get("num_experts") or text["num_local_experts"],
                       experts_per_token=text["num_experts_per_tok"],
                       moe_intermediate_size=text["moe_intermediate_size"])
        out = cls(
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"], num_layers=text["num_hidden_layers"],
            num_heads=heads, num_kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 5e6))),
            mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))), tie_word_embeddings=bool(tie),
            image_token_id=cfg.get("image_token_id", 151655),
            video_token_id=cfg.get("video_token_id", 151656),
            vision_start_token_id=cfg.get("vision_start_token_id", 151652),
            vision_end_token_id=cfg.get("vision_end_token_id", 151653),
            eos_token_ids=eos, vision=Qwen3VLVisionConfig.from_hf(cfg.get("vision_config") or {}), **moe)
        out.validate()
        return out

    def validate(self, tensor_parallel: int = 1) -> None:
        """Raise ValueError when the shapes cannot work (at this TP size)."""
        problems = []
        v = self.vision
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_attention_heads {self.num_heads} % num_key_value_heads {self.num_kv_heads}")
        if 2 * sum(self.mrope_section) != self.head_dim:
            problems.append(f"mrope_section {list(self.mrope_section)} must sum to head_dim/2 = "
                            f"{self.head_dim // 2}")
        if v.out_hidden_size != self.hidden_size:
            problems.append(f"vision out_hidden_size {v.out_hidden_size} != hidden_size {self.hidden_size}")
        if v.hidden_size % v.num_heads:
            problems.append(f"vision hidden_size {v.hidden_size} % num_heads {v.num_heads}")
        if v.grid_side ** 2 != v.num_position_embeddings:
            problems.append(f"vision num_position_embeddings {v.num_position_embeddings} is not a square")
        if any(not 0 <= i < v.depth for i in v.deepstack_visual_indexes):
            problems.append(f"deepstack_visual_indexes {list(v.deepstack_visual_indexes)} outside "
                            f"the {v.depth} vision blocks")
        if self.deepstack_layers > self.num_layers:
            problems.append(f"{self.deepstack_layers} DeepStack taps for {self.num_layers} LLM layers")
        if self.is_moe and not 0 < self.experts_per_token <= self.num_experts:
            problems.append(f"num_experts_per_tok {self.experts_per_token} for {self.num_experts} experts")
        tp = tensor_parallel
        if self.is_moe and self.moe_intermediate_size % tp:
            problems.append(f"moe_intermediate_size {self.moe_intermediate_size} is not divisible by "
                            f"tensor parallel size {tp}")
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            problems.append(f"num_key_value_heads {self.num_kv_heads} and tensor parallel size {tp}: "
                            f"one must divide the other")
        for name, value in (("num_attention_heads", self.num_heads), ("vision num_heads", v.num_heads),
                            ("vocab_size", self.vocab_size), ("intermediate_size", self.intermediate_size),
                            ("vision intermediate_size", v.intermediate_size)):
            if value % tp:
                problems.append(f"{name} {value} is not divisible by tensor parallel size {tp}")
        if problems:
            raise ValueError("Qwen3-VL config: " + "; ".join(problems))
