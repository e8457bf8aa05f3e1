"""FP8 for the language model's linears, as Megatron spells it (issue 25).

    --fp8-format {e4m3,hybrid}     TransformerConfig.fp8 (Megatron-LM's --fp8-format)
    --fp8-recipe {delayed,tensorwise,blockwise,mxfp8}
                                   TransformerConfig.fp8_recipe (Megatron-LM's --fp8-recipe;
                                   mxfp8 is Blackwell-only and refused on Hopper)

megatron-core's own mechanism does the work: the two TransformerConfig fields are set on
the language model's config, and its `TransformerBlock.forward` enters
`megatron.core.fp8_utils.get_fp8_context(config)` (Transformer Engine's `fp8_autocast`
with `get_fp8_recipe(config)`: around the whole block for delayed scaling, per layer
otherwise). Every MLP and every other TE linear of the language model is wrapped
(`pad_tokens`, `padding_units`) so that a rank's token count need not be a multiple of 16
(FP8 GEMM shapes): megatron-core's
`prepare_model_for_fp8_inference` does the same with TE's fused (un)padding kernels, which
fault past 2^31 elements (TE 2.11 `multi_unpadding`: fc1's output at 68K tokens per rank of
the 7B shape, 256K tokens over 4 ranks, on an H100), so the padding here is torch's. Only the
language model's TE linears (QKV with its fused norm, output projection, fc1 with its fused
norm, fc2) run in FP8; the vision encoder, the LM head and the core attention stay in bf16
(docs/NOTES.md, "FP8", says why the attention does).

Errors are one line, raised before anything starts (`fp8_error`): on CPU, without
Transformer Engine, with local layers, on a GPU without FP8 (compute capability < 8.9),
for mxfp8 below Blackwell (< 10.0).
"""

from __future__ import annotations

import argparse
import functools
from typing import Callable, Optional, Tuple

import torch

FORMATS = ("e4m3", "hybrid")
#: Megatron's --fp8-recipe choices that this project accepts on the command line ("custom"
#: needs a quantizer factory: not offered); mxfp8 is refused below Blackwell
RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
#: the recipes Transformer Engine runs on Hopper (sm_90)
HOPPER_RECIPES = ("delayed", "tensorwise", "blockwise")
#: FP8 GEMMs need the token count (rows) to be a multiple of this
FP8_ROWS = 16


def add_fp8_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's --fp8-format and --fp8-recipe (only where the parser lacks them)."""
    options = parser._option_string_actions
    if "--fp8-format" not in options:
        parser.add_argument("--fp8-format", choices=FORMATS, default=None,
                            help="FP8 linears in the language model through Transformer Engine "
                                 "(megatron-core's TransformerConfig.fp8): e4m3 everywhere, or hybrid "
                                 "(e4m3 forward); needs --transformer-impl transformer_engine on a GPU "
                                 "with FP8 (Hopper, Ada, Blackwell) (default: off, bf16)")
    if "--fp8-recipe" not in options:
        parser.add_argument("--fp8-recipe", choices=RECIPES, default="delayed",
                            help="megatron-core's TransformerConfig.fp8_recipe: delayed (delayed "
                                 "scaling, Megatron's default), tensorwise (per-tensor current "
                                 "scaling), blockwise (block scaling); mxfp8 is Blackwell-only "
                                 "(default: %(default)s)")
    return parser


def fp8_error(fmt: Optional[str], recipe: Optional[str], device, transformer_impl: Optional[str],
              capability: Optional[Tuple[int, int]] = None) -> Optional[str]:
    """Why FP8 (`fmt` None: off) cannot run here, in one line, or None. device: "cpu",
    "cuda" or a torch.device; transformer_impl: the resolved --transformer-impl (None: not
    known yet); capability: the GPU's (major, minor) (default: read from the current GPU)."""
    if fmt is None:
        return None
    if fmt not in FORMATS:
        return f"--fp8-format must be one of {', '.join(FORMATS)}, got {fmt!r}"
    if recipe not in RECIPES:
        return f"--fp8-recipe must be one of {', '.join(RECIPES)}, got {recipe!r}"
    if torch.device(device).type != "cuda":
        return (f"--fp8-format {fmt}: FP8 runs on a CUDA GPU with FP8 tensor cores through Transformer "
                f"Engine; this run is on the CPU (drop --fp8-format, or --device cuda)")
    from .specs import te_available
    if not te_available():
        return (f"--fp8-format {fmt}: FP8 linears are Transformer Engine's, and Transformer Engine "
                f"(transformer_engine.pytorch) does not import here")
    if transformer_impl is not None and transformer_impl != "transformer_engine":
        return (f"--fp8-format {fmt}: FP8 linears are Transformer Engine's; use --transformer-impl "
                f"transformer_engine (got {transformer_impl})")
    if capability is None:
        if not torch.cuda.is_available():
            return f"--fp8-format {fmt}: CUDA is not available"
        capability = torch.cuda.get_device_capability()
    if tuple(capability) < (8, 9):
        return (f"--fp8-format {fmt}: this GPU (compute capability {capability[0]}.{capability[1]}) has "
                f"no FP8 tensor cores; FP8 needs Ada (8.9), Hopper (9.0) or newer")
    if recipe == "mxfp8" and tuple(capability) < (10, 0):
        return (f"--fp8-recipe mxfp8 is Blackwell-only (compute capability 10.0+), this GPU is "
                f"{capability[0]}.{capability[1]}; on Hopper use {', '.join(HOPPER_RECIPES)}")
    return None


