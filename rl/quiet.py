"""Third-party output a user cannot act on, silenced in one place.

Each entry is something a library prints on every run that says nothing about the run and that
no setting changes. Each is silenced precisely (its message and category, its logger, or the
library's own switch), never by a blanket filter, and ``AHA_VERBOSE=1`` keeps them all:

- vLLM's start-up log: its own tuning on a CPU (no tcmalloc, eager mode, set_num_threads
  ignored, ...). ``VLLM_LOGGING_LEVEL`` is ERROR unless set; WARNING or INFO shows it.
- DeepSpeed's accelerator probe, which accelerate imports wherever DeepSpeed is installed and
  which warns on every machine without a GPU ("Setting accelerator to CPU"): ``DS_ACCELERATOR``
  names the CPU where no GPU device file exists (rl/gpus.py), which is what the probe finds
  anyway. (Set with AHA_VERBOSE too: it chooses nothing the probe would not.)
- "`torch.distributed.reduce_op` is deprecated" (FutureWarning, twice): vLLM's Triton dispatcher
  looks at every attribute of torch.distributed when it is imported, the deprecated one too.
- "Triton not available, find_triton_kernels = []" (logger ``torch._library.triton``): torch
  looks for Triton kernels in vLLM's custom ops; CPU builds have no Triton (setup.sh removes it).
- "NUMA binding: Using MEMBIND policy ..." : vLLM's CPU worker binds its memory to its cores'
  node and says so in a C++ warning written straight to file descriptor 2, past Python's
  warnings; that line is dropped from descriptor 2 while the engine starts
  (``known_stderr_dropped``).
- transformers' progress bars and warnings (aha draws its own progress; ``quiet_transformers``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator

VERBOSE_VARIABLE = "AHA_VERBOSE"

# (message regex, category) of Python warnings known to be harmless
KNOWN_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"`torch\.distributed\.reduce_op` is deprecated", FutureWarning),
)
# logger: messages (regex, from the start) it logs that are known to be harmless
KNOWN_LOG_RECORDS: dict[str, tuple[str, ...]] = {
    "torch._library.triton": (r"Triton not available, find_triton_kernels = \[\]",),
}
# lines that C++ code writes straight to file descriptor 2 (regex, searched in the line)
KNOWN_STDERR_LINES: tuple[str, ...] = (
    r"\] Warning: NUMA binding: Using (MEMBIND|INTERLEAVE) policy for memory allocation",
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_VARIABLE, "").lower() in ("1", "true", "yes")


def quiet_third_parties() -> None:
    """Before vLLM, accelerate or DeepSpeed is imported (``aha``'s start, an engine's build).
    Safe to call again: each filter is installed once."""
    from rl.gpus import gpu_device_files

    if not gpu_device_files():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if verbose():
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    for message, category in KNOWN_WARNINGS:  # an equal filter is replaced, not added again
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, messages in KNOWN_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownRecords) for f in logger.filters):
            logger.addFilter(_DropKnownRecords(messages))


class _DropKnownRecords(logging.Filter):
    def __init__(self, messages: tuple[str, ...]) -> None:
        super().__init__()
        self.known = re.compile("|".join(f"(?:{m})" for m in messages))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.known.match(record.getMessage())


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # aha draws its own progress bars
    if not verbose():
        transformers.utils.logging.set_verbosity_error()


_KNOWN_STDERR = re.compile("|".join(f"(?:{line})" for line in KNOWN_STDERR_LINES).encode())


def is_known_stderr_line(line: bytes) -> bool:
    return _KNOWN_STDERR.search(line) is not None


@contextlib.contextmanager
def known_stderr_dropped() -> Iterator[None]:
    """File descriptor 2 through a pipe for the duration: every line goes on to the real stderr
    as it comes, except the KNOWN_STDERR_LINES. For code that writes there directly (C++)."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    thread = threading.Thread(target=_forward, args=(read_end, real), daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's last writer: the thread reads to the end and stops
        thread.join(timeout=10)
        if not thread.is_alive():  # else a child process still holds the pipe: it keeps `real`
            os.close(real)


def _forward(read_end: int, real: int) -> None:
    pending = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(read_end, 65536):
            *lines, pending = re.split(rb"(?<=[\r\n])", pending + chunk)
            _write(real, [line for line in lines if not is_known_stderr_line(line)])
        if pending and not is_known_stderr_line(pending):
            _write(real, [pending])
    os.close(read_end)


def _write(fd: int, lines: list[bytes]) -> None:
    data = b"".join(lines)
    while data:
        data = data[os.write(fd, data) :]
