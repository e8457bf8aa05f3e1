"""`--context-parallel-algo` and `--spava-*` options for Megatron launch scripts.

    from megatron_spava.arguments import add_spava_args, validate_spava_args
    initialize_megatron(extra_args_provider=add_spava_args)   # or pretrain(..., extra_args_provider=...)
    config = validate_spava_args(get_args())                  # SpavaConfig, or ValueError

The algorithm choices and their help come from the registry (`megatron_spava.algos`).
When the parser already has `--context-parallel-algo` (the Megatron-LM patch in patches/
adds it to Megatron's own arguments), `add_spava_args` gives that option the registry's
choices and help instead of adding a second one. Every ablation switch of SpavaConfig
(`config.SWITCHES`) gets a `--spava-no-<switch>` flag.
"""

from __future__ import annotations

import argparse
from typing import Optional

from .algos import names, plan_layout, registry
from .config import KERNELS, MERGE_KERNELS, SWITCHES, SpavaConfig
from .algos.spava.selection import DEFAULT_SELECTION, SCORERS


def _anchor(value: str):
    if value == "block":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'block', got {value!r}")


def _algorithm(value: str) -> str:
    """--context-parallel-algo's type: a registered name; one that is known but cannot run
    here (megatron without Transformer Engine) says why instead of "invalid choice"."""
    if value in registry.unavailable():
        raise argparse.ArgumentTypeError(registry.unavailable()[value])
    return value


def add_spava_args(parser: argparse.ArgumentParser, *, algorithm: bool = True) -> argparse.ArgumentParser:
    """Add the options to `parser` (Megatron's extra_args_provider contract). Returns it.
    algorithm=False adds only the budgets, switches and kernel (for tools that choose the
    algorithms and take the query from the prompt themselves, e.g. tools/eval_needles.py)."""
    group = parser.add_argument_group(
        "context-parallel attention (megatron_spava)",
        "Which algorithm attends across the context-parallel group, and Spava's budgets "
        "and ablation switches (SPAVA.md sections 5-6).")
    algo_help = (registry.help_text() + ". Unset: Megatron's own CP attention").replace("%", "%%")
    existing = parser._option_string_actions.get("--context-parallel-algo")
    if algorithm and existing is None:
        group.add_argument("--context-parallel-algo", choices=names(), default=None, type=_algorithm,
                           help=algo_help)
    elif algorithm:  # Megatron-LM's (patched) option: the registry decides its choices
        existing.choices, existing.help, existing.type = names(), algo_help, _algorithm
    if algorithm:
        group.add_argument("--spava-query-len", type=int, default=128,
                           help="tokens at the end of each sequence that form the query (question + "
                                "assistant prefix); they are replicated and computed exactly "
                                "(default: %(default)s)")
    group.add_argument("--spava-anchor-len", type=_anchor, default=None,
                       help="anchor tokens, or 'block' for a block-sized anchor "
                            "(default: n // --spava-anchor-divisor rounded up to --spava-budget-align)")
    group.add_argument("--spava-passing-len", type=int, default=None,
                       help="passing tokens kept per block and KV head (default: n // "
                            "--spava-passing-divisor, rounded up, times --spava-passing-scale)")
    group.add_argument("--spava-anchor-divisor", type=int, default=64, help="(default: %(default)s)")
    group.add_argument("--spava-passing-divisor", type=int, default=128, help="(default: %(default)s)")
    group.add_argument("--spava-passing-scale", type=int, default=1,
                       help="multiplier on the default passing budget (default: %(default)s)")
    group.add_argument("--spava-budget-align", type=int, default=128,
                       help="budgets are multiples of this (default: %(default)s)")
    group.add_argument("--spava-pool-kernel", type=int, default=5,
                       help="odd max-pool width smoothing selection scores (default: %(default)s)")
    group.add_argument("--spava-max-query-len", type=int, default=8192,
                       help="longest query accepted (default: %(default)s)")
    group.add_argument("--spava-context-probe-len", type=int, default=64,
                       help="with --spava-no-fuse-query: the anchor's last tokens whose queries "
                            "select the passing blocks of the context pass (default: %(default)s)")
    group.add_argument("--spava-selection", choices=sorted(SCORERS), default=DEFAULT_SELECTION,
                       help="the score that selects the passing blocks' keys: lse (each key's "
                            "log-sum-exp over the query's tokens and heads), mean (the reference's "
                            "mean-query probe), or one registered in megatron_spava.algos.spava.selection "
                            "(default: %(default)s)")
    for switch, effect in SWITCHES.items():
        group.add_argument(f"--spava-no-{switch.replace('_', '-')}", action="store_true",
                           help=f"ablation: {effect}")
    group.add_argument("--spava-kernel", choices=KERNELS, default="auto",
                       help="attention kernel (default: %(default)s: fastest measured for the device)")
    group.add_argument("--spava-merge-kernel", choices=MERGE_KERNELS, default="auto",
                       help="LSE merge of attention partials: torch (elementwise ops), triton (one fused "
                            "kernel; CUDA) or auto (triton on CUDA where it imports) (default: %(default)s)")
    group.add_argument("--spava-check-ranks-agree", action="store_true",
                       help="validate inputs collectively, so a bad input on one rank raises "
                            "on all (one extra all-gather per layer)")
    return parser