def set_fp8(model, fmt: Optional[str], recipe: str = "delayed"):
    """Run the language model's TE linears in FP8 (`fmt` "e4m3" / "hybrid") or in the
    model's own dtype (`fmt` None), in place, through megatron-core: set
    TransformerConfig.fp8 / fp8_recipe on the config its modules share (its
    TransformerBlock enters `get_fp8_context` from them at every forward) and, for FP8, wrap
    its MLPs and other TE linears once with `pad_tokens` (`padding_units`; a wrapped module runs
    unpadded outside FP8). Check
    `fp8_error` first.
    Can be switched back and forth on one model. Returns the model."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    lm = model.language_model
    configs = {id(m.config): m.config for m in lm.modules() if isinstance(getattr(m, "config", None), TransformerConfig)}
    if fmt is not None:
        from megatron.core.enums import Fp8Recipe
        from megatron.core.fp8_utils import TE_LINEAR_TYPES  # () without TE
        padded = [m for m in padding_units(lm, TE_LINEAR_TYPES) if not getattr(m, "_spava_fp8_padded", False)]
        if padded:
            from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
            for m in padded:
                m.forward, m._spava_fp8_padded = pad_tokens(m.forward, FP8GlobalStateManager.is_fp8_enabled), True
    for config in configs.values():  # one shared object, or per-layer copies of it
        config.fp8 = fmt
        if fmt is not None:
            config.fp8_recipe = Fp8Recipe(recipe)
    return model


def padding_units(lm: torch.nn.Module, linear_types: tuple) -> list:
    """The modules of `lm` that `set_fp8` pads (`pad_tokens`): each MLP whose linears are of
    `linear_types` (TE's), as one unit, and every other such linear on its own. An MLP is
    padded once at its input, so fc1, the activation and fc2 all run on the padded rows; padding
    fc2's own input instead would copy the MLP's widest activation (s x ffn, 18,944 wide in
    the 7B shape) once more per layer. Empty when `linear_types` is () (no TE)."""
    from megatron.core.transformer.mlp import MLP
    if not linear_types:
        return []
    mlps = [m for m in lm.modules() if isinstance(m, MLP)
            and any(isinstance(c, linear_types) for c in m.modules())]
    inside = {id(c) for m in mlps for c in m.modules()}
    return mlps + [m for m in lm.modules() if isinstance(m, linear_types) and id(m) not in inside]


def pad_tokens(forward: Callable, enabled: Callable[[], bool]) -> Callable:
    """`forward` of a Megatron TE linear (input [s, b, h] -> output, or a tuple whose first
    element is the output [s, b, h_out]) wrapped so that, while `enabled()` (FP8 is on) and s
    is not a multiple of FP8_ROWS, the input gets zero rows up to the next multiple and the
    output loses them again (a view: rows are independent in a linear). Sequence-parallel
    linears are refused: their rows are split over the TP ranks before the GEMM."""
    owner = getattr(forward, "__self__", None)
    if getattr(owner, "sequence_parallel", False) or getattr(getattr(owner, "config", None), "sequence_parallel", False):
        raise ValueError("FP8 inference here pads each TE linear's tokens itself; sequence-parallel "
                         "linears are not supported (turn --sequence-parallel off for prefill)")

    @functools.wraps(forward)
    def padded(x, *args, **kwargs):
        s = x.shape[0]
        pad = -s % FP8_ROWS
        if not pad or not enabled():
            return forward(x, *args, **kwargs)
        out = forward(torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, pad)), *args, **kwargs)
        if isinstance(out, tuple):
            return (out[0][:s],) + tuple(out[1:])
        return out[:s]
    return padded
