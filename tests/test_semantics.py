"""Semantic extraction and augmentation: SEPs, SRP sampling, output cleaning and fallback
counting, the captioner on real images, 8-bit vs fp32 rewriting, and caption → rewrite
end to end on the tiny models."""
import numpy as np
import pytest
import torch

from sasi_online.errors import UserInputError
from sasi_online.semantics import prompts, srp_pool
from sasi_online.semantics.cache import JsonlCache
from sasi_online.semantics.rewriter import NEUTRAL_PROMPT, RewriteStats, Rewriter, clean_rewrite


@pytest.fixture(scope="module")
def fashion():
    from sasi_online.zoo import _fashion_subset

    return _fashion_subset(40)


# ----------------------------------------------------------------------------- prompts
def test_sep_names_and_literal_prompts():
    assert prompts.resolve_sep(None) == "Please describe the picture in detail."
    assert prompts.resolve_sep("question") == "Question: What does this picture describe? Answer:"
    assert prompts.resolve_sep("objects") == "What objects are included in this picture?"
    assert prompts.resolve_sep("  Describe the colours. ") == "Describe the colours."
    with pytest.raises(UserInputError, match="empty"):
        prompts.resolve_sep("  ")


def test_pool_is_ours_varied_and_holds_the_papers_examples():
    captions = [c for c, _, _ in srp_pool.POOL]
    assert len(srp_pool.POOL) == 100 and len(set(captions)) == 100
    assert "a green python curled up on a branch" in captions
    assert all(_norm(r) != _norm(c) for c, r, _ in srp_pool.POOL)
    # expansion examples keep the caption and add something to it
    assert all(out.startswith(c) and len(out) > len(c) for c, out in srp_pool.pool_pairs("expansion"))


def _norm(s):
    return "".join(ch for ch in s.lower() if ch.isalnum())


def test_srp_sampling_is_distinct_seeded_and_varies_by_variant():
    a = srp_pool.build_srp("a grey coat", image_id=7, variant=0)
    assert len(set(a.example_ids)) == 5
    assert a == srp_pool.build_srp("a grey coat", image_id=7, variant=0)
    differ = sum(srp_pool.build_srp("x", i, 0).example_ids != srp_pool.build_srp("x", i, 1).example_ids
                 for i in range(20))
    assert differ >= 19
    assert srp_pool.build_srp("x", 7, 0, seed=1).example_ids != a.example_ids
    lines = a.text.split("\n")
    assert lines[0] == ("You are a helpful, respectful and honest assistant, and you can rewrite "
                        "sentences while retaining their original meaning. I will give you a few examples:")
    assert lines[-1] == "a grey coat →" and len(lines) == 2 + 5 + 1
    exp = srp_pool.build_srp("a grey coat", 7, mode="expansion")
    assert exp.text.startswith("You are a helpful, respectful and honest assistant. You can expand")
    with pytest.raises(UserInputError, match="rewrite_mode"):
        srp_pool.check_mode("paraphrase")


# ----------------------------------------------------------------------------- cleaning
def test_clean_rewrite_unit_cases():
    examples = [("a dog on a sofa", "On a sofa lies a dog."), ("a red car", "A car that is red.")]
    cap = "a grey coat on a black background"
    assert clean_rewrite(" On a black background lies a grey coat.\nmore", cap, examples) == \
        "On a black background lies a grey coat."
    assert clean_rewrite("A grey coat is shown. It is warm.", cap) == "A grey coat is shown."
    assert clean_rewrite("A grey coat lies there → next example", cap) == "A grey coat lies there"
    assert clean_rewrite("", cap) is None
    assert clean_rewrite(" ... \n", cap) is None
    assert clean_rewrite("A grey coat on a black background!", cap) is None  # the caption again
    assert clean_rewrite("On a sofa lies a dog.", cap, examples) is None  # an in-prompt example
    prompt = srp_pool.format_srp(cap, examples, "rewrite")
    assert clean_rewrite("I will give you a few examples", cap, examples, prompt) is None


class _ScriptedRewriter(Rewriter):
    """Our own Rewriter with its generation replaced by fixed texts, to test the counting."""

    def __init__(self, outputs):
        super().__init__(None, mode="none")
        self.mode = "rewrite"
        self.outputs = list(outputs)

    def _generate(self, prompts, seeds):
        return [self.outputs.pop(0) for _ in prompts]


def test_fallbacks_are_counted():
    rw = _ScriptedRewriter(["A coat lies flat.", "a grey coat", "\n"])
    out = rw.rewrite(["a grey coat", "a grey coat", "", "a red hat"], image_ids=[0, 1, 2, 3])
    assert out == ["A coat lies flat.", "a grey coat", NEUTRAL_PROMPT, "a red hat"]
    assert rw.stats == RewriteStats(rewritten=1, fallback_unusable=2, fallback_empty_caption=1)
    assert rw.stats.fallback_rate == 0.75
    off = Rewriter(None, mode="none")
    assert off.rewrite(["a cat", " "], [0, 1]) == ["a cat", NEUTRAL_PROMPT]
    assert off.stats.fallback_empty_caption == 1
    with pytest.raises(UserInputError, match="model folder"):
        Rewriter(None, mode="rewrite")


