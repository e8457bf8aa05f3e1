set -x
cd /work/main
B="python tools/eval_needles.py --nproc 2 --cp-sizes 2 --tokens 4096 --samples 6 --tasks ordering counting --hidden-samples 0"
$B --algos spava apb star --json /tmp/sweep/default.json --markdown /tmp/sweep/default.md
$B --algos spava --spava-passing-scale 2 --json /tmp/sweep/p2.json --markdown /tmp/sweep/p2.md
$B --algos spava --spava-passing-scale 4 --json /tmp/sweep/p4.json --markdown /tmp/sweep/p4.md
$B --algos spava --spava-anchor-divisor 16 --json /tmp/sweep/a16.json --markdown /tmp/sweep/a16.md
$B --algos spava --spava-anchor-divisor 16 --spava-passing-scale 4 --json /tmp/sweep/a16p4.json --markdown /tmp/sweep/a16p4.md
