#!/usr/bin/env bash
# Every figure that needs a GPU, in one command: writes out/gpu_check/report.md and report.json (benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh            # one GPU: throughput, the four recipe methods with --resume, the
#                                           # projection of a CIFAR-100 run, then torch.compile; under 8 minutes
#   bash benchmarks/gpu_check.sh --smoke    # the same parts at toy sizes on CPU (CI runs it: tests/test_gpu_check.py)
#
# Other flags go to gpu_check.py (--budget S, --parts ..., --methods ..., --out DIR; see --help). PYTHON picks the
# interpreter (default: python3).
#
# The recipes need `datasets` and `evaluate` (and the teacher-cache rows `datasets`). On a machine that has neither
# and cannot download (a GPU machine without network), bring their wheels: on a machine with network, in the
# repository root,
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 pyarrow==26.0.1
#
# (match --python-version to the GPU machine's python3; pyarrow, 55 MB, is needed only where the machine's is older
# than 24). This script installs whatever is in .whl/ into a private folder on PYTHONPATH when those imports fail.
# If they still fail, the report says so and the parts that need them are skipped; the rest runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# Cheap checks (find_spec imports nothing); gpu_check.py imports them for real and reports what fails.
has() { "$PYTHON" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in sys.argv[1:]))" "$@"; }
if ! has torch transformers accelerate timm; then
    echo "gpu_check: $PYTHON lacks torch, transformers, accelerate or timm; nothing was run" >&2
    exit 2
fi
if ! has datasets evaluate; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
        echo "gpu_check: datasets/evaluate missing; installing the wheels in .whl/ into $site"
        if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            .whl/*.whl; then
            export PYTHONPATH="$PYTHONPATH:$site"
        fi
    else
        echo "gpu_check: datasets/evaluate missing and no wheels in .whl/: the recipe part will be skipped"
    fi
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
