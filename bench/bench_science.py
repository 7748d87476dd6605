"""Does the method help at micro scale? base vs offline SASI vs online SASI, with error bars.

    python bench/bench_science.py                                # the default run, ~30 min on 2 cores
    python bench/bench_science.py --seeds 5 --jobs 2 --out runs/science5
    python bench/bench_science.py --vp-kinds image,mask,mix      # + offline arms per VP kind (Table 10)
    python bench/bench_science.py --sasi-per-image 3             # + SASI x3 per image vs x1 (Table 11)
    python bench/bench_science.py --pair-modes mix               # + `mix` pairs vs (real, SASI) (Table 4)
    python bench/bench_science.py --steps 2 --seeds 2 --limit 64 # a smoke run

Every arm trains MoCo-v2 with the same recipe (bench/science.yaml), steps and seeds on the
embedded Fashion-MNIST subset (2,000 train images, tested on its 500 test images, which
come from the official test split):
  untrained the encoder as initialised (one step at lr 1e-12), for reference;
  base      pair_mode=base, no SASI;
  offline   SASI generated into a store first (one store per seed, generation.seed = seed),
            then (real, SASI) pairs read from it;
  online    online.mode=colocated: the trainer makes its own SASI between steps (a batch of
            16 every 2 steps, a 2,048-slot ring that keeps each SASI for up to 8 uses), so
            SASI arrive during the run instead of before it.
Encoder: ResNet-18 with torchvision's stem (stride-2 conv + max-pool) at 32 px, batch 64,
400 steps (12.8 epochs), SGD lr 0.12 per 256 images, momentum encoder m = 0.99, queue 1,024,
temperature 0.2, MoCo-v2's augmentations. SASI: the micro model set (`build_micro`, built
into OUT/zoo unless --zoo is given) at 64 px, BLIP-2 captions + LLaMA rewrites, image VP at
strength 0.5 (5 DPM-Solver++ steps), CFG 2.

Evaluation is the project's (`evaluate_checkpoint`): weighted kNN (k = 50) and the L-BFGS
linear probe on frozen clean features, top-1 %. Per arm: mean ± sample std over seeds, and
the paired per-seed difference to base with a 95 % t interval (n - 1 degrees of freedom;
sasi_online/eval/stats.py). Writes science.json, science.md and science.png into --out
after each finished job; a rerun skips finished jobs (and redoes SASI jobs whose models
changed), so an interrupted run keeps what finished. Independent (arm, seed) jobs run as
--jobs processes side by side, one thread each; each job's output is in OUT/logs/.
Default run on the 2-core machine: the README's "Science at micro scale" section.
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
sys.path.insert(0, str(REPO / "bench"))  # bench_offline_online, whose metrics reader is reused
CONFIG = Path(__file__).resolve().with_name("science.yaml")
METRICS = ("knn", "linear")


@dataclass(frozen=True)
class Arm:
    name: str
    source: str  # untrained | none | offline | online
    pair_mode: str = "sasi"
    vp: str = "image"
    per_image: int = 1

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "_").replace("=", "-").replace("×", "x")


def plan_arms(vp: str, vp_kinds=(), per_image=(), pair_modes=()) -> list[Arm]:
    """untrained (the reference), base, offline, online; then offline arms that change one factor
    each (the paper's ablations)."""
    arms = [Arm("untrained", "untrained", "base", vp), Arm("base", "none", "base", vp),
            Arm("offline", "offline", "sasi", vp), Arm("online", "online", "sasi", vp)]
    extra = [Arm(f"offline vp={k}", "offline", "sasi", k) for k in vp_kinds]
    extra += [Arm(f"offline ×{n}", "offline", "sasi", vp, int(n)) for n in per_image]
    extra += [Arm(f"offline pair={p}", "offline", p, vp) for p in pair_modes]
    seen = {(a.source, a.pair_mode, a.vp, a.per_image) for a in arms}
    for arm in extra:
        key = (arm.source, arm.pair_mode, arm.vp, arm.per_image)
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

    cfg = load_config(CONFIG, [*common, f"visual.kind={vp}"])
    return _fingerprint(model_hashes(cfg, vp, text_model_folders(cfg)))


def store_key(arm: Arm, seed: int) -> str:
    return f"store_{arm.vp}_x{arm.per_image}_s{seed}"


def make_jobs(arms: list[Arm], seeds: list[int], out: Path, common: list[str]) -> list[dict]:
    """Store jobs (one per VP kind, SASI per image and seed), then one train+eval job per (arm, seed)."""
    recipe = CONFIG.read_text(encoding="utf-8")
    models = {a.vp: models_identity(common, a.vp) for a in arms if a.source in ("offline", "online")}
    jobs: dict[str, dict] = {}
    for seed in seeds:
        for arm in arms:
            if arm.source != "offline" or store_key(arm, seed) in jobs:
                continue
            key = store_key(arm, seed)
            over = [*common, f"visual.kind={arm.vp}", f"semantics.variants={arm.per_image}",
                    f"generation.seed={seed}"]
            jobs[key] = {"kind": "store", "key": key, "path": str(out / "stores" / key), "seed": seed,
                         "per_image": arm.per_image, "overrides": over, "deps": [],
                         "fingerprint": _fingerprint(recipe, over, models[arm.vp])}
    for seed in seeds:
        for arm in arms:
            key = f"{arm.slug}_s{seed}"
            over = [*common, f"train.seed={seed}", f"generation.seed={seed}", f"visual.kind={arm.vp}",
                    f"train.pair_mode={arm.pair_mode}"]
            deps = []
            if arm.source == "offline":
                deps = [store_key(arm, seed)]
                over.append(f"store.path={jobs[deps[0]]['path']}")
            elif arm.source == "online":
                over += ["online.mode=colocated", "online.producers=0"]
            elif arm.source == "untrained":  # as initialised: one step at lr 1e-12 (BN statistics of one batch)
                over += ["train.steps=1", "optim.lr=1.0e-12", "optim.warmup_steps=0", "train.ckpt_every=1"]
            sasi = arm.source in ("offline", "online")
            jobs[key] = {"kind": "train", "key": key, "arm": asdict(arm), "seed": seed, "deps": deps,
                         "path": str(out / "runs" / key), "overrides": over,
                         "fingerprint": _fingerprint(recipe, [o for o in over if not o.startswith("store.path=")],
                                                     models[arm.vp] if sasi else None,
                                                     jobs[deps[0]]["fingerprint"] if deps else None)}
    # the longest first (after the stores they wait for), so that no core idles at the end
    order = {"store": 0, "online": 1, "offline": 2, "none": 3, "untrained": 4}
    return sorted(jobs.values(), key=lambda j: (order["store" if j["kind"] == "store" else j["arm"]["source"]],
                                                j["seed"]))


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
        from sasi_online.data.store import SasiStore
        from sasi_online.generation.offline import generate_store

        cfg = load_config(CONFIG, job["overrides"])
        summary = generate_store(cfg, path, variants=job["per_image"], progress=True)
        n = len(_dataset(cfg))
        with SasiStore.open(path) as st:
            per_image = sum(len(st.usable_variants(i)) for i in range(n)) / n
        res = {"generated": summary.generated, "failed": summary.failed, "sasi_per_image": per_image,
               "sasi_per_s": summary.sasi_per_second}
    else:
        res = _train_and_eval(job, path, load_config(CONFIG, [*job["overrides"], f"train.out={path}"]))
    res.update(fingerprint=job["fingerprint"], seconds=round(time.perf_counter() - t0, 1), key=job["key"])
    atomic_write_json(_done_file(job), res)
    return res


def _dataset(cfg):
    from sasi_online.data.datasets import build_dataset

    return build_dataset(cfg.data)


def _train_and_eval(job: dict, path: Path, cfg) -> dict:
    from bench_offline_online import _train_figures  # the offline/online bench's metrics reader

    from sasi_online.eval.suite import evaluate_checkpoint
    from sasi_online.train import train
    from sasi_online.training.metrics import read_metrics

    t0 = time.perf_counter()
    train(cfg)
    train_s = time.perf_counter() - t0
    ev = evaluate_checkpoint(path / "checkpoints", path / "eval", run_name=job["key"])["results"]
    fig = _train_figures(path)
    res = {"arm": job["arm"]["name"], "seed": job["seed"], "knn": ev["knn"]["top1"], "linear": ev["linear"]["top1"],
           "train_s": round(train_s, 1), "steps": fig["steps"], "images_per_s": fig["trainer_images_per_s"],
           "final_loss": fig["last"].get("loss")}
    if job["arm"]["source"] == "online":
        res.update(_online_figures(path))
    elif job["arm"]["source"] == "offline":  # pairs whose SASI the store held (usable, not fishy)
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


def _ci(d: dict | None) -> str:
    if not d:
        return "—"
    if d.get("low") is None:
        return f"{d['mean']:+.1f} (1 seed)"
    return f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"


def markdown(results: dict) -> str:
    lines = ["| arm | seeds | kNN top-1 % | linear top-1 % | Δ kNN vs base [95 % CI] | Δ linear vs base [95 % CI] "
             "| SASI pairs | s / run |", "|---|---|---|---|---|---|---|---|"]
    for name, row in results["summary"].items():
        pairs = row.get("sasi_pair_rate")
        lines.append(f"| {name} | {row['n']} | {row['knn']['mean']:.1f} ± {row['knn']['std']:.1f} | "
                     f"{row['linear']['mean']:.1f} ± {row['linear']['std']:.1f} | {_ci(row['knn'].get('vs_base'))} | "
                     f"{_ci(row['linear'].get('vs_base'))} | {'—' if pairs is None else f'{100 * pairs:.0f} %'} | "
                     f"{row.get('seconds', 0):.0f} |")
    s = results["settings"]
    lines += ["", f"Mean ± sample std over seeds {s['seeds']}; Δ: mean paired per-seed difference to base with its "
              f"95 % t interval (n - 1 dof). {s['steps']} steps of {s['batch_size']} images, {s['encoder']}; "
              f"model set {s['zoo_kind']} ({s['zoo_trained']}). SASI pairs: share of training pairs that held "
              f"a SASI (offline: the store's; online: ring hits and draws of other images' SASI). s / run: "
              f"training + evaluation, one thread, {max(s['jobs_in_parallel'], 1)} run(s) side by side."]
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


def _settings(args, out: Path, zoo: Path, seeds: list[int], common: list[str]) -> dict:
    from sasi_online.config import load_config

    cfg = load_config(CONFIG, common)
    manifest = json.loads((zoo / "zoo.json").read_text(encoding="utf-8"))
    trained = manifest.get("trained") or []
    stem = "small stem" if cfg.method.small_stem else "torchvision stem"
    return {"config": str(CONFIG.relative_to(REPO)), "overrides": args.overrides, "seeds": seeds,
            "steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "limit": cfg.data.limit,
            "encoder": f"{cfg.method.name}, {cfg.method.backbone} ({stem}) at {cfg.data.image_size} px",
            "zoo": _shown(zoo), "zoo_kind": manifest.get("kind", "random"),
            "zoo_trained": ", ".join(trained) if trained else "nothing trained",
            "zoo_identity": zoo_identity(zoo), "jobs_in_parallel": args.jobs,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


KINDS = ("image", "mask", "mix", "noise")


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
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1, the same in every arm (>= 2 for an interval)")
    ap.add_argument("--steps", type=int, help="training steps per run (default: bench/science.yaml's 400)")
    ap.add_argument("--limit", type=int, help="use only the first N train images (smoke runs)")
    ap.add_argument("--jobs", type=int, default=2, help="jobs side by side, one thread each (0: in this process)")
    ap.add_argument("--vp", default="image", choices=KINDS,
                    help="VP kind of the offline and online arms")
    ap.add_argument("--vp-kinds", type=_names(KINDS), default=[], metavar="K,K",
                    help="more offline arms, one per VP kind, e.g. image,mask,mix (the paper's Table 10)")
    ap.add_argument("--sasi-per-image", type=_names(None, int), default=[], metavar="N,N",
                    help="more offline arms with N SASI per image, one rewrite each, e.g. 3 (Table 11)")
    ap.add_argument("--pair-modes", type=_names(None), default=[], metavar="MODE,MODE",
                    help="more offline arms with another train.pair_mode, e.g. mix (Table 4)")
    ap.add_argument("--arms", type=_names(None), default=[], metavar="NAME,NAME",
                    help="run only these arms (names as in the table, e.g. untrained,base,\"offline vp=mask\")")
    ap.add_argument("--run-job", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every arm")
    return ap.parse_args(argv)


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
    seeds = list(range(args.seeds))
    common = [f"models.root={zoo}", *([f"train.steps={args.steps}"] if args.steps else []),
              *([f"data.limit={args.limit}"] if args.limit else []), *args.overrides]
    arms = plan_arms(args.vp, args.vp_kinds, args.sasi_per_image, args.pair_modes)
    if args.arms:
        unknown = sorted(set(args.arms) - {a.name for a in arms})
        if unknown:
            raise SystemExit(f"--arms: unknown arm(s) {', '.join(unknown)}; planned: {', '.join(a.name for a in arms)}")
        arms = [a for a in arms if a.name in args.arms]
    jobs = make_jobs(arms, seeds, out, common)
    results = {"settings": _settings(args, out, zoo, seeds, common), "arms": [asdict(a) for a in arms],
               "per_seed": {}, "stores": {}, "summary": {}}

    def on_result(job: dict, res: dict) -> None:
        if job["kind"] == "store":
            results["stores"][job["key"]] = res
        else:
            results["per_seed"].setdefault(job["arm"]["name"], {})[job["seed"]] = res
            results["summary"] = summarise(arms, results["per_seed"])
        results["settings"]["job_seconds"] = round(sum(r["seconds"] for r in results["stores"].values()) + sum(
            r["seconds"] for runs in results["per_seed"].values() for r in runs.values()), 1)
        results["settings"]["wall_s_this_run"] = round(time.perf_counter() - t0, 1)
        write_results(out, results)

    print(f"science bench: {len(arms)} arms x {len(seeds)} seeds -> {out}", flush=True)
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
