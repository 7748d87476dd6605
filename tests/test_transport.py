"""Producer -> trainer transport on gloo with three real processes (1 producer, 2 trainers)."""
import os
import socket
import time

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
