"""Does the method help at micro scale? SASI against base MoCo-v2, with a positive control
that proves the bench can see a gain and a control that rules out "a VAE-smoothed view".

    python bench/bench_science.py                                # the default run, ~45 min on 2 cores
    python bench/bench_science.py --sweep                        # + image 0.75/0.9, mask, text-to-image
    python bench/bench_science.py --holdout --arms base,"positive control"   # recipe choice, no test split
    python bench/bench_science.py --steps 2 --seeds 2 --limit 64 --test-split embedded  # a smoke run

Every arm trains MoCo-v2 with one recipe (bench/science.yaml, augmentations in
bench/science_aug.yaml) on the embedded Fashion-MNIST subset's 2,000 training images at 32 px
and is tested on the official 10,000 test images (never seen by any model; `apt-get install
dataset-fashion-mnist`), or on the embedded 500 with --test-split embedded:
  pixels            raw pixels (no encoder), once;
  random features   the encoder as initialised, no step taken;
  base              pair_mode=base, no SASI;
  SASI image 0.5    offline SASI, image VP at strength 0.5 (one store per seed);
  SASI mix          offline SASI, mix VP (the best kind in the paper's Table 10);
  positive control  each image's partner is another real image of its class (an oracle
                    positive): its gain is the most a perfect positive can give this recipe;
                    the bench has power only if its 95 % interval is above zero;
  VAE control       the image itself through the SASI path's VAE round trip at 64 px (no
                    denoising): a SASI gain beyond this one is due to generation;
  online            online.mode=colocated: the trainer makes its own SASI between steps.
Seeds: --seeds (5) paired seeds for base and SASI image 0.5, --power-seeds (3) for the positive
control, --control-seeds (2) for the rest.
Encoder: a 4-block conv-BN-ReLU CNN (method.backbone=convnet), batch 64, 800 steps, SGD with
warm-up and a cosine; SASI from the micro model set (`build_micro`, built into OUT/zoo unless
--zoo is given) at 64 px, BLIP-2 captions + LLaMA rewrites, 5 DPM-Solver++ steps, CFG 2.

Evaluation: the project's weighted kNN at k = 20 on centred, normalised features and its
L-BFGS linear probe on frozen features, top-1 % (bench/science_eval.py). Per arm: mean ± sample
std over seeds, and the paired per-seed difference to base with a 95 % t interval (n - 1
degrees of freedom; sasi_online/eval/stats.py). Writes science.json, science.md and
science.png into --out after each finished job; a rerun skips finished jobs (and redoes jobs
whose settings or models changed). Independent jobs run as --jobs processes side by side,
one thread each; each job's output is in OUT/logs/. The default run's results: docs/science/.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # bench_offline_online (metrics reader), science_*
CONFIG = Path(__file__).resolve().with_name("science.yaml")
AUGMENT = Path(__file__).resolve().with_name("science_aug.yaml")
METRICS = ("knn", "linear")
HOLDOUT_TRAIN = 1600  # --holdout: train on these, test on the embedded train split's last 400


@dataclass(frozen=True)
class Arm:
    name: str
    source: str  # random | none | offline | control | online
    pair_mode: str = "sasi"
    vp: str = "image"
    strength: float = 0.5
    per_image: int = 1
    control: str = ""  # same_class | vae (source control)
    seeds: str = "other"  # main (--seeds: base, SASI image 0.5) | power (--power-seeds) | other (--control-seeds)

    @property
    def slug(self) -> str:
        return (self.name.replace(" ", "_").replace("=", "-").replace("×", "x").replace("(", "")
                .replace(")", ""))


DEFAULT_SASI = "SASI image 0.5"


def plan_arms(sweep: bool = False, per_image=(), pair_modes=()) -> list[Arm]:
    """The default arms; then offline arms that change one factor each (the paper's ablations)."""
    arms = [Arm("random features", "random", "base"), Arm("base", "none", "base", seeds="main"),
            Arm(DEFAULT_SASI, "offline", seeds="main"), Arm("SASI mix", "offline", vp="mix"),
            Arm("positive control", "control", control="same_class", seeds="power"),
            Arm("VAE control", "control", control="vae"), Arm("online", "online")]
    extra = []
    if sweep:
        extra += [Arm("SASI image 0.75", "offline", strength=0.75), Arm("SASI image 0.9", "offline", strength=0.9),
                  Arm("SASI mask", "offline", vp="mask"), Arm("SASI text-to-image", "offline", vp="direct")]
    extra += [Arm(f"SASI ×{n}", "offline", per_image=int(n)) for n in per_image]
    extra += [Arm(f"SASI pair={p}", "offline", p) for p in pair_modes]
    seen = {(a.source, a.pair_mode, a.vp, a.strength, a.per_image, a.control) for a in arms}
    for arm in extra:
        key = (arm.source, arm.pair_mode, arm.vp, arm.strength, arm.per_image, arm.control)
        if key not in seen:
            seen.add(key)
            arms.append(arm)
    return arms


# ----------------------------------------------------------------------------- jobs
def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def zoo_identity(zoo: Path) -> str:
    """The sha256 of every file of the model set (its zoo.json), shortened."""
    manifest = json.loads((zoo / "zoo.json").read_text(encoding="utf-8"))
    return _fingerprint(manifest.get("kind"), manifest.get("files"))


def models_identity(common: list[str], vp: str) -> str:
    """The identity of the model folders SASI of this VP kind are made with (as the store
    header records them): a model shipped later for another family changes nothing here."""
    from sasi_online.config import load_config
    from sasi_online.generation.offline import model_hashes
    from sasi_online.generation.text_stage import text_model_folders

    cfg = load_config(CONFIG, common)
    return _fingerprint(model_hashes(cfg, vp, text_model_folders(cfg)))


def store_key(arm: Arm, seed: int) -> str:
    if arm.source == "control":
        return f"control_{arm.control}_s{seed}"
    return f"store_{arm.vp}_{arm.strength:g}_x{arm.per_image}_s{seed}"


def _vp_overrides(arm: Arm) -> list[str]:
    """visual.kind for the VP kinds; `direct` (text-to-image) is a generation kind only."""
    return [] if arm.vp == "direct" else [f"visual.kind={arm.vp}"]


def _store_job(arm: Arm, seed: int, out: Path, common: list[str], recipe: str, models: dict) -> dict:
    key = store_key(arm, seed)
    if arm.source == "control":
        over = list(common)
        identity = models.get("image") if arm.control == "vae" else None
    else:
        over = [*common, *_vp_overrides(arm), f"generation.strength={arm.strength}",
                f"semantics.variants={arm.per_image}", f"generation.seed={seed}"]
        identity = models[arm.vp]
    return {"kind": "store", "key": key, "path": str(out / "stores" / key), "seed": seed, "vp": arm.vp,
            "control": arm.control, "per_image": arm.per_image, "overrides": over, "deps": [],
            "fingerprint": _fingerprint(recipe, over, arm.control, identity)}


def make_jobs(arms: list[Arm], seeds: dict[str, list[int]], out: Path, common: list[str],
              evaluation: list[str]) -> list[dict]:
    """Store jobs (per VP setting and seed; control stores), one train+eval job per (arm, seed),
    and the raw-pixel evaluation. `seeds`: the seeds of each Arm.seeds role."""
    recipe = CONFIG.read_text(encoding="utf-8") + AUGMENT.read_text(encoding="utf-8")
    models = {a.vp: models_identity(common, a.vp) for a in arms if a.source in ("offline", "online")}
    if any(a.control == "vae" for a in arms):
        models.setdefault("image", models_identity(common, "image"))
    jobs: dict[str, dict] = {"pixels": {"kind": "pixels", "key": "pixels", "path": str(out / "runs" / "pixels"),
                                        "seed": 0, "deps": [], "overrides": [*common, *evaluation],
                                        "fingerprint": _fingerprint([o for o in common if o.startswith(
                                            ("data.", "augment."))], evaluation)}}
    for arm in arms:
        for seed in seeds[arm.seeds]:
            if arm.source in ("offline", "control") and store_key(arm, seed) not in jobs:
                jobs[store_key(arm, seed)] = _store_job(arm, seed, out, common, recipe, models)
    for arm in arms:
        for seed in seeds[arm.seeds]:
            key = f"{arm.slug}_s{seed}"
            over = [*common, f"train.seed={seed}", f"generation.seed={seed}", *_vp_overrides(arm),
                    f"generation.strength={arm.strength}", f"train.pair_mode={arm.pair_mode}"]
            deps = []
            if arm.source in ("offline", "control"):
                deps = [store_key(arm, seed)]
                over.append(f"store.path={jobs[deps[0]]['path']}")
            elif arm.source == "online":
                over += ["online.mode=colocated", "online.producers=0"]
            sasi = arm.source in ("offline", "online")
            jobs[key] = {"kind": "random" if arm.source == "random" else "train", "key": key, "arm": asdict(arm),
                         "seed": seed, "deps": deps, "path": str(out / "runs" / key), "overrides": over,
                         "evaluation": evaluation,
                         "fingerprint": _fingerprint(recipe, [o for o in over if not o.startswith("store.path=")],
                                                     evaluation, models[arm.vp] if sasi else None,
                                                     jobs[deps[0]]["fingerprint"] if deps else None)}
    # the longest first (after the stores they wait for), so that no core idles at the end
    order = {"store": 0, "online": 1, "offline": 2, "control": 2, "none": 3, "random": 4, "pixels": 5}
    return sorted(jobs.values(), key=lambda j: (order[j["kind"] if j["kind"] in ("store", "pixels")
                                                     else j["arm"]["source"]], j["seed"]))


def _done_file(job: dict) -> Path:
    return Path(job["path"]) / ("done.json" if job["kind"] == "store" else "result.json")


def finished(job: dict) -> dict | None:
    """The job's result when it finished with the same settings; a stale folder is removed."""
    path = _done_file(job)
    if path.is_file():
        try:
            res = json.loads(path.read_text(encoding="utf-8"))
            if res.get("fingerprint") == job["fingerprint"]:
                return res
        except ValueError:
            pass
        shutil.rmtree(job["path"], ignore_errors=True)  # other settings or models: start again
    return None


def run_job(job: dict) -> dict:
    """Run one job in this process; returns (and writes) its result."""
    from sasi_online.config import load_config
    from sasi_online.utils import atomic_write_json, limit_threads

    limit_threads()
    t0 = time.perf_counter()
    path = Path(job["path"])
    stamp = path.with_name(path.name + ".fingerprint")
    if path.exists() and (not stamp.is_file() or stamp.read_text(encoding="utf-8") != job["fingerprint"]):
        shutil.rmtree(path)  # an interrupted job with other settings or models: start it again
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(job["fingerprint"], encoding="utf-8")
    if job["kind"] == "store":
        res = _make_store(job, path, load_config(CONFIG, job["overrides"]))
    elif job["kind"] in ("pixels", "random"):
        from science_eval import pixel_baseline, random_features

        cfg = load_config(CONFIG, [*job["overrides"], *job.get("evaluation", [])])
        res = pixel_baseline(cfg) if job["kind"] == "pixels" else random_features(cfg, job["seed"])
        res.update(arm=job.get("arm", {}).get("name", "pixels"), seed=job["seed"], steps=0)
    else:
        res = _train_and_eval(job, path, load_config(CONFIG, [*job["overrides"], f"train.out={path}"]))
    res.update(fingerprint=job["fingerprint"], seconds=round(time.perf_counter() - t0, 1), key=job["key"])
    atomic_write_json(_done_file(job), res)
    return res


def _make_store(job: dict, path: Path, cfg) -> dict:
    if job["control"]:
        from science_controls import build_control_store

        return build_control_store(cfg, path, job["control"], job["seed"])
    from sasi_online.data.store import SasiStore
    from sasi_online.generation.offline import generate_store

    summary = generate_store(cfg, path, kind=job["vp"], variants=job["per_image"], progress=True)
    n = len(_dataset(cfg))
    with SasiStore.open(path) as st:
        per_image = sum(len(st.usable_variants(i)) for i in range(n)) / n
    return {"generated": summary.generated, "failed": summary.failed, "sasi_per_image": per_image,
            "sasi_per_s": summary.sasi_per_second}


def _dataset(cfg):
    from sasi_online.data.datasets import build_dataset

    return build_dataset(cfg.data)


def _train_and_eval(job: dict, path: Path, cfg) -> dict:
    from bench_offline_online import _train_figures  # the offline/online bench's metrics reader
    from science_eval import evaluate_trained

    from sasi_online.train import train
    from sasi_online.training.metrics import read_metrics

    t0 = time.perf_counter()
    train(cfg)
    train_s = time.perf_counter() - t0
    fig = _train_figures(path)
    res = {"arm": job["arm"]["name"], "seed": job["seed"], **evaluate_trained(path, job["key"], job["evaluation"]),
           "train_s": round(train_s, 1), "steps": fig["steps"], "images_per_s": fig["trainer_images_per_s"],
           "final_loss": fig["last"].get("loss")}
    if job["arm"]["source"] == "online":
        res.update(_online_figures(path))
    elif job["arm"]["source"] in ("offline", "control"):  # pairs whose SASI the store held (usable, not fishy)
        rows = read_metrics(path / "metrics.jsonl", "sasi_hit_rate")
        res["sasi_pair_rate"] = sum(r["sasi_hit_rate"] for r in rows) / max(len(rows), 1)
    return res


def _online_figures(path: Path) -> dict:
    """How much SASI the co-located trainer saw: pairs with a SASI (ring hit or draw), distinct SASI per image."""
    from sasi_online.training.metrics import read_metrics

    rows = read_metrics(path / "metrics.jsonl", "online/fallback_rate")
    if not rows:
        return {}
    last = rows[-1]
    return {"sasi_pair_rate": 1.0 - sum(r["online/fallback_rate"] + r.get("online/store_rate", 0.0)
                                        for r in rows) / len(rows),
            "hit_rate_total": float(last.get("online/hit_rate_total", 0.0)),
            "sasi_per_image": float(last.get("online/sasi_per_image_mean", 0.0))}


# ----------------------------------------------------------------------------- scheduling
def _child(job: dict, out: Path) -> subprocess.Popen:
    spec = out / "logs" / f"{job['key']}.json"
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(job), encoding="utf-8")
    from sasi_online.utils import child_env

    env = child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # the installed package, not the checkout's top
    with open(out / "logs" / f"{job['key']}.log", "w", encoding="utf-8") as log:  # the child keeps its copy
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--run-job", str(spec)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def _describe(job: dict, res: dict) -> str:
    if job["kind"] == "store":
        return f"{res['generated']} SASI, {res['sasi_per_image']:.2f} per image"
    return f"kNN {res['knn']:.1f} %, linear {res['linear']:.1f} %"


