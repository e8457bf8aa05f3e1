"""InternVL3 configuration: read an HF InternVL config.json (transformers' `InternVLConfig`,
the `OpenGVLab/InternVL3-*-hf` format: text_config is a Qwen2 config, vision_config an
`InternVLVisionConfig`) into the fields the megatron-core model needs, and check that the
shapes work at a tensor-parallel size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple, Union

#: The LLM's vocabulary is padded to a multiple of this (megatron's make_vocab_size_divisible_by
#: default) whatever the TP size, so that a dist checkpoint loads at any power-of-two TP:
#: InternVL3's 151674 tokens are divisible by 2 only.
VOCAB_MULTIPLE = 128

#: Activations accepted by name (transformers' ACT2FN names that InternVL configs use).
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu", "relu", "silu")


def _square(value, name: str) -> int:
    """HF stores image/patch sizes as an int or an (h, w) pair; InternVL needs squares."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"InternVL vision config: {name} must be square, got {list(value)}")
        value = value[0]
    return int(value)


@dataclass(frozen=True)
class InternViTConfig:
    """The vision_config fields of an HF InternVL config.json (InternViT). Field names follow
    Qwen2.5-VL's VisionConfig where they mean the same (depth, hidden_size, num_heads)."""

    depth: int = 24
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_heads: int = 16
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "gelu"
    norm_type: str = "layer_norm"
    layer_norm_eps: float = 1e-6
    attention_bias: bool = True
    use_qk_norm: bool = False
    use_absolute_position_embeddings: bool = True
    use_mean_pooling: bool = True

    @classmethod
    def from_hf(cls, cfg: dict) -> "InternViTConfig":
        names = set(cls.__dataclass_fields__)
        values = {k: v for k, v in cfg.items() if k in names}
        values["depth"] = cfg.get("num_hidden_layers", cfg.get("depth", cls.depth))
        values["num_heads"] = cfg.get("num_attention_heads", cfg.get("num_heads", cls.num_heads))
        values["image_size"] = _square(cfg.get("image_size", cls.image_size), "image_size")
        values["patch_size"] = _square(cfg.get("patch_size", cls.patch_size), "patch_size")
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per side of one tile."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class InternVL3Config:
    """Language-model fields (Qwen2), the projector, the vision config and the image token."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim_: int = 0  # 0: hidden_size // num_heads (Qwen2's default)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    rope_type: str = "default"
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    image_token_id: int = 151667
    image_seq_length: int = 256
    downsample_ratio: float = 0.5
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "default"
    use_sliding_window: bool = False
    eos_token_ids: Tuple[int, ...] = (151645,)
    vision: InternViTConfig = field(default_factory=InternViTConfig)

    @property
    def head_dim(self) -> int:
        return self.head_dim_ or self.hidden_size // self.num_heads

    @property
    def vision_token_id(self) -> int:
        """The placeholder token the vision embeddings replace (<IMG_CONTEXT>)."""
        return self.image_token_id

    def query_length(self, input_ids) -> int:
        """Query tokens of a prompt [1, S]: those after the `</img>` that closes the last
        frame (the question and the assistant prefix), i.e. everything past the last
        <IMG_CONTEXT> and the token after it. Raises ValueError for a prompt without one."""
        hits = (input_ids[0] == self.image_token_id).nonzero()
        if hits.numel() == 0:
            raise ValueError("the prompt has no image context token: no video in it")
        return max(0, input_ids.shape[1] - int(hits[-1]) - 2)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the megatron embedding and output layer (zero rows past vocab_size)."""
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def scale(self) -> int:
        """The pixel-shuffle factor: 1 / downsample_ratio (2 for InternVL3)."""
        return round(1 / self.downsample_ratio)

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens one 448x448 tile (one video frame) becomes: (grid / scale)^2."""
        return (self.vision.grid // self.scale) ** 2

    @classmethod
    def from_hf(cls, source: Union[str, dict]) -> "InternVL3Config":
        """From an HF checkpoint directory, a config.json path, or its dict."""
        from ..common.checkpoint_io import read_hf_config
        cfg = read_hf_config(source)
        if cfg.get("model_type", "internvl") != "internvl":
            raise ValueError(f"not an HF InternVL config (model_type {cfg.get('model_type')!r}); "
                             f"OpenGVLab's original internvl_chat checkpoints need the -hf conversion")
        text = dict(cfg.get("text_config") or {})
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        eos = text.get("eos_token_id", cfg.get("eos_token_id", 151645))
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        out = cls(
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"], num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"],
            num_kv_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
            head_dim_=int(text.get("head_dim") or 0),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1e6))),
            rope_type=rope.get("rope_type", rope.get("type", "default")),
            max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
            # transformers ties InternVL's lm_head by the top-level flag (default True)
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            image_token_id=cfg.get("image_token_id", 151667),
            image_seq_length=cfg.get("image_seq_length", 256),
            downsample_ratio=float(cfg.get("downsample_ratio", 0.5)),
            projector_hidden_act=cfg.get("projector_hidden_act", "gelu"),
            vision_feature_layer=cfg.get("vision_feature_layer", -1),
            vision_feature_select_strategy=cfg.get("vision_feature_select_strategy", "default"),
            use_sliding_window=bool(text.get("use_sliding_window", False)),
            eos_token_ids=eos, vision=InternViTConfig.from_hf(cfg.get("vision_config") or {}))
        out.validate()
        return out

    def validate(self, tensor_parallel: int = 1) -> None:
        """Raise ValueError when the shapes or options cannot work (at this TP size)."""
        v, tp = self.vision, tensor_parallel
        problems = []
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_attention_heads {self.num_heads} % num_key_value_heads {self.num_kv_heads}")
        if not self.head_dim_ and self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} % num_attention_heads {self.num_heads}")
        if v.hidden_size % v.num_heads:
            problems.append(f"vision hidden_size {v.hidden_size} % num_attention_heads {v.num_heads}")
        if v.image_size % v.patch_size:
            problems.append(f"vision image_size {v.image_size} % patch_size {v.patch_size}")
        if abs(self.scale * self.downsample_ratio - 1) > 1e-9 or v.grid % self.scale:
            problems.append(f"downsample_ratio {self.downsample_ratio} must be 1/k with k dividing the "
                            f"{v.grid} patches per side")
        elif self.image_seq_length != self.tokens_per_tile:
            problems.append(f"image_seq_length {self.image_seq_length} != (patches per side {v.grid} x "
                            f"downsample_ratio {self.downsample_ratio})^2 = {self.tokens_per_tile}")
        if self.vision_feature_layer != -1:
            problems.append(f"vision_feature_layer {self.vision_feature_layer}: only -1 (the last "
                            f"layer, InternVL3's) is implemented")
        if self.vision_feature_select_strategy != "default":
            problems.append(f"vision_feature_select_strategy {self.vision_feature_select_strategy!r}: "
                            f"only 'default' (drop the CLS token) gives a square feature map")
        if v.use_qk_norm:
            problems.append("vision use_qk_norm (InternViT-6B) is not implemented")
        if v.norm_type not in ("layer_norm", "rms_norm"):
            problems.append(f"vision norm_type {v.norm_type!r} is neither layer_norm nor rms_norm")
        for name, act in (("vision hidden_act", v.hidden_act),
                          ("projector_hidden_act", self.projector_hidden_act)):
            if act not in ACTIVATIONS:
                problems.append(f"{name} {act!r} not in {ACTIVATIONS}")
        if self.rope_type not in ("default", "dynamic"):
            problems.append(f"rope_type {self.rope_type!r}: only default (and dynamic up to "
                            f"max_position_embeddings, where it equals default) is implemented")
        if self.use_sliding_window:
            problems.append("use_sliding_window: sliding-window attention is not implemented")
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            problems.append(f"num_key_value_heads {self.num_kv_heads} and tensor parallel size {tp}: "
                            f"one must divide the other")
        for name, value in (("num_attention_heads", self.num_heads),
                            ("padded vocab_size", self.padded_vocab_size),
                            ("intermediate_size", self.intermediate_size),
                            ("hidden_size (projector)", self.hidden_size),
                            ("vision num_attention_heads", v.num_heads),
                            ("vision intermediate_size", v.intermediate_size)):
            if value % tp:
                problems.append(f"{name} {value} is not divisible by tensor parallel size {tp}")
        if problems:
            raise ValueError("InternVL3 config: " + "; ".join(problems))

    def check_prompt_length(self, total: int) -> None:
        """Dynamic NTK RoPE (InternVL3's LLM config) changes the frequencies only beyond
        max_position_embeddings; that regime is not implemented: raise ValueError."""
        if self.rope_type == "dynamic" and total > self.max_position_embeddings:
            raise ValueError(f"dynamic NTK RoPE beyond max_position_embeddings "
                             f"({self.max_position_embeddings}) is not implemented; the prompt "
                             f"and answer need {total} positions")
