#!/usr/bin/env bash
# Can the installed torch use the GPU? setup.sh runs this after installing aha[gpu] on a machine
# where nvidia-smi lists a GPU: a torch wheel built for a newer CUDA than the driver supports
# imports fine and then reports no GPU, and aha would train on the CPU while rollout.engine=auto
# still picks the CUDA build of vLLM. Exit 0 when torch sees a GPU; otherwise exit 1 with one
# message saying what to do.
#
#   scripts/check_cuda.sh .venv/bin/python
set -uo pipefail

PY=${1:?usage: scripts/check_cuda.sh PYTHON}

fail() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# "1.2.3 < 1.10" as versions, not as strings
version_lt() {
    [ "$1" != "$2" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n 1)" = "$1" ]
}

report=$("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda or "none", torch.cuda.is_available())' 2>&1) \
    || fail "torch does not import in $PY: $(tail -n 1 <<<"$report")"
read -r torch_version torch_cuda available <<<"$(tail -n 1 <<<"$report")"
[ "$available" = True ] && exit 0

driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
driver_cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9.]*\).*/\1/p' | head -n 1)

if [ "$torch_cuda" = none ]; then
    fail "torch $torch_version is a CPU build, so aha would train on the CPU of this GPU machine;" \
        "pip found a CPU wheel (a cache or a local index): run '$PY -m pip uninstall -y torch'" \
        "and ./setup.sh again"
fi
if [ -n "$driver_cuda" ] && version_lt "$driver_cuda" "$torch_cuda"; then
    fail "torch $torch_version is built for CUDA $torch_cuda, but the NVIDIA driver" \
        "${driver:-on this machine} supports CUDA $driver_cuda at most, so torch sees no GPU;" \
        "update the driver to one for CUDA $torch_cuda or newer" \
        "(https://docs.nvidia.com/deploy/cuda-compatibility/), then run ./setup.sh again"
fi
fail "torch $torch_version (CUDA $torch_cuda) sees no GPU although nvidia-smi lists one" \
    "(driver ${driver:-unknown}, CUDA ${driver_cuda:-unknown}); check that this process may use it" \
    "(CUDA_VISIBLE_DEVICES, the container's --gpus) and what" \
    "'$PY -c \"import torch; torch.cuda.init()\"' says, then run ./setup.sh again"
