"""Where served adapters' weights are, and getting them there without stalling the engine.

Tiers: the device slots (LoraStacks, the tensors the LoRA kernels read), a bounded LRU of parsed
weights in host memory, the files on disk. Moving an adapter up is slow next to an engine step
(measured on the embedded model before loads read one buffer: an r=16 q/k/v/o adapter ~28-50 ms to
read and check, an r=64 all-linear one ~180 ms; writing a slot 15-110 ms), so both moves run in the
background:
`try_acquire`, called by the engine's scheduler, only does bookkeeping. It returns a lease when the
adapter is ready, else None after starting what is missing (a load into the host tier, a copy into
a free or idle slot). `prefetch` starts the load as soon as a request arrives, so loads run in
arrival order.

Loads wait their turn (`_deferred`, arrival order) while as many adapters as half the host tier
holds are loading or loaded for no slot yet: loading further ahead would push adapters out of the
host tier before their slots are written, to be read again.

Loads and slot writes have pools of their own: a slot write (the last step before a request can
run) never queues behind other adapters' loads, and `LOAD_WORKERS` loads run at once, so one read
stuck on a slow disk holds up no other adapter. Their threads use one torch thread each
(engine/cpu_threads.py), beside the engine's step.

A slot being written belongs to no lease and is read by no step (a step reads only its leases'
slots), so the copy runs while the engine steps. It is reserved (`placing`) until written, and
never chosen as another adapter's slot meanwhile. Part of the registry: state is guarded by its lock.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from .errors import AdapterError
from .formats import Weights
from .host_cache import LruCache
from .records import AdapterRecord, Lease
from .slots import LoraStacks, SlotTable

log = logging.getLogger(__name__)

# Loads at once: reading a file waits on the disk and safetensors' parsing holds the GIL only in part,
# so two overlap on 2 cores; more would only crowd the engine's step.
LOAD_WORKERS = 2


class Residency:
    def __init__(self, stacks: LoraStacks, max_host_adapters: int, lock: threading.RLock,
                 load: Callable[[AdapterRecord], Weights], on_drop: Callable[[AdapterRecord], None]) -> None:
        self.stacks = stacks
        self._lock = lock
        self._ready = threading.Condition(lock)       # notified when a background load or copy ends
        self._load, self._on_drop = load, on_drop
        self._slots: SlotTable[AdapterRecord] = SlotTable(stacks.num_slots)
        self.host: LruCache[AdapterRecord, Weights] = LruCache(max_host_adapters)
        self._loader = ThreadPoolExecutor(max_workers=LOAD_WORKERS, thread_name_prefix="loramux-adapter-load")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramux-adapter-write")
        self._deferred: OrderedDict[AdapterRecord, None] = OrderedDict()   # loads waiting their turn
        self._in_flight = 0                            # loads submitted and not ended
        self._unplaced: set[AdapterRecord] = set()     # loaded for a request, no slot written since
        self.loads = 0                                 # background loads and slot writes, for metrics
        self.slot_writes = 0

    def tier(self, r: AdapterRecord) -> str:
        if (r.slot >= 0 and not r.placing) or (r.kind == "prefix" and r in self.host):
            return "device"  # a cached prefix's KV already lives on the device
        return "host" if r in self.host else "disk"

    # -- called with the registry's lock held ------------------------------------------------------
    def prefetch(self, record: AdapterRecord) -> None:
        if record.slot < 0 and record not in self.host:
            self._start_load(record)

    def try_acquire(self, record: AdapterRecord) -> Lease | None:
        """A lease when `record` is ready; else None, having started whatever it still needs.
        Raises the AdapterError of a failed background load (once: the next call loads again)."""
        if record.load_error is not None:
            error, record.load_error = record.load_error, None
            raise error
        if record.kind == "prefix":
            weights = self.host.get(record)
            if weights is not None:
                return self._lease(record, -1, weights.kv)
            self._start_load(record)
            return None
        if record.slot >= 0:
            if record.placing:
                return None
            self._slots.touch(record.slot)
            return self._lease(record, record.slot, None)
        weights = self.host.get(record)
        if weights is None:
            self._start_load(record)
            return None
        slot = self._slots.victim(lambda owner: owner.refcount == 0 and not owner.placing)
        if slot is not None:              # else every slot is held by running requests: wait for one
            self._start_placing(record, slot, weights)
        return None

    def pending(self, record: AdapterRecord) -> bool:
        """Whether background work for `record` is under way or due (waiting on it ends)."""
        return record.loading or record.placing or record in self._deferred

    @property
    def writing(self) -> bool:
        """Whether some slot is being written: it may come free (its adapter retired) when that ends."""
        return any(owner is not None and owner.placing for owner in self._slots.owner)

    def wait(self, timeout: float) -> None:
        self._ready.wait(timeout)

    def release(self, record: AdapterRecord) -> None:
        if record.slot >= 0:
            self._slots.touch(record.slot)  # just finished: recently used

    def put(self, record: AdapterRecord, weights: Weights) -> None:
        self._unplaced.difference_update(self.host.put(record, weights))

    def drop(self, record: AdapterRecord) -> None:
        """Free what a retired, unleased adapter occupies (its slot once a copy into it has ended)."""
        if record.slot >= 0 and not record.placing:
            self._slots.free(record.slot)
            self.stacks.clear(record.slot)
            record.slot = -1
        self.host.pop(record)
        self._deferred.pop(record, None)
        self._unplaced.discard(record)
        self._pump()

    def _lease(self, record: AdapterRecord, slot: int, kv: torch.Tensor | None) -> Lease:
        record.refcount += 1
        record.requests_served += 1
        record.last_used = time.time()
        return Lease(record.adapter_id, record.kind, slot, kv, record.version, _record=record)

    # -- background work ------------------------------------------------------------------------------
    def _start_load(self, record: AdapterRecord) -> None:
        if record.loading or record.retired:
            return
        if record not in self._deferred and self._has_room():
            self._submit_load(record)
        else:
            self._deferred.setdefault(record)
            self._pump()

    @property
    def _window(self) -> int:
        return max(1, self.host.capacity // 2)

    def _has_room(self) -> bool:
        """Fewer adapters loading or loaded for a slot not yet written than the window, or no load
        under way at all (one always may run: requests that went away leave loaded adapters behind)."""
        return self._in_flight + len(self._unplaced) < self._window or self._in_flight == 0

    def _submit_load(self, record: AdapterRecord) -> None:
        self._deferred.pop(record, None)
        record.loading = True
        self._in_flight += 1
        self._loader.submit(self._load_job, record)

    def _pump(self) -> None:
        """Start deferred loads, first come first, while the window allows."""
        while self._deferred and self._has_room():
            record = next(iter(self._deferred))
            if record.retired or record.loading or record in self.host:
                self._deferred.pop(record)
                continue
            self._submit_load(record)

    def _start_placing(self, record: AdapterRecord, slot: int, weights: Weights) -> None:
        evicted = self._slots.owner[slot]
        if evicted is not None:
            evicted.slot = -1
        self._slots.assign(slot, record)
        record.slot, record.placing = slot, True
        self._unplaced.discard(record)
        self._writer.submit(self._place_job, record, slot, weights)

    def _load_job(self, record: AdapterRecord) -> None:
        weights, error = None, None
        try:
            weights = self._load(record)
        except AdapterError as e:
            error = e
        except Exception as e:  # reported to the request that asked, not lost in a thread
            log.exception("loading adapter %r failed", record.adapter_id)
            error = AdapterError(500, f"adapter {record.adapter_id!r} could not be loaded: {e}")
        with self._lock:
            record.loading = False
            self._in_flight -= 1
            self.loads += 1
            if error is not None:
                record.load_error = error
            elif not record.retired:
                self._unplaced.difference_update(self.host.put(record, weights))
                if record.kind != "prefix":
                    self._unplaced.add(record)
            self._pump()
            self._ready.notify_all()

    def _place_job(self, record: AdapterRecord, slot: int, weights: Weights) -> None:
        try:
            self.stacks.write(slot, weights)
        except Exception as e:  # the slot goes back; the request that asked hears why
            log.exception("writing adapter %r into slot %d failed", record.adapter_id, slot)
            with self._lock:
                record.load_error = AdapterError(500, f"adapter {record.adapter_id!r} could not be loaded: {e}")
                record.placing, record.slot = False, -1
                self._slots.free(slot)
                self._ready.notify_all()
            return
        with self._lock:
            record.placing = False
            self.slot_writes += 1
            if record.retired and record.refcount == 0:
                self._on_drop(record)
            self._pump()
            self._ready.notify_all()
