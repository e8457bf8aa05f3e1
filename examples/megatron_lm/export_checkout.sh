#!/usr/bin/env bash
# Copy the part of a Megatron-LM checkout that a pretrain_gpt.py launch needs (about 2 MB;
# megatron/core comes from the megatron-core wheel; no tests/docs/examples), e.g. to carry
# it to a GPU machine:
#
#   bash examples/megatron_lm/export_checkout.sh /path/to/Megatron-LM .megatron_lm [.whl]
#   TAG=core_v0.19.0 bash examples/megatron_lm/export_checkout.sh /path/to/Megatron-LM.git .megatron_lm019
#
# SRC may be a checkout (any state: the files are copied as they are) or a bare git
# directory (the tag $TAG, default core_v0.16.1, is exported from it). Any tag from
# core_v0.16.1 to core_v0.19.0: megatron/{legacy,post_training,rl,inference,elastification}
# are copied where the tag has them. With a third argument, the pure-Python `six` wheel
# (core_v0.16.1's tokenizer module imports it; the GPU image may lack it) is downloaded
# into that wheel folder too.
set -euo pipefail
src=${1:?usage: export_checkout.sh SRC DST [WHEEL_DIR]}
dst=${2:?usage: export_checkout.sh SRC DST [WHEEL_DIR]}
tag=${TAG:-core_v0.16.1}
paths=(pretrain_gpt.py gpt_builders.py model_provider.py megatron/training)
optional=(megatron/legacy megatron/post_training megatron/rl megatron/inference megatron/elastification)
rm -rf "$dst"; mkdir -p "$dst"
if [ -f "$src/HEAD" ] && [ -d "$src/objects" ]; then
  for p in "${optional[@]}"; do
    if [ -n "$(git --git-dir="$src" ls-tree "$tag" "$p")" ]; then paths+=("$p"); fi
  done
  git --git-dir="$src" archive "$tag" "${paths[@]}" | tar -x -C "$dst"
else
  for p in "${optional[@]}"; do if [ -e "$src/$p" ]; then paths+=("$p"); fi; done
  for p in "${paths[@]}"; do mkdir -p "$dst/$(dirname "$p")"; cp -r "$src/$p" "$dst/$p"; done
fi
find "$dst" -name __pycache__ -prune -exec rm -rf {} +
du -sh "$dst"
if [ -n "${3:-}" ]; then
  mkdir -p "$3" && python3 -m pip download -q --no-deps --only-binary=:all: -d "$3" six
  ls "$3" | grep -i six
fi