def spava_config_from_args(args: argparse.Namespace) -> SpavaConfig:
    """The SpavaConfig the `--spava-*` options describe (ValueError if invalid, or if an
    option is set that an ablation switch makes meaningless)."""
    if getattr(args, "spava_no_passing", False):
        moot = [flag for flag, value, default in (
            ("--spava-passing-len", args.spava_passing_len, None),
            ("--spava-passing-divisor", args.spava_passing_divisor, 128),
            ("--spava-passing-scale", args.spava_passing_scale, 1)) if value != default]
        if moot:
            raise ValueError(f"{', '.join(moot)} sets the passing budget, which --spava-no-passing "
                             f"turns off: give one or the other")
    return SpavaConfig(
        anchor_len=args.spava_anchor_len, passing_len=args.spava_passing_len,
        anchor_divisor=args.spava_anchor_divisor, passing_divisor=args.spava_passing_divisor,
        passing_scale=args.spava_passing_scale, budget_align=args.spava_budget_align,
        pool_kernel=args.spava_pool_kernel, max_query_len=args.spava_max_query_len,
        context_probe_len=args.spava_context_probe_len, selection=args.spava_selection,
        kernel=args.spava_kernel, merge_kernel=args.spava_merge_kernel,
        check_ranks_agree=args.spava_check_ranks_agree,
        **{switch: not getattr(args, f"spava_no_{switch}") for switch in SWITCHES})


def validate_spava_args(args: argparse.Namespace, seq_length: Optional[int] = None) -> SpavaConfig:
    """Check the options against the model and parallel sizes in `args` (Megatron's
    names: num_attention_heads, num_query_groups, tensor_model_parallel_size,
    context_parallel_size, seq_length). Raises ValueError naming the problem; returns the
    SpavaConfig the options describe (before the algorithm's preset, which plan_layout
    applies). Every rank parses the same arguments, so every rank raises the same error."""
    algo = args.context_parallel_algo
    try:
        config = spava_config_from_args(args)
        registry.get(algo).config(config)  # the algorithm's preset may refuse a setting
    except ValueError as err:
        raise ValueError(f"--context-parallel-algo {algo}: {err}") from None
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    cp = getattr(args, "context_parallel_size", 1) or 1
    heads = getattr(args, "num_attention_heads", None)
    groups = getattr(args, "num_query_groups", None) or heads
    if heads is not None:
        if heads % tp:
            raise ValueError(f"--num-attention-heads {heads} is not divisible by "
                             f"--tensor-model-parallel-size {tp}")
        if groups % tp and tp % groups:
            raise ValueError(f"--num-query-groups {groups} and --tensor-model-parallel-size {tp}: "
                             f"one must divide the other")
    seq_length = seq_length if seq_length is not None else getattr(args, "seq_length", None)
    if seq_length is not None:
        query = args.spava_query_len
        if not 1 <= query < seq_length:
            raise ValueError(f"--spava-query-len {query} must be in [1, seq_length={seq_length})")
        try:
            plan_layout(algo, context_len=seq_length - query, query_len=query, cp_size=cp,
                        config=config)
        except ValueError as err:
            raise ValueError(f"--context-parallel-algo {algo} with --context-parallel-size {cp} "
                             f"and --seq-length {seq_length}: {err}") from None
    return config
