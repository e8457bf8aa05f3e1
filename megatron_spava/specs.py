"""Layer specs: megatron-core's GPT layer with our context-parallel core attention, on
either of megatron-core's two backends, and the command-line choice between them.

  local  megatron-core's own ColumnParallel/RowParallel linears and torch norms (no TE)
  te     Transformer Engine linears with the pre-attention and pre-MLP norms fused into
         linear_qkv / linear_fc1 (TE must be importable); Megatron-LM calls this backend
         `--transformer-impl transformer_engine`

    spec = get_gpt_layer_spec("te", normalization="RMSNorm")           # same kwargs as "local"
    add_transformer_impl_arg(parser)                                   # --transformer-impl, --cp-comm-type
    impl = resolve_transformer_impl(args.transformer_impl, device)     # default: TE on CUDA if it imports

The two backends name the layer norms differently (TE fuses them into the next linear);
`state_dict_for_backend` maps a state dict between the two layouts, bit-exactly.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import re
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

from .algos import get as get_algorithm
from .modules import SpavaCoreAttention

BACKENDS = ("local", "te")
#: Megatron-LM's `--transformer-impl` values, and the backend each selects.
TRANSFORMER_IMPLS = {"local": "local", "transformer_engine": "te"}
#: TE's context-parallel communication types (Megatron-LM's `--cp-comm-type`).
CP_COMM_TYPES = ("p2p", "a2a", "all_gather", "a2a+p2p")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")


def te_available() -> bool:
    """Whether Transformer Engine's PyTorch extension imports."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken or CPU-only install
        return False
    return True


def _backend(name: str) -> str:
    name = TRANSFORMER_IMPLS.get(name, name)
    if name not in BACKENDS:
        raise ValueError(f"unknown layer-spec backend {name!r}; choose from {BACKENDS} "
                         f"(or Megatron-LM's names {tuple(TRANSFORMER_IMPLS)})")
    return name


def _check_kwargs(fn, kwargs: Mapping, backend: str, extra: Iterable[str] = ()) -> None:
    allowed = set(inspect.signature(fn).parameters) | set(extra)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"get_gpt_layer_spec({backend!r}): unknown keyword argument(s) {unknown}; "
                        f"accepted: {sorted(allowed)}")