def _drop_blocked(todo: list[dict], failed: list[str]) -> None:
    for job in [j for j in todo if any(d in failed for d in j["deps"])]:
        todo.remove(job)
        failed.append(job["key"])
        print(f"  skip  {job['key']}: {', '.join(job['deps'])} failed", flush=True)


def _log_tail(out: Path, key: str) -> str:
    return (out / "logs" / f"{key}.log").read_text(encoding="utf-8", errors="replace")[-2000:]


def run_jobs(jobs: list[dict], parallel: int, out: Path, on_result) -> list[str]:
    """Run the jobs, `parallel` at a time (0: one after the other in this process), each once its
    dependencies have finished; `on_result(job, result)` after each. Returns the failed keys."""
    done = {j["key"]: r for j in jobs if (r := finished(j)) is not None}
    for job in jobs:
        if job["key"] in done:
            on_result(job, done[job["key"]])
    todo = [j for j in jobs if j["key"] not in done]
    total, failed, running = len(todo), [], {}
    t_start = time.perf_counter()
    print(f"{len(jobs)} jobs, {len(done)} already finished, {total} to run "
          f"({max(parallel, 1)} at a time; logs in {out / 'logs'})", flush=True)

    def finish(job: dict, res: dict | None, why: str = "") -> None:
        if res is None:
            failed.append(job["key"])
            print(f"  FAILED {job['key']} ({why}); log {out / 'logs' / (job['key'] + '.log')}:\n"
                  f"{_log_tail(out, job['key'])}", flush=True)
            return
        done[job["key"]] = res
        on_result(job, res)
        n_done = total - len(todo) - len(running) - len(failed)
        elapsed = time.perf_counter() - t_start
        eta = elapsed / max(n_done, 1) * (len(todo) + len(running))
        print(f"  done  {job['key']} in {_clock(res['seconds'])}: {_describe(job, res)} "
              f"[{n_done}/{total}, {_clock(elapsed)} elapsed, ~{_clock(eta)} left]", flush=True)

    if not parallel:
        _run_inline(todo, done, failed, finish)
    else:
        _run_parallel(todo, done, failed, running, parallel, out, finish)
    return failed