def test_jsonl_cache_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "c.jsonl"
    c = JsonlCache(path)
    c.put("0|sep|h", "a coat")
    with open(path, "a") as fh:
        fh.write('{"key": "1|sep|h", "val')  # a crash mid-line
    again = JsonlCache(path)
    assert again.get("0|sep|h") == "a coat" and again.get("1|sep|h") is None
    again.put("1|sep|h", "a bag")
    assert JsonlCache(path).get("1|sep|h") == "a bag"


# ----------------------------------------------------------------------------- models
def test_captioner_depends_on_the_image_and_caches(tiny_zoo, fashion, tmp_path):
    from sasi_online.semantics.captioner import Captioner

    images, labels = fashion
    a, b = int(np.flatnonzero(labels == 1)[0]), int(np.flatnonzero(labels == 7)[0])  # trouser, sneaker
    cap = Captioner(tiny_zoo / "blip2", sep="detail", cache_path=tmp_path / "captions.jsonl")
    logits = cap.next_token_logits([images[a], images[b], images[a]])
    assert torch.equal(logits[0], logits[2])
    assert (logits[0] - logits[1]).abs().max() > 1e-3
    texts = cap.caption([images[a], images[b]], image_ids=[a, b])
    assert all(t and t.isascii() for t in texts) and cap.computed == 2
    again = Captioner(tiny_zoo / "blip2", sep="detail", cache_path=tmp_path / "captions.jsonl")
    assert again.caption([images[a], images[b]], image_ids=[a, b]) == texts and again.computed == 0
    other_sep = Captioner(tiny_zoo / "blip2", sep="question", cache_path=tmp_path / "captions.jsonl")
    other_sep.caption([images[a]], image_ids=[a])
    assert other_sep.computed == 1  # the SEP is part of the key


def test_sampled_rewrites_are_reproducible_per_image_and_variant(tiny_zoo):
    rw = Rewriter(tiny_zoo / "llama", do_sample=True, max_new_tokens=12, seed=3)
    caps = ["a grey coat", "a white sneaker", "a dark bag"]
    both = rw.rewrite(caps, image_ids=[10, 11, 12], variant=1)
    alone = rw.rewrite(caps[1:2], image_ids=[11], variant=1)
    assert alone == both[1:2]
    variants = rw.rewrite_variants(caps, [10, 11, 12], variants=2)
    assert [v[1] for v in variants] == both


def test_8bit_rewriter_agrees_with_fp32(tiny_zoo):
    """bitsandbytes LLM.int8 on the CPU vs fp32 on the same SRPs.
    Thresholds: last-position logit cosine >= 0.98, greedy-token agreement >= 0.8."""
    pytest.importorskip("bitsandbytes")
    fp32 = Rewriter(tiny_zoo / "llama", max_new_tokens=12)
    int8 = Rewriter(tiny_zoo / "llama", max_new_tokens=12, load_in_8bit=True)
    srps = [srp_pool.build_srp(c, i).text for i, c in enumerate(["a grey coat", "a white sneaker",
                                                                  "a dark bag and a black background"])]
    enc = fp32.tokenizer(srps, return_tensors="pt", padding=True)
    with torch.no_grad():
        a = fp32.model(**enc).logits[:, -1].float()
        b = int8.model(**enc).logits[:, -1].float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() >= 0.98, cos
    ga = fp32._generate(srps, [0, 0, 0])
    gb = int8._generate(srps, [0, 0, 0])
    ta = [fp32.tokenizer(t)["input_ids"] for t in ga]
    tb = [fp32.tokenizer(t)["input_ids"] for t in gb]
    same = sum(x == y for p, q in zip(ta, tb) for x, y in zip(p, q))
    total = sum(max(len(p), len(q)) for p, q in zip(ta, tb))
    assert same / total >= 0.8, (ga, gb)


def test_caption_then_rewrite_end_to_end(tiny_zoo, fashion):
    from sasi_online.semantics.captioner import Captioner

    images, labels = fashion
    ids = list(range(20))
    captions = Captioner(tiny_zoo / "blip2", batch_size=10).caption([images[i] for i in ids], ids)
    assert all(captions)
    rw = Rewriter(tiny_zoo / "llama", batch_size=10, max_new_tokens=24)
    out = rw.rewrite(captions, ids)
    assert len(out) == 20 and all(o.strip() for o in out)
    assert rw.stats.total == 20 and rw.stats.fallback_rate < 0.5, rw.stats
