"""File-format benchmark: writer throughput, open() latency, verify() throughput.

In one run, on this machine:
  - BlobWriter on raw f32: a file of --size-gib GiB holding --tensors tensors. GB/s of the add()
    calls (bytes land in the page cache), and of the whole write including close() (fsync + rename),
    after a warm-up of plain file.write() calls of as many bytes (whose speed is shown too);
  - open() with full header and manifest validation of that file: median of --repeats calls
    (wall time, and CPU time: what it costs when other processes share the cores);
  - the same for a 1 MiB file with as many tensors: open() must be flat in file size (within 2x);
  - verify() GB/s over the large file (CRC32C of every blob, page cache warm), best of 3.
Prints a markdown table on stdout, progress on stderr; deletes its files at the end. Not a test:
nothing here asserts speed.

    python bench/bench_format.py [--size-gib 2] [--tensors 1000] [--repeats 25] [--dir DIR]
    python bench/bench_format.py --quick      # 64 MiB, a few seconds
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import blobstore
from blobstore._native import crc32c_path

SMALL_FILE_BYTES = 1 << 20
COLS = 1024  # f32 values per row: rows of 4 KiB, no row padding


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tensor_data(total_bytes: int, tensors: int) -> np.ndarray:
    """One random f32 array of about total_bytes/tensors bytes, reused for every tensor so that
    making data is not what gets timed."""
    values = max(1, total_bytes // tensors // 4)
    shape = (values // COLS, COLS) if values >= COLS else (values,)
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def write_file(path: Path, total_bytes: int, tensors: int, alignment: int) -> tuple[int, float, float]:
    """Write `tensors` f32 tensors of about total_bytes/tensors bytes each.

    Returns (data bytes, seconds in add(), seconds in close()).
    """
    array = tensor_data(total_bytes, tensors)
    writer = blobstore.BlobWriter(path, alignment=alignment)
    start = time.perf_counter()
    for index in range(tensors):
        writer.add(f"layers.{index}.weight", array)
    added = time.perf_counter()
    writer.close()
    return array.nbytes * tensors, added - start, time.perf_counter() - added


def plain_write_seconds(path: Path, total_bytes: int, tensors: int) -> float:
    """Seconds for bare file.write() calls of the same bytes: the page cache's own ceiling here."""
    array = tensor_data(total_bytes, tensors)
    with open(path, "wb") as f:
        start = time.perf_counter()
        for _ in range(tensors):
            f.write(array)
        f.flush()
        seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def median_open_seconds(path: Path, repeats: int) -> tuple[float, float]:
    """Median wall and CPU time of open() + close(), validation included (after a warm-up call).
    CPU time tells what open() costs when other processes share the cores."""
    blobstore.open(path).close()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        blobstore.open(path).close()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def best_verify_seconds(path: Path, repeats: int = 3) -> float:
    with blobstore.open(path) as reader:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            reader.verify()
            times.append(time.perf_counter() - start)
    return min(times)


def measure(args) -> list[tuple[str, str, str, bool | None]]:
    """Rows of (what, measured, target, met); met is None for figures without a target."""
    big_bytes = int(args.size_gib * (1 << 30))
    with tempfile.TemporaryDirectory(prefix="bench-format-", dir=args.dir) as tmp:
        big, small = Path(tmp) / "big.blob", Path(tmp) / "small.blob"
        # The first gigabytes a process writes into the page cache are slow on a VM (the host
        # backs guest memory on first touch): a plain write of the same size goes first, so the
        # writer is measured in the steady state a laptop is always in.
        log(f"warm-up: writing {big_bytes / 2**30:.2f} GiB with plain file.write() ...")
        plain_seconds = plain_write_seconds(Path(tmp) / "plain.bin", big_bytes, args.tensors)
        log(f"writing {big_bytes / 2**30:.2f} GiB in {args.tensors} tensors to {big} ...")
        data_bytes, add_seconds, close_seconds = write_file(big, big_bytes, args.tensors, alignment=4096)
        log(f"writing a 1 MiB file in {args.tensors} tensors ...")
        write_file(small, SMALL_FILE_BYTES, args.tensors, alignment=64)
        log(f"timing open() x {args.repeats} on each, then verify() ...")
        open_big = median_open_seconds(big, args.repeats)
        open_small = median_open_seconds(small, args.repeats)
        verify_seconds = best_verify_seconds(big)
        file_bytes, small_bytes = big.stat().st_size, small.stat().st_size

    write_rate = data_bytes / add_seconds / 1e9
    write_total = data_bytes / (add_seconds + close_seconds) / 1e9
    plain_rate = data_bytes / plain_seconds / 1e9
    verify_rate = file_bytes / verify_seconds / 1e9
    ratio = open_big[0] / open_small[0]
    return [
        ("writer, raw f32 into the page cache (add)", f"{write_rate:.2f} GB/s", ">= 1 GB/s", write_rate >= 1),
        ("warm-up: plain file.write() of as many bytes, first in the process", f"{plain_rate:.2f} GB/s", "", None),
        ("writer incl. close (fsync + rename)", f"{write_total:.2f} GB/s", "none: disk bound", None),
        (f"open(), {file_bytes / 2**30:.2f} GiB file, {args.tensors} tensors", milliseconds(*open_big),
         "< 20 ms", open_big[0] < 0.020),
        (f"open(), {small_bytes / 2**20:.2f} MiB file, {args.tensors} tensors", milliseconds(*open_small),
         "< 20 ms", open_small[0] < 0.020),
        ("open() large / small", f"{ratio:.2f}x", "<= 2x", ratio <= 2),
        (f"verify(), CRC32C ({crc32c_path()})", f"{verify_rate:.2f} GB/s", ">= 1 GB/s", verify_rate >= 1),
    ]


def milliseconds(wall: float, cpu: float) -> str:
    return f"{wall * 1e3:.2f} ms (CPU {cpu * 1e3:.2f} ms)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=2.0, help="size of the large file (default 2)")
    parser.add_argument("--tensors", type=int, default=1000, help="tensors per file (default 1000)")
    parser.add_argument("--repeats", type=int, default=25, help="open() calls per file (default 25)")
    parser.add_argument("--dir", help="where to write the files (default: the system temp directory)")
    parser.add_argument("--quick", action="store_true", help="a 64 MiB large file: a few seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_gib = 1 / 16
    rows = measure(args)
    print("| measure | result | target | met |\n|---|---:|---:|:---:|")
    for what, result, target, met in rows:
        print(f"| {what} | {result} | {target} | {'' if met is None else 'yes' if met else '**no**'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