def _run_inline(todo: list[dict], done: dict, failed: list[str], finish) -> None:
    while todo:
        _drop_blocked(todo, failed)
        ready = [j for j in todo if all(d in done for d in j["deps"])]
        if not ready and todo:
            raise RuntimeError(f"jobs wait for unknown dependencies: {[j['key'] for j in todo]}")
        for job in ready[:1]:
            todo.remove(job)
            print(f"  start {job['key']}", flush=True)
            finish(job, run_job(job))


def _run_parallel(todo: list[dict], done: dict, failed: list[str], running: dict, parallel: int, out: Path,
                  finish) -> None:
    """Child processes, `parallel` at a time; stopped with this process (Ctrl-C included)."""
    last_beat = time.perf_counter()
    try:
        while todo or running:
            _drop_blocked(todo, failed)
            ready = [j for j in todo if all(d in done for d in j["deps"])]
            for job in ready[:parallel - len(running)]:
                todo.remove(job)
                print(f"  start {job['key']}", flush=True)
                running[job["key"]] = (job, _child(job, out), time.perf_counter())
            if not running and todo:
                raise RuntimeError(f"jobs wait for unknown dependencies: {[j['key'] for j in todo]}")
            time.sleep(2)
            for key, (job, proc, _) in list(running.items()):
                if proc.poll() is not None:
                    del running[key]
                    finish(job, finished(job) if proc.returncode == 0 else None, f"exit {proc.returncode}")
            if running and time.perf_counter() - last_beat > 60:
                last_beat = time.perf_counter()
                print("  running: " + ", ".join(f"{k} ({_clock(time.perf_counter() - t0)})"
                                                for k, (_, _, t0) in running.items()), flush=True)
    finally:
        for _, proc, _ in running.values():  # interrupted: finished jobs are kept, these rerun next time
            proc.terminate()