def get_gpt_layer_spec(backend: str = "local", *, algo: Optional[str] = None, core_attention=None,
                       **kwargs) -> ModuleSpec:
    """megatron-core's GPT layer spec for `backend` ("local" or "te", or Megatron-LM's
    "transformer_engine"), with a context-parallel core attention swapped in: `core_attention`
    if given, else the module the registry entry of `algo` names (Megatron's own CP), else
    SpavaCoreAttention (which runs every algorithm that is an attention function).

    kwargs are those of megatron-core's `get_gpt_layer_local_spec` for both backends
    (num_experts, qk_layernorm, normalization, ...), plus the TE-only ones for "te"
    (use_te_op_fuser, use_te_activation_func). TE's layers read the norm type from
    `TransformerConfig.normalization`, not from the spec: for "te", `normalization` is
    checked against the config when the layer is built (ValueError if they differ).
    Unknown kwargs raise TypeError naming the accepted ones. Raises ImportError naming
    transformer_engine when backend="te" and it is not importable.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    backend = _backend(backend)
    if core_attention is None and algo is not None:
        core_attention = get_algorithm(algo).core_attention
    core_attention = core_attention or SpavaCoreAttention
    params = {}
    if backend == "local":
        _check_kwargs(gpt_layer_specs.get_gpt_layer_local_spec, kwargs, backend)
        spec = gpt_layer_specs.get_gpt_layer_local_spec(**kwargs)
    else:
        if not te_available():
            raise ImportError(
                "the 'te' layer spec (--transformer-impl transformer_engine) needs NVIDIA "
                "Transformer Engine (the transformer_engine package, on a CUDA machine); it is "
                "not importable here. Use backend='local' (--transformer-impl local) for "
                "megatron-core's own layers")
        te_spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
        _check_kwargs(te_spec, kwargs, backend, extra=("normalization",))
        normalization = kwargs.pop("normalization", None)
        if normalization is not None and normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization={normalization!r}: TE layers support {NORMALIZATIONS}")
        spec = te_spec(**kwargs)
        if normalization is not None:  # checked when the layer is built (TE reads the config)
            params["expected_normalization"] = normalization
    attention = spec.submodules.self_attention
    if not hasattr(attention.submodules, "core_attention"):
        raise ValueError("this layer spec has no core_attention to replace (MLA is not supported)")
    attention.submodules.core_attention = (ModuleSpec(module=core_attention, params=params)
                                            if params else core_attention)
    return spec


# ---- the language model's fused kernels (Megatron-LM's defaults on TE layers) -------------

LM_FUSIONS = ("none", "megatron", "te-ops")


def resolve_lm_fusions(choice: Optional[str], backend: str, fp8: bool = False) -> str:
    """The language model's fusions for `backend` ("local"/"te" or a --transformer-impl name):
    `choice` checked, or its default when None: on TE layers "megatron", or "te-ops" when the
    linears run in FP8 (`fp8`); "none" on local ones.

    "none": every elementwise stage its own PyTorch kernels (what runs on the CPU);
    "megatron": what Megatron-LM turns on by default, megatron-core's fused SwiGLU and
    residual add (`bias_activation_fusion`, `bias_dropout_fusion`) and TE's fused RoPE
    (`apply_rope_fusion`); "te-ops": "megatron" plus TE's operation fuser for the MLP
    (`use_te_op_fuser`). Anything but "none" needs TE layers (TE provides the fused RoPE;
    the fused paths are CUDA kernels). Same math; roundings may differ in the last bits.
    Why te-ops only with FP8 (BENCHMARKS.md section 13, 2026-12-06 17:27, one process): its
    fuser writes the SwiGLU's output in FP8 for fc2, so FP8 dense layers ran 2.5-3.8% faster
    than under "megatron" (1.64x bf16 against 1.57-1.59x); in bf16 the two were within 1%."""
    backend = _backend(backend)
    choice = choice or (("te-ops" if fp8 else "megatron") if backend == "te" else "none")
    if choice not in LM_FUSIONS:
        raise ValueError(f"lm_fusions={choice!r}: choose one of {LM_FUSIONS}")
    if choice != "none" and backend != "te":
        raise ValueError(f"lm_fusions={choice!r} needs Transformer Engine layers "
                         f"(--transformer-impl transformer_engine); local layers run 'none'")
    return choice


def add_lm_fusions_arg(parser, several: bool = False):
    """Add `--lm-fusions` (the language model's fused kernels, `resolve_lm_fusions`) to
    `parser` or an argument group; several: it takes several values (one model each, for
    benchmarks). Returns the parser."""
    parser.add_argument(
        "--lm-fusions", choices=LM_FUSIONS, nargs="+" if several else None, default=None,
        help="the language model's fused kernels on TE layers: 'megatron' (Megatron-LM's defaults: "
             "fused SwiGLU, residual add and RoPE), 'te-ops' (plus Transformer Engine's operation "
             "fuser for the MLP) or 'none'" + ("; several: one model each, in this process, results "
                                               "keyed '<algo>+<fusions>'" if several else "")
             + " (default on TE layers: 'megatron', or 'te-ops' with --fp8-format; 'none' on local ones)")
    return parser


def lm_fusion_settings(choice: Optional[str], backend: str) -> Tuple[Dict[str, bool], Dict[str, bool]]:
    """(TransformerConfig fields, get_gpt_layer_spec kwargs) of the fusions `choice`
    (`resolve_lm_fusions`) for `backend`."""
    choice = resolve_lm_fusions(choice, backend)
    on = choice != "none"
    config = dict(bias_activation_fusion=on, bias_dropout_fusion=on, apply_rope_fusion=on)
    spec = dict(use_te_op_fuser=True) if choice == "te-ops" else {}
    return config, spec


# ---- the command line: --transformer-impl and --cp-comm-type -------------------------

def add_transformer_impl_arg(parser: argparse.ArgumentParser, *,
                             cp_comm_type: bool = True) -> argparse.ArgumentParser:
    """Add Megatron-LM's `--transformer-impl {local,transformer_engine}` and (unless
    cp_comm_type=False) `--cp-comm-type {p2p,a2a,all_gather,a2a+p2p}`, each only if the
    parser lacks it (Megatron-LM's own parser has both). Returns the parser."""
    options = parser._option_string_actions
    if "--transformer-impl" not in options:
        parser.add_argument(
            "--transformer-impl", choices=tuple(TRANSFORMER_IMPLS), default=None,
            help="layers: megatron-core's own (local) or Transformer Engine's (transformer_engine) "
                 "(default: transformer_engine when TE imports and the device is CUDA, else local)")
    if cp_comm_type and "--cp-comm-type" not in options:
        parser.add_argument(
            "--cp-comm-type", choices=CP_COMM_TYPES, default="p2p",
            help="for --context-parallel-algo megatron: how Transformer Engine's own context "
                 "parallelism exchanges K/V (default: %(default)s)")
    return parser


def resolve_transformer_impl(value: Optional[str], device, *, verbose: bool = True) -> str:
    """The `--transformer-impl` to use: `value` if given (ValueError if it is
    transformer_engine and TE does not import, or the device is not CUDA), else
    transformer_engine when TE imports and `device` is CUDA, else local. Prints the choice
    (once per process) when verbose."""
    cuda = torch.device(device).type == "cuda"
    if value is None:
        value = "transformer_engine" if cuda and te_available() else "local"
        why = "default"
    elif value not in TRANSFORMER_IMPLS:
        raise ValueError(f"--transformer-impl must be one of {tuple(TRANSFORMER_IMPLS)}, got {value!r}")
    else:
        why = "chosen"
    if value == "transformer_engine":
        if not te_available():
            raise ValueError("--transformer-impl transformer_engine: Transformer Engine "
                             "(transformer_engine.pytorch) does not import here; use "
                             "--transformer-impl local")
        if not cuda:
            raise ValueError("--transformer-impl transformer_engine runs on CUDA only: add "
                             "--device cuda or use --transformer-impl local")
    if verbose:
        _announce(value, why)
    return value


@functools.lru_cache(maxsize=None)
def _announce(value: str, why: str) -> None:
    rank = 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
    if rank == 0:
        print(f"transformer impl: {value} ({why}; Transformer Engine "
              f"{'available' if te_available() else 'not available'})", flush=True)


def backend_for_impl(impl: str) -> str:
    """get_gpt_layer_spec's backend name for a `--transformer-impl` value."""
    return _backend(impl)


# ---- state-dict key layouts of the two backends ------------------------------------

@functools.lru_cache(maxsize=1)
def _norm_key_map() -> Tuple[Tuple[str, str], ...]:
    """(local prefix, TE prefix) of the fused norms, as megatron-core's local spec declares
    them for dist checkpoints (its `sharded_state_dict_keys_map`), e.g.
    ("input_layernorm.", "self_attention.linear_qkv.layer_norm_")."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    mapping = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map
    return tuple(sorted(mapping.items()))


_LAYER = re.compile(r"^(?P<head>(?:.*\.)?layers\.\d+\.)(?P<rest>.+)$")


def local_to_te_key(name: str) -> str:
    """A local-layout state-dict key in the TE layout (unchanged if nothing maps):
    decoder.layers.3.input_layernorm.weight -> decoder.layers.3.self_attention.linear_qkv.layer_norm_weight."""
    m = _LAYER.match(name)
    if m:
        for local, te in _norm_key_map():
            if m["rest"].startswith(local):
                return m["head"] + te + m["rest"][len(local):]
    return name


def te_to_local_key(name: str) -> str:
    """The inverse of `local_to_te_key`."""
    m = _LAYER.match(name)
    if m:
        for local, te in _norm_key_map():
            if m["rest"].startswith(te):
                return m["head"] + local + m["rest"][len(te):]
    return name


def is_extra_state(name: str) -> bool:
    return name.endswith("._extra_state") or name == "_extra_state"


def backend_of_keys(names: Iterable[str]) -> str:
    """"te" if the keys hold fused norms (linear_qkv.layer_norm_weight), else "local"."""
    return "te" if any(te_to_local_key(n) != n for n in names) else "local"


def state_dict_for_backend(state: Mapping[str, object], backend: str) -> Dict[str, object]:
    """`state` (a model state dict in either layout) with its keys in `backend`'s layout.
    Values are passed through untouched (a pure renaming, so bit-exact both ways);
    `_extra_state` entries are dropped: they hold per-backend metadata (TE's FP8 state),
    never weights."""
    to = local_to_te_key if _backend(backend) == "te" else (lambda n: n)
    out: Dict[str, object] = {}
    for name, value in state.items():
        if is_extra_state(name):
            continue
        key = to(te_to_local_key(name))
        if key in out:
            raise ValueError(f"state dict maps two keys to {key!r}")
        out[key] = value
    return out


def load_state_dict_any_layout(model: torch.nn.Module, state: Mapping[str, object]) -> None:
    """Load a state dict written by either backend into `model` (strict on weights: every
    parameter and buffer must be there; only `_extra_state` may be missing)."""
    backend = backend_of_keys(model.state_dict().keys())
    result = model.load_state_dict(state_dict_for_backend(state, backend), strict=False)
    missing = [k for k in result.missing_keys if not is_extra_state(k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"state dict does not fit the {backend} model: missing {missing[:5]}, "
                         f"unexpected {list(result.unexpected_keys)[:5]}")


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Every floating-point parameter of `module` in `dtype`, in place (megatron-core's local
    spec creates its torch norms in float32 whatever `params_dtype` is; buffers such as
    RoPE frequencies are left alone). Returns the module."""
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return module
