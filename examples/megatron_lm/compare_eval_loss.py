#!/usr/bin/env python3
"""Run Megatron-LM's pretrain_gpt.py (evaluation only, mock data, TE layers) three ways and
check that the evaluation losses agree within bf16 noise:

  none   Megatron-LM as shipped, no context parallelism (TP ranks only)
  spava  --context-parallel-algo spava at full budget over TP x CP ranks (exact there)
  ring   --context-parallel-algo ring over TP x CP ranks (exact)

    python examples/megatron_lm/compare_eval_loss.py --megatron-lm /path/to/Megatron-LM --tp 1 --cp 1

It copies what a launch needs from the Megatron-LM checkout (any supported tag, core_v0.16.1
to core_v0.19.0: pretrain_gpt.py, gpt_builders.py, model_provider.py, megatron/training and,
where the tag has them, megatron/{legacy,post_training,rl,inference,elastification};
megatron/core comes from the installed megatron-core of the same minor version) into
--work, applies megatron_spava's patch for that tag there (tools/megatron_lm_patch.py
detects it), and runs examples/megatron_lm/launch.sh. The checkout
itself is never modified. Exit status 1 if a run fails or a loss differs from the
no-CP loss by more than --tolerance (relative).

One GPU runs TP=1 x CP=1 only (Megatron-LM initialises NCCL, which refuses two ranks on
one GPU); TP x CP > 1 needs TP x CP GPUs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
NEEDED = ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py", "megatron/training")
#: imported by megatron/training on some tags (core_v0.18+ has no megatron/legacy, core_v0.16
#: no megatron/elastification): copied where the checkout has them
OPTIONAL = ("megatron/legacy", "megatron/post_training", "megatron/rl", "megatron/inference",
            "megatron/elastification")
#: what megatron_spava.megatron_lm prints (rank 0) when its hooks build the layers and RoPE
HOOK_LINES = {"layer spec": r"megatron_spava: --context-parallel-algo {algo}: layer spec .* core attention \w+",
              "RoPE": r"megatron_spava: --context-parallel-algo {algo}: layout-aware RoPE"}
LOSS = re.compile(r"validation loss at .*? on (validation|test) set \| lm loss value: ([0-9.Ee+-]+)")


def copy_checkout(src: str, dst: str) -> None:
    """The parts of a Megatron-LM checkout a pretrain_gpt.py launch needs, into dst."""
    missing = [p for p in NEEDED if not os.path.exists(os.path.join(src, p))]
    if missing:
        raise SystemExit(f"{src} is not a Megatron-LM checkout: missing {missing}")
    if os.path.exists(dst):
        shutil.rmtree(dst)
    for rel in NEEDED + tuple(p for p in OPTIONAL if os.path.exists(os.path.join(src, p))):
        s, d = os.path.join(src, rel), os.path.join(dst, rel)
        os.makedirs(os.path.dirname(d), exist_ok=True)
        if os.path.isdir(s):
            shutil.copytree(s, d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(s, d)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)  # git apply wants a work tree


def apply_patch(checkout: str) -> str:
    """Apply the patch that fits `checkout`; returns the tag it is named after."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "megatron_lm_patch.py"), "apply",
                          checkout], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the patch does not apply:\n{out.stdout}{out.stderr}")
    print(out.stdout.strip())
    return re.search(r"megatron_lm_(core_v[\d.]+)\.patch", out.stdout).group(1)


def dataset_helpers_workaround(work: str) -> dict:
    """Megatron-LM runs `make -C <megatron/core/datasets>` at start-up to build the dataset
    helpers; the megatron-core wheel ships them prebuilt but without a Makefile, so that
    `make` fails and the launch exits. Put a `make` first on the launches' PATH that
    succeeds for exactly that call (no Makefile there, prebuilt helpers present) and runs
    the real make otherwise. Nothing installed is changed. Returns env overrides."""
    import shlex
    spec = importlib.util.find_spec("megatron.core.datasets")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("megatron-core is not importable: install megatron-core (>=0.16.1,<0.20)")
    datasets = os.path.abspath(list(spec.submodule_search_locations)[0])
    prebuilt = any(n.startswith("helpers_cpp") and n.endswith(".so") for n in os.listdir(datasets))
    if os.path.exists(os.path.join(datasets, "Makefile")) or not prebuilt:
        return {}
    bindir = os.path.join(work, "bin")
    os.makedirs(bindir, exist_ok=True)
    real = shutil.which("make")
    with open(os.path.join(bindir, "make"), "w") as f:
        f.write("#!/bin/sh\n# megatron_spava compare_eval_loss.py: the wheel's dataset helpers are prebuilt\n"
                f'if [ "$1" = "-C" ] && [ "$2" = {shlex.quote(datasets)} ]; then exit 0; fi\n'
                + (f"exec {shlex.quote(real)} \"$@\"\n" if real else "echo 'make: not installed' >&2; exit 127\n"))
    os.chmod(os.path.join(bindir, "make"), 0o755)
    print(f"{datasets} has prebuilt helpers and no Makefile: `make -C` there is a no-op for the launches")
    return {"PATH": bindir + os.pathsep + os.environ.get("PATH", "")}