# ----------------------------------------------------------------------------- results
def summarise(arms: list[Arm], per_seed: dict) -> dict:
    """Per arm: mean ± std of each metric, and the paired difference to base over shared seeds."""
    from sasi_online.eval.stats import mean_std, paired_interval

    base = per_seed.get("base", {})
    out = {}
    for arm in arms:
        runs = per_seed.get(arm.name, {})
        if not runs:
            continue
        row: dict = {"seeds": sorted(runs), "n": len(runs)}
        for m in METRICS:
            mean, std = mean_std([runs[s][m] for s in sorted(runs)])
            row[m] = {"mean": mean, "std": std}
            shared = sorted(set(runs) & set(base))
            if arm.name != "base" and shared:
                row[m]["vs_base"] = {**paired_interval([runs[s][m] for s in shared], [base[s][m] for s in shared]),
                                     "seeds": shared}
        for key in ("sasi_pair_rate", "sasi_per_image", "seconds"):
            values = [r[key] for r in runs.values() if key in r]
            if values:
                row[key] = sum(values) / len(values)
        out[arm.name] = row
    return out


def power(summary: dict) -> dict:
    """What the bench can see: the positive control's Δ kNN interval (above zero, or the bench
    has no power), the default SASI arm's interval width, base above random features."""
    pos = summary.get("positive control", {}).get("knn", {}).get("vs_base") or {}
    sasi = summary.get(DEFAULT_SASI, {}).get("knn", {}).get("vs_base") or {}
    rnd, base = summary.get("random features"), summary.get("base")
    res = {"positive_control_knn": pos or None,
           "has_power": bool(pos and pos.get("low") is not None and pos["low"] > 0),
           "sasi_knn_interval_width": (sasi["high"] - sasi["low"]) if sasi.get("low") is not None else None,
           "base_above_random_features_knn": (base["knn"]["mean"] > rnd["knn"]["mean"]) if rnd and base else None}
    return res


