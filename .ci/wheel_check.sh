#!/usr/bin/env bash
# The package as a user gets it: build the wheel, install it into a fresh virtual environment
# and run the README's first commands from outside the source tree (no configs/ folder there).
set -euo pipefail
PY=${1:-.venv/bin/python}
src=$(pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m build --wheel --outdir "$tmp/dist" "$src" > "$tmp/build.log" 2>&1 || { tail -20 "$tmp/build.log"; exit 1; }
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --upgrade pip
"$tmp/venv/bin/pip" install -q torch==2.13.0
"$tmp/venv/bin/pip" install -q "$tmp"/dist/*.whl
cd "$tmp"
export OMP_NUM_THREADS=1
./venv/bin/lorank -V
./venv/bin/lorank methods > /dev/null
./venv/bin/lorank compare --epochs 1 --train-subset 2000 --out cmp --quiet > /dev/null
test -f cmp/report.html
./venv/bin/lorank train mnist-mlp-dense --set train.epochs=1 --set data.train_subset=2000 \
    --out run --quiet > /dev/null
test -f run/summary.json
./venv/bin/lorank init mnist-mlp-dense > /dev/null && test -f mnist-mlp-dense.toml
echo "wheel check: installed wheel ran compare, train and init from outside the source tree"
