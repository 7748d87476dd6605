"""Producer → trainer transport of SASI batches: gloo point-to-point from host memory.

Host-side on purpose: a producer makes ~18 SASI/s at full speed, 512x512x3 uint8 =
0.8 MB each, so ~15 MB/s per producer, which host memory and gloo carry easily. NCCL
point-to-point would keep a posted receive per producer as a kernel on the trainer's
communicator stream, watched by NCCL's watchdog (an abort during a long model load or
after a producer fails) and queued ahead of later work. So there is no NCCL here: the
transport group is gloo on every backend; GPU producers copy finished SASI to pinned host
memory on a side stream (HostStager) and send once the copy's event has completed;
trainers receive into pinned buffers when they train on a GPU and copy into the device
ring with `non_blocking`.

Why it looks like this (measured on gloo, NOTES.md):
- `isend`/`irecv` on a dedicated transport group run beside DeepSpeed's all-reduce on
  the trainer group without interfering;
- on gloo `work.is_completed()` never turns True for p2p and `wait(timeout=...)` breaks
  the group, so a trainer detects arrival with a sentinel: the header of each posted
  receive buffer is pre-filled with -1 and a producer always writes values >= 0. Once
  the sentinel is gone the trainer calls `wait()` exactly once and reposts the buffer;
- `isend` never blocks, so without flow control unsent batches pile up in the producer:
  trainers publish how many messages they consumed (c10d store) and a producer sends
  to a trainer only while sent - consumed < buffers posted (credits);
- a dropped isend handle cancels the send silently, so handles are kept until known done.

One message = one tensor: int64 header [kind, count, (image index, variant) * B]
followed by B uint8 images, packed into one uint8 buffer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from .protocol import POLL_S

KIND_DATA = 0
KIND_STOP = 1
_SENTINEL = -1


@dataclass
class SasiBatch:
    producer: int
    indices: list[int]
    variants: list[int]
    images: torch.Tensor  # uint8 [n, H, W, 3]


class _Layout:
    def __init__(self, batch: int, image_shape: tuple[int, int, int]):
        self.batch = batch
        self.image_shape = tuple(image_shape)
        self.header_items = 2 + 2 * batch
        self.header_bytes = 8 * self.header_items
        self.image_bytes = int(np.prod(self.image_shape))
        self.nbytes = self.header_bytes + batch * self.image_bytes

    def header(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[: self.header_bytes].view(torch.int64)

    def images(self, buf: torch.Tensor, n: int) -> torch.Tensor:
        body = buf[self.header_bytes: self.header_bytes + n * self.image_bytes]
        return body.view(n, *self.image_shape)


def _require_gloo(group: Any) -> None:
    backend = dist.get_backend(group)
    if backend != "gloo":
        raise ValueError(f"the SASI transport runs on a gloo group of host buffers, got a '{backend}' group "
                         f"(roles.transport_group is created as gloo whatever the world's backend)")


class HostStager:
    """GPU -> pinned host copies of finished SASI on a side stream, never blocking the producer."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device=device)

    def stage(self, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
        host = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(images.device))  # the batch is finished
        with torch.cuda.stream(self.stream):
            host.copy_(images, non_blocking=True)
            images.record_stream(self.stream)  # the generator's memory is not reused under the copy
            event = torch.cuda.Event()
            event.record(self.stream)
        return host, event


def is_ready(event: Any) -> bool:
    """True once a staged copy has landed (None: a host tensor, always ready)."""
    return event is None or bool(event.query())


def _credit_key(producer: int, trainer: int) -> str:
    return f"sasi/consumed/{producer}->{trainer}"


