"""Producer -> trainer transport on gloo with three real processes (1 producer, 2 trainers),
and how often a waiting producer reads the job's store (its host is the first trainer)."""
import os
import socket
import threading
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHAPE = (8, 8, 3)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, messages, credits, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from sasi_online.online.roles import setup_roles
    from sasi_online.online.transport import SasiReceiver, SasiSender, default_store

    roles = setup_roles(1)
    store = default_store()
    log = []
    if roles.is_producer:
        sender = SasiSender(roles.trainer_ranks, batch=3, image_shape=SHAPE, group=roles.transport_group,
                            credits=credits, store=store)
        queue = [[3 * m + j for j in range(3)] for m in range(messages)]
        max_outstanding = 0
        while queue:
            indices = queue[0]
            owner = roles.owner_of(indices[0])
            images = torch.stack([torch.full(SHAPE, i % 256, dtype=torch.uint8) for i in indices])
            if sender.send(owner, indices, [0] * 3, images):
                queue.pop(0)
            sender.refresh()  # the trainers' counts as they are now, not as last read
            for t in roles.trainer_ranks:
                max_outstanding = max(max_outstanding, sender.sent[t] - sender.consumed(t))
            time.sleep(0.001)
        sender.stop()
        log.append(("max_outstanding", max_outstanding))
        dist.barrier()
        sender.close()
    else:
        receiver = SasiReceiver(roles.producer_ranks, batch=3, image_shape=SHAPE, group=roles.transport_group,
                                buffers=credits, store=store)
        while not receiver.all_stopped:
            for b in receiver.poll():
                for i, img in zip(b.indices, b.images):
                    log.append(("got", i, int(img.float().mean())))
            time.sleep(0.003)  # a trainer step
        dist.barrier()
    torch.save(log, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_every_sasi_reaches_its_owner_once_with_bounded_credits(tmp_path):
    world, messages, credits = 3, 24, 2
    # index i goes to trainer (i mod 2) by owner_of; the producer sends whole messages to the
    # owner of their first index, so use messages of one owner: indices 3m..3m+2 -> owner of 3m.
    mp.spawn(_worker, args=(world, _free_port(), messages, credits, str(tmp_path)), nprocs=world)
    logs = {r: torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)}
    producer_log = dict(logs[2])
    assert producer_log["max_outstanding"] <= credits
    got = [(r, e[1], e[2]) for r in (0, 1) for e in logs[r] if e[0] == "got"]
    indices = sorted(i for _, i, _ in got)
    assert indices == list(range(3 * messages))  # each exactly once
    for rank, i, value in got:
        assert value == i % 256  # the image travelled with its index
        assert rank == (i - i % 3) // 3 * 3 % 2  # owner of the message's first index


# ----------------------------------------------------------------------------- polite waiting
class CountingStore:
    """A real c10d store; counts the requests made through it (what the store's host serves)."""

    def __init__(self, store):
        self.store, self.requests = store, Counter()

    def __getattr__(self, name):
        attr = getattr(self.store, name)
        if not callable(attr):
            return attr

        def request(*a, **k):
            self.requests[name] += 1
            return attr(*a, **k)
        return request


@pytest.fixture
def one_rank_gloo():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


IDLE_S = 2.0


@pytest.mark.parametrize("idle", ["nothing_to_plan", "no_credit"])
def test_an_idle_producer_reads_the_store_politely(one_rank_gloo, idle):
    """A producer with nothing to do (its look-ahead is planned, or every trainer's credits
    are taken) reads the store once per POLL_S: the trainers' state in one request, the
    credits in at most one more, stats at most once a second."""
    from sasi_online.config import Config
    from sasi_online.data.datasets import build_dataset
    from sasi_online.data.sampler import StepSampler
    from sasi_online.online.producer import Producer
    from sasi_online.online.protocol import POLL_S, Coordination
    from sasi_online.online.transport import SasiSender

    assert 0.01 <= POLL_S <= 0.05
    host = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
    store = CountingStore(host)
    cfg = Config()
    ds = build_dataset(cfg.data, "train")
    roles = SimpleNamespace(rank=0, producer_ranks=[0], trainer_ranks=[1], world_size=2)
    sender = SasiSender(roles.trainer_ranks, batch=2, image_shape=SHAPE, group=one_rank_gloo, credits=2, store=store)
    producer = Producer(cfg, roles, ds, StepSampler(len(ds), 4, 1, seed=0), Coordination(store, 1), sender)
    producer.planner.next_step = 10 ** 6  # every step in reach already planned
    if idle == "no_credit":
        sender.sent[1] = 2  # two messages in flight, none taken yet: no credit left
        producer.outbox[1] = [([i], [0], torch.zeros(1, *SHAPE, dtype=torch.uint8), None) for i in (0, 1)]
    threading.Timer(IDLE_S, lambda: host.add("sasi_online/trainers_done", 1)).start()
    t0 = time.perf_counter()
    producer.loop()
    elapsed = time.perf_counter() - t0
    rate = sum(store.requests.values()) / elapsed
    assert IDLE_S <= elapsed < IDLE_S + 0.5  # it saw the end within a poll or so
    reads_per_poll = 2 if idle == "no_credit" else 1
    assert 0.3 * reads_per_poll / POLL_S < rate <= reads_per_poll / POLL_S + 5, dict(store.requests)
    assert store.requests["set"] <= IDLE_S + 1  # stats: at most once a second while idle
    assert producer.counts["generated"] == 0 and [len(m) for m in producer.outbox.values()] == \
        ([2] if idle == "no_credit" else [0])