def _ci(d: dict | None) -> str:
    if not d:
        return "—"
    if d.get("low") is None:
        return f"{d['mean']:+.1f} (1 seed)"
    return f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"


def _power_line(results: dict) -> str:
    p = results.get("power") or {}
    pos = p.get("positive_control_knn")
    if not pos:
        return "Power: no positive control in this run."
    if pos.get("low") is None:
        verdict = "one seed, no interval: the bench's power is unknown"
    elif p["has_power"]:
        verdict = "above zero, so the bench can see a gain"
    else:
        verdict = "its interval does not exclude zero: THE BENCH HAS NO POWER, a null result for SASI says nothing"
    width = p.get("sasi_knn_interval_width")
    return (f"Power: the positive control's Δ kNN is {_ci(pos)}: {verdict}."
            + (f" The {DEFAULT_SASI} arm's Δ kNN interval is {width:.1f} points wide." if width is not None else ""))


def markdown(results: dict) -> str:
    lines = ["| arm | seeds | kNN top-1 % | linear top-1 % | Δ kNN vs base [95 % CI] | Δ linear vs base [95 % CI] "
             "| SASI pairs | s / run |", "|---|---|---|---|---|---|---|---|"]
    pix = results.get("pixels")
    if pix:
        lines.append(f"| raw pixels | — | {pix['knn']:.1f} | {pix['linear']:.1f} | — | — | — | {pix['seconds']:.0f} |")
    for name, row in results["summary"].items():
        pairs = row.get("sasi_pair_rate")
        lines.append(f"| {name} | {row['n']} | {row['knn']['mean']:.1f} ± {row['knn']['std']:.1f} | "
                     f"{row['linear']['mean']:.1f} ± {row['linear']['std']:.1f} | {_ci(row['knn'].get('vs_base'))} | "
                     f"{_ci(row['linear'].get('vs_base'))} | {'—' if pairs is None else f'{100 * pairs:.0f} %'} | "
                     f"{row.get('seconds', 0):.0f} |")
    s = results["settings"]
    lines += ["", _power_line(results), "",
              f"Mean ± sample std over seeds; Δ: mean paired per-seed difference to base with its 95 % t interval "
              f"(n - 1 dof). {s['steps']} steps of {s['batch_size']} images, {s['encoder']}; tested on "
              f"{s['test_images']} images ({s['test_split']}); kNN k = 20 on centred features. Model set "
              f"{s['zoo_kind']} ({s['zoo_trained']}). SASI pairs: share of training pairs that held a SASI (or "
              f"control partner). s / run: training + evaluation, one thread, {max(s['jobs_in_parallel'], 1)} "
              f"run(s) side by side."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sasi_online.utils import save_figure

    summary, per_seed = results["summary"], results["per_seed"]
    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.38
    for j, (m, colour) in enumerate((("knn", "tab:blue"), ("linear", "tab:orange"))):
        xs = [i + (j - 0.5) * width for i in range(len(names))]
        axes[0].bar(xs, [summary[n][m]["mean"] for n in names], width, yerr=[summary[n][m]["std"] for n in names],
                    color=colour, alpha=0.6, capsize=3, label=f"{m} (mean ± std)")
        for x, n in zip(xs, names):
            vals = [r[m] for r in per_seed[n].values()]
            axes[0].plot([x] * len(vals), vals, "k.", ms=4)
        diffs = [(i + (j - 0.5) * width, summary[n][m]["vs_base"]) for i, n in enumerate(names)
                 if "vs_base" in summary[n][m]]
        for x, d in diffs:
            err = [[d["mean"] - d["low"]], [d["high"] - d["mean"]]] if d.get("low") is not None else None
            axes[1].errorbar([x], [d["mean"]], yerr=err, fmt="o", color=colour, capsize=4,
                             label=f"{m}" if x == diffs[0][0] else None)
    pix = results.get("pixels")
    for m, colour in (("knn", "tab:blue"), ("linear", "tab:orange")) if pix else ():
        axes[0].axhline(pix[m], color=colour, ls="--", lw=0.8, label=f"raw pixels, {m}")
    lo = min(min(summary[n][m]["mean"] - summary[n][m]["std"] for n in names) for m in METRICS)
    axes[0].set_ylim(max(lo - 5, 0), None)
    for ax, title in zip(axes, ("top-1 % per arm (dots: seeds)", "paired difference to base, 95 % CI")):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[1].axhline(0.0, color="gray", lw=0.8)
    axes[1].set_ylabel("percentage points", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def write_results(out: Path, results: dict) -> None:
    from sasi_online.utils import atomic_write_json, atomic_write_text

    atomic_write_json(out / "science.json", results)
    if results["summary"]:
        atomic_write_text(out / "science.md", markdown(results))
        plot(results, out / "science.png")


# ----------------------------------------------------------------------------- main
def _zoo(args, out: Path) -> Path:
    if args.zoo:
        zoo = Path(args.zoo).resolve()
        if not (zoo / "zoo.json").is_file():
            raise SystemExit(f"--zoo {zoo}: no zoo.json there; build one with `sasi zoo build DIR --micro`")
        return zoo
    from sasi_online.zoo.micro.ship import build_micro

    return build_micro(out / "zoo").resolve()


def _shown(path: Path) -> str:
    """A path as the results show it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _settings(args, out: Path, zoo: Path, seeds: dict, common: list[str], evaluation: list[str]) -> dict:
    from sasi_online.config import load_config
    from sasi_online.data.datasets import build_dataset

    cfg = load_config(CONFIG, [*common, *evaluation])
    manifest = json.loads((zoo / "zoo.json").read_text(encoding="utf-8"))
    trained = manifest.get("trained") or []
    return {"config": str(CONFIG.relative_to(REPO)), "augment": str(AUGMENT.relative_to(REPO)),
            "overrides": args.overrides, "seeds": seeds,
            "steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "limit": cfg.data.limit,
            "encoder": f"{cfg.method.name}, {cfg.method.backbone} at {cfg.data.image_size} px",
            "test_split": cfg.eval.test_split, "test_images": len(build_dataset(cfg.data, cfg.eval.test_split)),
            "evaluation": evaluation, "zoo": _shown(zoo), "zoo_kind": manifest.get("kind", "random"),
            "zoo_trained": ", ".join(trained) if trained else "nothing trained",
            "zoo_identity": zoo_identity(zoo), "jobs_in_parallel": args.jobs,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def _names(choices, cast=str):
    """An argparse type: a comma-separated list (so that section.key=value overrides can follow)."""
    def parse(text: str) -> list:
        items = [cast(t.strip()) for t in text.split(",") if t.strip()]
        bad = [t for t in items if choices and t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(map(str, bad))}: choose from {', '.join(choices)}")
        return items
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--out", default="runs/science", help="results, runs, stores, logs (runs/ is git-ignored)")
    ap.add_argument("--zoo", help="model set folder (default: the micro set, built into OUT/zoo)")
    ap.add_argument("--seeds", type=int, default=5,
                    help="paired seeds 0..N-1 of base and the default SASI arm (>= 2 for an interval)")
    ap.add_argument("--power-seeds", type=int, default=3,
                    help="seeds 0..N-1 of the positive control (3: t = 4.30, where 2 seeds give 12.7)")
    ap.add_argument("--control-seeds", type=int, default=2, help="seeds 0..N-1 of every other arm")
    ap.add_argument("--steps", type=int, help="training steps per run (default: bench/science.yaml's)")
    ap.add_argument("--limit", type=int, help="use only the first N train images (smoke runs)")
    ap.add_argument("--test-split", choices=("full", "embedded"), default="full",
                    help="full: the official 10,000 test images (apt-get install dataset-fashion-mnist); "
                         "embedded: the package's 500")
    ap.add_argument("--holdout", action="store_true",
                    help=f"choose a recipe without the test split: train on the first {HOLDOUT_TRAIN} train "
                         "images, test on the last 400")
    ap.add_argument("--jobs", type=int, default=2, help="jobs side by side, one thread each (0: in this process)")
    ap.add_argument("--sweep", action="store_true",
                    help="more offline arms: image VP at strength 0.75 and 0.9, mask VP, text-to-image")
    ap.add_argument("--sasi-per-image", type=_names(None, int), default=[], metavar="N,N",
                    help="more offline arms with N SASI per image, one rewrite each, e.g. 3 (Table 11)")
    ap.add_argument("--pair-modes", type=_names(None), default=[], metavar="MODE,MODE",
                    help="more offline arms with another train.pair_mode, e.g. mix (Table 4)")
    ap.add_argument("--arms", type=_names(None), default=[], metavar="NAME,NAME",
                    help="run only these arms (names as in the table, e.g. base,\"positive control\")")
    ap.add_argument("--run-job", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every arm")
    return ap.parse_args(argv)


def _common(args, zoo: Path) -> tuple[list[str], list[str]]:
    """(overrides of every arm, evaluation overrides)."""
    from science_eval import check_test_split, eval_overrides

    limit = args.limit or (HOLDOUT_TRAIN if args.holdout else None)
    if args.holdout and limit > HOLDOUT_TRAIN:
        raise SystemExit(f"--holdout trains on at most {HOLDOUT_TRAIN} images; --limit {limit} would see the test part")
    split = "holdout" if args.holdout else args.test_split
    check_test_split(split)
    common = [f"models.root={zoo}", f"augment.recipe={AUGMENT}", *([f"train.steps={args.steps}"] if args.steps else []),
              *([f"data.limit={limit}"] if limit else []), *args.overrides]
    return common, eval_overrides(split)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.run_job:  # one job, in a child process
        run_job(json.loads(Path(args.run_job).read_text(encoding="utf-8")))
        return {}
    from sasi_online.utils import limit_threads

    limit_threads()
    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    zoo = _zoo(args, out)
    seeds = {"main": list(range(args.seeds)), "power": list(range(args.power_seeds)),
             "other": list(range(args.control_seeds))}
    common, evaluation = _common(args, zoo)
    arms = plan_arms(args.sweep, args.sasi_per_image, args.pair_modes)
    if args.arms:
        unknown = sorted(set(args.arms) - {a.name for a in arms})
        if unknown:
            raise SystemExit(f"--arms: unknown arm(s) {', '.join(unknown)}; planned: {', '.join(a.name for a in arms)}")
        arms = [a for a in arms if a.name in args.arms]
    jobs = make_jobs(arms, seeds, out, common, evaluation)
    results = {"settings": _settings(args, out, zoo, seeds, common, evaluation),
               "arms": [asdict(a) for a in arms], "pixels": None, "per_seed": {}, "stores": {}, "summary": {}}

    def on_result(job: dict, res: dict) -> None:
        if job["kind"] == "store":
            results["stores"][job["key"]] = res
        elif job["kind"] == "pixels":
            results["pixels"] = res
        else:
            results["per_seed"].setdefault(job["arm"]["name"], {})[job["seed"]] = res
            results["summary"] = summarise(arms, results["per_seed"])
            results["power"] = power(results["summary"])
        done = [*results["stores"].values(), *([results["pixels"]] if results["pixels"] else []),
                *[r for runs in results["per_seed"].values() for r in runs.values()]]
        results["settings"]["job_seconds"] = round(sum(r["seconds"] for r in done), 1)
        results["settings"]["wall_s_this_run"] = round(time.perf_counter() - t0, 1)
        write_results(out, results)

    print(f"science bench: {len(arms)} arms, seeds {seeds['main']} (base, {DEFAULT_SASI}), {seeds['power']} "
          f"(positive control), {seeds['other']} (the rest) -> {out}", flush=True)
    failed = run_jobs(jobs, args.jobs, out, on_result)
    results["settings"].update(failed=failed, wall_s_this_run=round(time.perf_counter() - t0, 1),
                               finished=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
    write_results(out, results)
    if results["summary"]:
        print("\n" + markdown(results))
    print(f"wrote {out / 'science.json'}, science.md, science.png in {_clock(time.perf_counter() - t0)}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    if failed:
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
