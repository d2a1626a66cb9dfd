"""How many physical cores this process may use: the kernels' default thread count.

Hyper-threads are counted once: two threads on one core share its load ports and caches, and a
decode step is bound by memory, so they only add barrier waits. On a Mac, only the performance
cores count (the efficiency cores would make every thread-pool job wait for the slowest core).
Every platform falls back to os.cpu_count() when it cannot tell.
"""
from __future__ import annotations

import os
import struct
import sys

RELATION_PROCESSOR_CORE = 0   # LOGICAL_PROCESSOR_RELATIONSHIP value of a core record (Windows)


def physical_cores() -> int:
    """Physical cores this process may run on, at least 1.

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


def _linux_cores() -> int:
    """Distinct (package, core) pairs among the CPUs of this process's affinity mask."""
    cores = set()
    for cpu in sorted(os.sched_getaffinity(0)):
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id") as f:
                core = f.read().strip()
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id") as f:
                package = f.read().strip()
            cores.add((package, core))
        except OSError:
            cores.add(("cpu", cpu))
    return len(cores)


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
    """Core records in a SYSTEM_LOGICAL_PROCESSOR_INFORMATION_EX array: each record starts with
    its Relationship and its Size in bytes (two little-endian DWORDs)."""
    count, offset = 0, 0
    while offset + 8 <= len(records):
        relationship, size = struct.unpack_from("<II", records, offset)
        if size < 8:
            raise ValueError(f"processor record of {size} bytes at offset {offset}")
        count += relationship == RELATION_PROCESSOR_CORE
        offset += size
    return count