class SasiSender:
    """Producer side: send SASI to the trainer that owns each image index, never blocking.

    The trainers' consumed counts are read from the store for all trainers in one request
    (`multi_get`), and at most once per `refresh_s`: a count only grows, so an older one
    only under-states the credits left (a send waits a little, never overruns a trainer)."""

    def __init__(self, trainer_ranks: list[int], batch: int, image_shape, group: Any,
                 credits: int, store: Any, refresh_s: float = POLL_S):
        _require_gloo(group)
        self.layout = _Layout(batch, image_shape)
        self.trainers = list(trainer_ranks)
        self.group = group
        self.credits = credits
        self.store = store
        self.refresh_s = refresh_s
        self.rank = dist.get_rank()
        self.sent = {t: 0 for t in self.trainers}
        self.pending: list[tuple] = []  # (work, buffer, trainer, seq): kept until known done
        self._keys = [_credit_key(self.rank, t) for t in self.trainers]
        for key in self._keys:
            self.store.add(key, 0)  # every count exists (at 0): multi_get never waits on a missing key
        self._consumed = {t: 0 for t in self.trainers}
        self._read_at = float("-inf")

    def refresh(self) -> None:
        """Every trainer's consumed count, in one store request."""
        values = self.store.multi_get(self._keys)
        self._consumed = {t: int(v) for t, v in zip(self.trainers, values)}
        self._read_at = time.perf_counter()

    def consumed(self, trainer: int) -> int:
        """Messages `trainer` has taken from this producer, as last read."""
        return self._consumed[trainer]

    def has_credit(self, trainer: int) -> bool:
        if self.sent[trainer] - self._consumed[trainer] < self.credits:
            return True
        if time.perf_counter() - self._read_at >= self.refresh_s:  # no credit as last read: look again
            self.refresh()
        return self.sent[trainer] - self._consumed[trainer] < self.credits

    def _reap(self) -> None:
        # A send is known complete once the receiver consumed a later message count;
        # keep at most `credits` handles per trainer alive.
        keep = []
        for work, buf, trainer, seq in self.pending:
            if seq < self.consumed(trainer):
                work.wait()  # already delivered: returns at once
            else:
                keep.append((work, buf, trainer, seq))
        self.pending = keep

    def send(self, trainer: int, indices: list[int], variants: list[int], images: torch.Tensor,
             kind: int = KIND_DATA) -> bool:
        """Queue one message to `trainer`. False (nothing sent) when it has no credit left."""
        if kind == KIND_DATA and not self.has_credit(trainer):
            return False
        n = len(indices)
        if n > self.layout.batch:
            raise ValueError(f"at most {self.layout.batch} SASI per message, got {n}")
        if images.device.type != "cpu":
            raise ValueError(f"SASI are sent from host memory; got images on {images.device} (stage them "
                             f"with HostStager first)")
        buf = torch.zeros(self.layout.nbytes, dtype=torch.uint8)
        head = self.layout.header(buf)
        head[0] = kind
        head[1] = n
        if n:
            head[2: 2 + 2 * n] = torch.tensor([v for pair in zip(indices, variants) for v in pair],
                                              dtype=torch.int64)
            self.layout.images(buf, n).copy_(images.to(torch.uint8))
        work = dist.isend(buf, dst=trainer, group=self.group)
        self.pending.append((work, buf, trainer, self.sent[trainer]))
        self.sent[trainer] += 1
        self._reap()
        return True

    def stop(self) -> None:
        """Tell every trainer this producer is done (sent regardless of credits)."""
        empty = torch.zeros((0, *self.layout.image_shape), dtype=torch.uint8)
        for t in self.trainers:
            self.send(t, [], [], empty, kind=KIND_STOP)

    def close(self) -> None:
        """Wait for the sends still in flight (call after the trainers have consumed them)."""
        for work, *_ in self.pending:
            work.wait()
        self.pending = []


class SasiReceiver:
    """Trainer side: `buffers` receives posted per producer, polled without blocking.

    `pin`: receive into pinned host memory (a trainer on a GPU), so that the copy into
    the device ring is asynchronous. Each message gets a fresh buffer, and the images
    handed out are views of it: nothing is reused while a copy may still read it."""

    def __init__(self, producer_ranks: list[int], batch: int, image_shape, group: Any,
                 buffers: int, store: Any, pin: bool = False):
        _require_gloo(group)
        self.layout = _Layout(batch, image_shape)
        self.producers = list(producer_ranks)
        self.group = group
        self.store = store
        self.pin = pin
        self.rank = dist.get_rank()
        self.stopped: set[int] = set()
        self.received = 0  # SASI
        self.messages = {p: 0 for p in producer_ranks}  # messages taken per producer (STOP included)
        # Posted in order; gloo and NCCL deliver messages between one pair in send order.
        self.posted: dict[int, list[tuple[Any, torch.Tensor]]] = {p: [] for p in self.producers}
        for p in self.producers:
            for _ in range(buffers):
                self._post(p)

    def _post(self, producer: int) -> None:
        buf = torch.empty(self.layout.nbytes, dtype=torch.uint8, pin_memory=self.pin)
        self.layout.header(buf).fill_(_SENTINEL)
        work = dist.irecv(buf, src=producer, group=self.group)
        self.posted[producer].append((work, buf))

    @property
    def all_stopped(self) -> bool:
        return self.stopped == set(self.producers)

    def poll(self, limit: Optional[int] = None) -> list[SasiBatch]:
        """Every message that has arrived so far (oldest first per producer); never blocks."""
        out: list[SasiBatch] = []
        for p in self.producers:
            queue = self.posted[p]
            while queue and (limit is None or len(out) < limit):
                work, buf = queue[0]
                head = self.layout.header(buf)
                if int(head[0]) == _SENTINEL:
                    break  # not arrived yet; later buffers cannot have arrived either
                work.wait()  # exactly once: the data is in (or finishing)
                queue.pop(0)
                self.messages[p] += 1
                kind, n = int(head[0]), int(head[1])
                self.store.add(_credit_key(p, self.rank), 1)
                if kind == KIND_STOP:
                    self.stopped.add(p)
                    continue
                pairs = head[2: 2 + 2 * n].view(n, 2).tolist() if n else []
                images = self.layout.images(buf, n)  # a view of this message's own buffer
                out.append(SasiBatch(p, [a for a, _ in pairs], [b for _, b in pairs], images))
                self.received += n
                self._post(p)
        return out


def default_store() -> Any:
    """The c10d key-value store of the default process group (used for credits)."""
    return dist.distributed_c10d._get_default_store()
