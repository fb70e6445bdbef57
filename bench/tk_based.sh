#!/usr/bin/env bash
# Build ThunderKittens' Based prefill kernel (the seeds' own) as a PyTorch extension, as a benchmark peer.
#
#   bash bench/tk_based.sh TK_DIR          # TK_DIR: a checkout of HazyResearch/ThunderKittens (measured: 0b55588)
#
# Builds TK_DIR/kernels/based/_C*.so with TK's own Makefile (sm_90a, PyTorch-extension mode; about a minute),
# then `python bench/kernels.py --only tk --tk-dir TK_DIR` (and `python bench/la_fused.py --tk-dir TK_DIR`) time it.
# Needs nvcc (CUDA 12.x/13.x), a CUDA build of torch, pybind11 and a Hopper GPU; exits 2 with a message when
# a piece is missing. Nothing of TK is vendored here: clone it yourself.
set -euo pipefail
tk=${1:?usage: tk_based.sh TK_DIR}
dir="$tk/kernels/based"
if [ ! -f "$dir/linear_attn.cu" ]; then
  echo "tk_based.sh: $dir/linear_attn.cu not found: TK_DIR must be a ThunderKittens checkout" >&2; exit 2
fi
if ! command -v nvcc >/dev/null 2>&1; then
  echo "tk_based.sh: nvcc not found: the TK peer needs the CUDA compiler (skipped)" >&2; exit 2
fi
if ! python3 -c "import pybind11, torch; assert torch.version.cuda" 2>/dev/null; then
  echo "tk_based.sh: needs pybind11 and a CUDA build of torch in python3 (skipped)" >&2; exit 2
fi
ls "$dir"/_C*.so >/dev/null 2>&1 && { echo "tk_based.sh: already built: $(ls "$dir"/_C*.so)"; exit 0; }
make -C "$dir" GPU=H100 -j"$(nproc)" >"$dir/build.log" 2>&1 || { tail -30 "$dir/build.log" >&2; exit 1; }
echo "tk_based.sh: built $(ls "$dir"/_C*.so)"
