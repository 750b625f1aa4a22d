"""torch's intra-op threads: all for the engine's thread, one for every other thread.

torch's OpenMP (libgomp) stops spinning between parallel regions once more threads run OpenMP
teams than there are CPUs, and then every small op of a decode step pays thread wake-ups: measured
on 2 cores, a batch-1 decode step went from 14 ms to 25-30 ms for good after one adapter load on a
background thread had run torch ops with 2 threads, and a step loop on any thread but the main one
ran as slow (its team beside the main thread's). ATen gives a thread, at its first parallel op, the
process-wide count last set by `torch.set_num_threads`; a thread that already ran one keeps its
own. So the engine's thread runs one with every thread, then the process-wide count drops to 1:
registry loads, request and HTTP threads, whenever they first use torch, use one thread.
"""
from __future__ import annotations

import threading

import torch


def claim_intra_op_threads() -> None:
    """Keep this thread's torch thread count and give every thread that has not used torch yet one."""
    torch.ones(1 << 17).sum()          # a parallel op: this thread's count is now its own
    other = threading.Thread(target=torch.set_num_threads, args=(1,), name="loramux-threads")
    other.start()
    other.join()