def start(name, tp, cp, algo, checkout, work, env):
    """Start one launch, its output into WORK/NAME.log. Returns (process, log path)."""
    log = os.path.join(work, f"{name}.log")
    cmd = ["bash", os.path.join(HERE, "launch.sh"), str(tp), str(cp), algo]
    print(f"+ MEGATRON_LM_PATH={checkout} {' '.join(cmd)}  > {log}", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, **env, "MEGATRON_LM_PATH": checkout},
                                start_new_session=True)
    return proc, log


def finish(name, algo, proc, log, timeout):
    """Wait for a launch (killing its process group after `timeout` s); its losses or None."""
    import signal
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = "timeout"
    text = open(log).read()
    losses = {split: float(value) for split, value in LOSS.findall(text)}
    if algo != "none":  # the hooks say once that they ran: a launch they missed cannot pass
        missing = [what for what, pattern in HOOK_LINES.items() if not re.search(pattern.format(algo=algo), text)]
        if missing:
            print(f"{name}: FAILED: megatron_spava's hooks did not run ({', '.join(missing)} not "
                  f"reported in {log}): the launch used Megatron's own attention", flush=True)
            return None
    if rc != 0 or "validation" not in losses:
        tail = "\n".join(text.splitlines()[-40:])
        print(f"{name}: FAILED (exit {rc}); last lines of {log}:\n{tail}", flush=True)
        return None
    print(f"{name}: " + ", ".join(f"{k} loss {v:.6f}" for k, v in losses.items()), flush=True)
    return losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM_PATH"),
                   help="Megatron-LM checkout, core_v0.16.1 to core_v0.19.0 (default: $MEGATRON_LM_PATH)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default: %(default)s)")
    p.add_argument("--cp", type=int, default=1, help="context-parallel size (default: %(default)s)")
    p.add_argument("--work", default=None, help="work directory (default: a new temporary one)")
    p.add_argument("--tolerance", type=float, default=5e-3,
                   help="largest relative loss difference accepted (bf16 noise; default: %(default)s)")
    p.add_argument("--timeout", type=int, default=240, help="seconds per launch (default: %(default)s)")
    p.add_argument("--parallel", action="store_true",
                   help="start the three launches at once (each needs its own TP x CP GPUs, or, at "
                        "TP=CP=1, one GPU can hold all three: three separate 1-rank worlds)")
    p.add_argument("--json", help="write the losses here")
    p.add_argument("--prepare-only", action="store_true",
                   help="copy and patch the checkout into --work, then stop (no GPU needed)")
    args = p.parse_args(argv)
    if not args.megatron_lm:
        p.error("give --megatron-lm or set MEGATRON_LM_PATH")
    work = args.work or tempfile.mkdtemp(prefix="megatron_lm_")
    os.makedirs(work, exist_ok=True)
    checkout = os.path.join(work, "Megatron-LM")
    copy_checkout(os.path.abspath(args.megatron_lm), checkout)
    tag = apply_patch(checkout)
    if args.prepare_only:
        print(f"prepared {checkout}")
        return 0
    env = dataset_helpers_workaround(work)
    runs = {"none": (args.tp, 1, "none"), "spava": (args.tp, args.cp, "spava"),
            "ring": (args.tp, args.cp, "ring")}
    losses = {}
    if args.parallel:
        started = {name: start(name, *spec, checkout, work, env) for name, spec in runs.items()}
        for name, (proc, log) in started.items():
            losses[name] = finish(name, runs[name][2], proc, log, args.timeout)
    else:
        for name, spec in runs.items():
            losses[name] = finish(name, spec[2], *start(name, *spec, checkout, work, env), args.timeout)
    import megatron.core
    print(f"\nMegatron-LM {tag} (patch) pretrain_gpt.py --skip-train, megatron-core "
          f"{getattr(megatron.core, '__version__', '?')}, mock data, TE layers, bf16, "
          f"TP={args.tp}, CP={args.cp} (none: CP=1)")
    print(f"| run | validation loss | test loss | rel. diff vs none |")
    print(f"|---|---|---|---|")
    ok = all(v is not None for v in losses.values())
    base = losses["none"]
    for name, value in losses.items():
        if value is None:
            print(f"| {name} | failed | | |")
            continue
        diff = max(abs(value[k] - base[k]) / abs(base[k]) for k in value if k in base) if base else float("nan")
        ok &= name == "none" or diff <= args.tolerance
        print(f"| {name} | {value.get('validation', float('nan')):.6f} | {value.get('test', float('nan')):.6f} "
              f"| {diff:.2e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(megatron_lm=tag, tp=args.tp, cp=args.cp, tolerance=args.tolerance,
                           losses=losses, ok=ok), f, indent=1)
    print("OK: the losses agree" if ok else f"FAIL: a run failed or differs by more than {args.tolerance}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
