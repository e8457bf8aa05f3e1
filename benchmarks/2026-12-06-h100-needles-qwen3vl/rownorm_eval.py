"""Scratch (not in the package): tools/eval_needles.py's evaluation with the scores of
rownorm_cov.py registered on every rank (variants spava-selection-rownorm, -rownorm-max).
Usage: PYTHONPATH=$PWD:<this folder> python rownorm_eval.py RANKS <eval_needles args incl. --json>."""
import json, sys


def evaluate_rownorm(argv):
    from rownorm_cov import register
    register()
    from megatron_spava.tasks import evaluate
    args = evaluate.build_parser().parse_args(argv)
    return evaluate.run(args)


if __name__ == "__main__":
    from megatron_spava.testing import run_ranks
    from megatron_spava.tasks.evaluate import markdown
    import rownorm_eval
    argv = sys.argv[2:]
    res = run_ranks(rownorm_eval.evaluate_rownorm, int(sys.argv[1]), argv, timeout=3000)[0]
    print(markdown(res))
    out = argv[argv.index("--json") + 1]
    json.dump(res, open(out, "w"), indent=1)
