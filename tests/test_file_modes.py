"""Files the project writes keep the umask: a teammate on a shared cluster can read a
store, an export or a report (temporary files renamed into place used to keep
mkstemp's 0600)."""
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Writes, in one process started under a given umask: an atomic write, a SASI store (an
# image, manifest, store.json, metadata.jsonl, a report), an export, and an atomic write
# from a DataLoader worker. Prints each written file's path.
SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    import torch
    from sasi_online.utils import atomic_write_json, atomic_write_text, save_figure

    out = Path(sys.argv[1])
    atomic_write_json(out / "plain.json", {"a": 1})

    from sasi_online.data.store import SasiStore
    store = SasiStore.create(out / "store", dataset={"name": "x", "split": "train", "size": 1},
                             models={}, settings={})
    store.add(np.zeros((8, 8, 3), np.uint8), index=0, variant=0, relpath="train/0_a/000000")
    atomic_write_json(store.reports_dir() / "timing.json", {"s": 1.0})
    store.close()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    save_figure(plt.figure(), out / "store" / "reports" / "fig.png")

    from sasi_online import ssl
    from sasi_online.config import Config
    from sasi_online.commands.export import export
    cfg = Config()
    cfg.method.backbone, cfg.method.queue_size = "resnet18", 256
    torch.save({"config": cfg.to_dict(), "model": ssl.build_method(cfg.method).state_dict()}, out / "ckpt.pt")
    export(out / "ckpt.pt", "torchvision", out / "tv.pth")

    class Writes(torch.utils.data.Dataset):
        def __len__(self):
            return 1
        def __getitem__(self, i):
            atomic_write_text(out / "from_worker.txt", "x")
            return i
    list(torch.utils.data.DataLoader(Writes(), num_workers=1, batch_size=None))
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "ckpt.pt":
            print(p)
""")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_mode_open_would_give(tmp_path, umask):
    script = tmp_path / "write.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True,
                         preexec_fn=lambda: os.umask(umask), env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    files = [Path(line) for line in res.stdout.split() if line.startswith(str(out))]
    names = {p.name for p in files}
    assert {"plain.json", "store.json", "manifest.jsonl", "metadata.jsonl", "v0.png", "timing.json",
            "fig.png", "tv.pth", "from_worker.txt"} <= names, names
    want = 0o666 & ~umask
    wrong = {str(p.relative_to(out)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != want}
    assert not wrong, f"want {oct(want)}: {wrong}"
