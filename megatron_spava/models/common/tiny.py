"""What the families' tiny checkpoints share: the random-weight rule of their tiny HF
models and the Qwen chat template (Qwen2.5-VL's adds a default system turn, Qwen3-VL's
does not)."""

from __future__ import annotations

from typing import Callable, Optional

import torch


def randomize(model, seed: int, *, is_norm: Callable[[str], bool], is_unit: Callable[[str], bool]):
    """Overwrite every parameter of `model` (in named_parameters order, one generator seeded
    `seed`): 1 + N(0, 0.1) where is_norm(name), N(0, 1) where is_unit(name) (embeddings,
    lm_head, routers), N(0, 0.1) elsewhere. With these the tiny models' greedy answers vary
    from token to token (logits std ~7), so decode bugs show. Returns the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_norm(name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif is_unit(name):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def chat_template(system: Optional[str] = None) -> str:
    """A Qwen chat template: each turn <|im_start|>role ... <|im_end|>, a video
    <|vision_start|><|video_pad|><|vision_end|>, an image likewise with <|image_pad|>, the
    assistant prefix; with `system`, a first system turn of that text unless the messages
    start with one."""
    first = ("{% if loop.first and message['role'] != 'system' %}"
             f"<|im_start|>system\n{system}<|im_end|>\n"
             "{% endif %}") if system else ""
    return ("{% for message in messages %}" + first +
            "<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}"
            "{% else %}{% for part in message['content'] %}"
            "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
            "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
            "{% else %}{{ part['text'] }}{% endif %}"
            "{% endfor %}{% endif %}<|im_end|>\n"
            "{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
