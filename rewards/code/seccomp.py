"""A tiny seccomp filter for the sandbox: no new namespaces from inside it.

Why: the sandboxed candidate runs as an unprivileged uid with no capabilities, but on most
kernels any user may create a user namespace, and inside one it can mount a tmpfs, whose
pages no rlimit counts; that is a memory bomb around RLIMIT_AS. bubblewrap's own
``--disable-userns`` needs ``--unshare-user``, which the uid-per-slot design cannot use, so we
hand bubblewrap a classic-BPF program (``--seccomp FD``) that makes ``unshare``, ``setns``,
``clone`` with any namespace flag, and a few kernel-attack-surface calls fail with EPERM.
``clone3`` fails with ENOSYS so that libc falls back to ``clone``, whose flags we can read.
"""

from __future__ import annotations

import errno
import platform
import struct

# seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6]
_NR, _ARCH, _ARG0 = 0, 4, 16
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
_NAMESPACE_FLAGS = (
    0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
)

# arch -> (AUDIT_ARCH, clone, clone3, syscalls denied outright)
_TABLES = {
    "x86_64": (
        0xC000003E,
        56,
        435,
        # unshare, setns, bpf, perf_event_open, keyctl, add_key, request_key, userfaultfd,
        # io_uring_setup, mount, umount2, pivot_root, ptrace
        (272, 308, 321, 298, 250, 248, 249, 323, 425, 165, 166, 155, 101),
    ),
    "aarch64": (
        0xC00000B7,
        220,
        435,
        (97, 268, 280, 241, 219, 217, 218, 282, 425, 40, 39, 41, 117),
    ),
}


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def namespace_filter(machine: str | None = None) -> bytes | None:
    """The compiled filter for this machine's architecture, or None where we have no table."""
    table = _TABLES.get(machine or platform.machine())
    if table is None:
        return None
    arch, clone, clone3, denied = table
    deny, enosys = _ERRNO | errno.EPERM, _ERRNO | errno.ENOSYS
    program = [
        (_LD_ABS, 0, 0, _ARCH),
        (_JEQ, 1, 0, arch),
        (_RET, 0, 0, deny),  # another ABI (i386 int 0x80 on x86_64): deny everything
        (_LD_ABS, 0, 0, _NR),
        (_JGE, 0, 1, 0x40000000),  # x32 syscall numbers on x86_64
        (_RET, 0, 0, deny),
        (_JEQ, 0, 1, clone3),
        (_RET, 0, 0, enosys),
        (_JEQ, 0, 4, clone),  # not clone: on to the deny list
        (_LD_ABS, 0, 0, _ARG0),  # clone's flags (low 32 bits)
        (_JSET, 0, 1, _NAMESPACE_FLAGS),
        (_RET, 0, 0, deny),
        (_RET, 0, 0, _ALLOW),
    ]
    for number in denied:
        program += [(_JEQ, 0, 1, number), (_RET, 0, 0, deny)]
    program.append((_RET, 0, 0, _ALLOW))
    return b"".join(_insn(*insn) for insn in program)
