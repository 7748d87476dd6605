"""CLIP similarity of SASI to their real image, and `sasi filter` flagging (never deleting)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sasi_online.cli import main
from sasi_online.data.store import SasiStore


def test_clip_cosine_is_the_projected_embedding_cosine(tiny_zoo):
    from transformers import CLIPModel, CLIPProcessor

    from sasi_online.eval.similarity import ClipSimilarity

    rng = np.random.default_rng(0)
    a = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    b = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    scorer = ClipSimilarity(tiny_zoo / "clip", batch_size=2)
    sims = scorer.cosine(a, b)
    # independent computation straight from transformers
    proc = CLIPProcessor.from_pretrained(tiny_zoo / "clip")
    model = CLIPModel.from_pretrained(tiny_zoo / "clip").eval()
    with torch.no_grad():
        fa = model.get_image_features(**proc(images=a, return_tensors="pt")).pooler_output
        fb = model.get_image_features(**proc(images=b, return_tensors="pt")).pooler_output
    want = torch.nn.functional.cosine_similarity(fa, fb).numpy()
    assert np.allclose(sims, want, atol=1e-5)
    assert np.allclose(scorer.cosine(a, a), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="pairs"):
        scorer.cosine(a, b[:2])


def test_filter_scores_flags_and_reflags_without_deleting(tiny_zoo, tmp_path, capsys):
    root = tmp_path / "store"
    gen = ["generate", "--store", str(root), "--models", str(tiny_zoo), "--text", "class_name",
           "--steps", "2", "--vp-kind", "image", "--variants", "2", "--limit", "3", "--no-progress"]
    assert main(gen) == 0
    files_before = sorted(p.name for p in root.rglob("v*.png"))

    assert main(["filter", str(root), "--models", str(tiny_zoo), "--threshold", "-1", "--no-progress"]) == 0
    sims = {r.key: r.similarity for r in SasiStore.open(root).iter_records()}
    assert len(sims) == 6 and all(-1.0 <= s <= 1.0 for s in sims.values())
    threshold = float(np.median(list(sims.values())))

    assert main(["filter", str(root), "--models", str(tiny_zoo), "--threshold", str(threshold),
                 "--no-progress"]) == 0
    store = SasiStore.open(root)
    for key, s in sims.items():
        assert store.record(*key).similarity == s  # not rescored
        assert store.is_fishy(*key) == (s < threshold)
    n_fishy = sum(s < threshold for s in sims.values())
    assert 0 < n_fishy < 6
    assert sum(len(store.usable_variants(i)) for i in range(3)) == 6 - n_fishy  # readers skip fishy
    assert sorted(p.name for p in root.rglob("v*.png")) == files_before  # nothing deleted
    summary = json.loads((root / "reports" / "filter.json").read_text())
    assert summary["fishy"] == n_fishy and summary["newly_scored"] == 0
    with Image.open(root / "reports" / "similarity_hist.png") as im:
        assert im.size[0] > 100
    assert f"{n_fishy} of 6 SASI" in capsys.readouterr().out

    assert main(["filter", str(root), "--models", str(tiny_zoo), "--threshold", "-1", "--no-progress"]) == 0
    assert not any(SasiStore.open(root).is_fishy(*k) for k in sims)  # a lower threshold unflags


def test_filter_refuses_a_folder_that_is_not_a_store(tmp_path, capsys):
    assert main(["filter", str(tmp_path), "--no-progress"]) == 2
    assert "not a SASI store" in capsys.readouterr().err
