"""Allocates 64 blocks of 1 MiB with the C library's malloc, fills them, frees them all, four times over, and writes
the minor page faults of the last three rounds to ARGV[1]-rank<RANK>.txt. A process that keeps freed memory gets
the same pages back every round (about no faults after the first); with glibc's defaults free() returns the emptied
top of the heap to the OS, and each round faults its 16384 pages in again."""

import ctypes
import os
import resource
import sys

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
N, SIZE = 64, 2**20
blocks = (ctypes.c_void_p * N)()  # allocated up front: nothing the loop allocates stays above the blocks


def fill_and_free() -> None:
    for i in range(N):
        blocks[i] = libc.malloc(SIZE)
        libc.memset(blocks[i], 1, SIZE)
    for i in range(N):
        libc.free(blocks[i])


fill_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    fill_and_free()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
with open(f"{sys.argv[1]}-rank{os.environ['RANK']}.txt", "w") as f:
    f.write(f"{faults}\n")
