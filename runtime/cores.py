"""How many physical performance cores this process may use: the kernels' default thread count.

Hyper-threads are counted once: two threads on one core share its load ports and caches, and a
decode step is bound by memory, so they only add barrier waits. On a hybrid CPU (Intel P/E cores,
Arm big.LITTLE, Apple silicon) only the performance cores count: every thread-pool job ends at a
barrier, so a thread on a slower core makes the job wait for it, and the memory-bound decode gains
nothing from the extra cores. Every platform falls back to os.cpu_count() when it cannot tell.
"""
from __future__ import annotations

import os
import struct
import sys

RELATION_PROCESSOR_CORE = 0   # LOGICAL_PROCESSOR_RELATIONSHIP value of a core record (Windows)


def physical_cores() -> int:
    """Physical performance cores this process may run on, at least 1.

    >>> physical_cores() >= 1
    True
    """
    counters = {"linux": _linux_cores, "darwin": _macos_cores, "win32": _windows_cores}
    counter = counters.get(sys.platform)
    try:
        found = counter() if counter else None
    except (OSError, AttributeError, ValueError):
        found = None
    return max(1, found or os.cpu_count() or 1)


def _linux_cores(sysfs: str = "/sys/devices", allowed: set[int] | None = None) -> int:
    """Distinct (package, core) pairs among the performance CPUs of this process's affinity mask
    (all of its CPUs when none of them is a performance CPU)."""
    allowed = set(os.sched_getaffinity(0)) if allowed is None else allowed
    cpus = (allowed & performance_cpus(sysfs, allowed)) or allowed
    cores = set()
    for cpu in sorted(cpus):
        try:
            core = _read(f"{sysfs}/system/cpu/cpu{cpu}/topology/core_id")
            package = _read(f"{sysfs}/system/cpu/cpu{cpu}/topology/physical_package_id")
            cores.add((package, core))
        except OSError:
            cores.add(("cpu", cpu))
    return len(cores)


def performance_cpus(sysfs: str, cpus: set[int]) -> set[int]:
    """The performance CPUs among `cpus`: Intel's hybrid parts list them under `cpu_core` (their
    efficiency CPUs under `cpu_atom`); Arm kernels give each CPU a `cpu_capacity`, the biggest
    cores the highest. All of `cpus` when the CPU is not hybrid or says nothing.

    >>> performance_cpus("/nonexistent", {0, 1}) == {0, 1}
    True
    """
    try:
        return parse_cpu_list(_read(f"{sysfs}/cpu_core/cpus"))
    except OSError:
        pass
    capacity = {}
    for cpu in cpus:
        try:
            capacity[cpu] = int(_read(f"{sysfs}/system/cpu/cpu{cpu}/cpu_capacity"))
        except (OSError, ValueError):
            return set(cpus)
    top = max(capacity.values(), default=0)
    return {cpu for cpu, c in capacity.items() if c == top}


def parse_cpu_list(text: str) -> set[int]:
    """The CPUs of a kernel cpu list such as "0-7,16,18-19".

    >>> sorted(parse_cpu_list("0-2,5"))
    [0, 1, 2, 5]
    """
    cpus = set()
    for part in filter(None, text.strip().split(",")):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _macos_cores() -> int | None:
    """Performance cores (hw.perflevel0, Apple silicon), else all physical cores."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    for name in (b"hw.perflevel0.physicalcpu", b"hw.physicalcpu"):
        value, size = ctypes.c_int(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_int))
        if libc.sysctlbyname(name, ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) == 0 \
                and value.value > 0:
            return value.value
    return None


def _windows_cores() -> int | None:
    """Core records of GetLogicalProcessorInformationEx(RelationProcessorCore)."""
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    size = wintypes.DWORD(0)
    kernel32.GetLogicalProcessorInformationEx(RELATION_PROCESSOR_CORE, None, ctypes.byref(size))
    if size.value == 0:
        return None
    buffer = ctypes.create_string_buffer(size.value)
    if not kernel32.GetLogicalProcessorInformationEx(RELATION_PROCESSOR_CORE, buffer, ctypes.byref(size)):
        return None
    return count_core_records(buffer.raw[:size.value])


def count_core_records(records: bytes) -> int:
    """Performance-core records in a SYSTEM_LOGICAL_PROCESSOR_INFORMATION_EX array: each record
    starts with its Relationship and its Size in bytes (two little-endian DWORDs); a core record's
    PROCESSOR_RELATIONSHIP then has its Flags and EfficiencyClass bytes, the class being higher
    on faster cores (all 0 on a CPU that is not hybrid).

    >>> count_core_records(b"")
    0
    """
    classes, offset = [], 0
    while offset + 8 <= len(records):
        relationship, size = struct.unpack_from("<II", records, offset)
        if size < 8:
            raise ValueError(f"processor record of {size} bytes at offset {offset}")
        if relationship == RELATION_PROCESSOR_CORE:
            classes.append(records[offset + 9] if size >= 10 else 0)
        offset += size
    return classes.count(max(classes)) if classes else 0
