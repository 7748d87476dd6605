"""A table's generation and training commands, as a shell script or a Slurm sbatch array.

`plan(table)` expands every run's config (checked with the trainer's own `validate`,
so a run that could not start fails here, naming its config) and finds the SASI stores
the runs read. Each store is generated once, by the first config that names it; two
configs that name one store with different generation settings are refused. The
scripts only chain commands that resume by themselves (`sasi generate`, training,
`sasi eval`), so rerunning a script after an interruption continues it.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from sasi_online.errors import UserInputError
from sasi_online.paper.tables import Run, Table

LAUNCHERS = ("deepspeed", "slurm")
DEFAULT_RUNS_ROOT = "runs/paper"


@dataclass
class StoreJob:
    path: str
    config: str  # the first config naming this store
    vp_kind: str | None  # --vp-kind when visual.kind is not the kind (direct generation)
    variants: int
    settings: dict = field(repr=False, default_factory=dict)

    def command(self) -> list[str]:
        cmd = ["sasi", "generate", "--config", self.config, "--variants", str(self.variants)]
        return cmd + (["--vp-kind", self.vp_kind] if self.vp_kind else [])


@dataclass
class RunJob:
    run: Run
    overrides: list[str]
    out: str
    cfg: object = field(repr=False, default=None)


@dataclass
class Plan:
    table: Table
    stores: list[StoreJob]
    runs: list[RunJob]
    gpus: int
    runs_root: str = DEFAULT_RUNS_ROOT


def _store_for(cfg, config: str) -> StoreJob:
    """The store a SASI run reads, with everything that decides its images (a superset of
    the store's settings hash, which would import the generation stack)."""
    import dataclasses

    from sasi_online.visual.variants import variants_per_image

    direct = cfg.train.pair_mode == "direct"
    variants = 2 if direct else variants_per_image(cfg.semantics.variants, cfg.visual.variants)
    settings = {s: dataclasses.asdict(getattr(cfg, s)) for s in ("data", "models", "semantics", "visual", "generation")}
    settings["data"].pop("limit")  # a store belongs to the whole dataset
    return StoreJob(cfg.store.path, config, "direct" if direct else None, variants, settings)


def expand(run: Run, runs_root: str = DEFAULT_RUNS_ROOT, gpus: int = 1) -> tuple[object, list[str]]:
    """(validated Config, overrides) of one run on `gpus` trainers. The config's
    train.batch_size is the recipe's global batch; each trainer gets its share."""
    from sasi_online.config import ConfigError, load_config
    from sasi_online.train import validate

    overrides = run.overrides(runs_root)
    try:
        cfg = load_config(run.config, overrides)
        if gpus > 1:
            if cfg.train.batch_size % gpus:
                raise UserInputError(f"its global batch {cfg.train.batch_size} does not split over {gpus} GPUs; "
                                     "choose --gpus dividing it")
            overrides.append(f"train.batch_size={cfg.train.batch_size // gpus}")
            cfg = load_config(run.config, overrides)
        validate(cfg, num_trainers=gpus)
    except (ConfigError, UserInputError) as exc:
        raise UserInputError(f"run '{run.id}' (config '{run.config}'): {exc}") from None
    return cfg, overrides


def plan(table: Table, runs_root: str = DEFAULT_RUNS_ROOT, gpus: int = 1) -> Plan:
    if gpus < 1:
        raise UserInputError(f"--gpus must be >= 1, got {gpus}")
    stores: dict[str, StoreJob] = {}
    runs = []
    for run in table.runs:
        cfg, overrides = expand(run, runs_root, gpus)
        runs.append(RunJob(run, overrides, cfg.train.out, cfg))
        if run.base:
            continue
        job = _store_for(cfg, run.config)
        first = stores.setdefault(job.path, job)
        if first.settings != job.settings or first.vp_kind != job.vp_kind:
            raise UserInputError(f"configs '{first.config}' and '{job.config}' both name store '{job.path}' "
                                 "with different generation settings; give one of them its own store.path")
        first.variants = max(first.variants, job.variants)
    return Plan(table, list(stores.values()), runs, gpus, runs_root)


def _train_command(job: RunJob, gpus: int) -> str:
    args = " ".join(shlex.quote(a) for a in ["--config", job.run.config, *job.overrides])
    return f'deepspeed --num_gpus {gpus} "$TRAIN" {args}'


def _eval_command(job: RunJob) -> str:
    return f"sasi eval {shlex.quote(job.out + '/checkpoints')}"


def _header(p: Plan, launcher: str) -> list[str]:
    t = p.table
    return [f"# Paper {t.caption}.",
            f"# Written by `sasi reproduce {t.number} --launcher {launcher} --gpus {p.gpus}`: "
            f"{len(p.stores)} SASI store(s), {len(p.runs)} runs.",
            "# Every command resumes: run this again after an interruption. Then:",
            f"#   sasi reproduce {t.number} --collect"
            + ("" if p.runs_root == DEFAULT_RUNS_ROOT else f" --runs {shlex.quote(p.runs_root)}")]


def shell_script(p: Plan) -> str:
    lines = ["#!/usr/bin/env bash", *_header(p, "deepspeed"), "set -euo pipefail",
             "TRAIN=$(python -c 'import sasi_online.train as t; print(t.__file__)')", "",
             "# --- SASI stores ---"]
    lines += [" ".join(shlex.quote(a) for a in s.command()) for s in p.stores]
    lines += ["", f"# --- training and evaluation: {len(p.runs)} runs ---"]
    for job in p.runs:
        lines += [f"# run {job.run.id}", _train_command(job, p.gpus), _eval_command(job)]
    return "\n".join(lines) + "\n"


def _case(stage: str, items: list[str]) -> list[str]:
    return [f"  {stage}:{i}) {cmd} ;;" for i, cmd in enumerate(items)]


def slurm_script(p: Plan) -> str:
    """One file: run with bash, it submits the generation array and, after it, the training
    array (one task per run) with itself as the job script."""
    n = p.table.number
    gen = [" ".join(shlex.quote(a) for a in s.command()) for s in p.stores]
    train = [f"{_train_command(job, p.gpus)} && {_eval_command(job)}" for job in p.runs]
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name=sasi-table{n}", "#SBATCH --nodes=1",
             f"#SBATCH --gpus-per-node={p.gpus}", f"#SBATCH --cpus-per-task={8 * p.gpus}",
             f"#SBATCH --output=slurm-table{n}-%A_%a.out", *_header(p, "slurm"),
             "# Submit from the folder the runs should live in:  bash THIS_FILE", "set -euo pipefail",
             'if [ -z "${SLURM_JOB_ID:-}" ]; then',
             '  after=""']
    if gen:
        lines += [f'  gen=$(sbatch --parsable --array=0-{len(gen) - 1} --gpus-per-node=1 --cpus-per-task=8 '
                  '--export=ALL,SASI_STAGE=generate "$0")  # one GPU per store',
                  '  after="--dependency=afterok:${gen%%;*}"']
    lines += [f'  sbatch $after --array=0-{len(train) - 1} --export=ALL,SASI_STAGE=train "$0"', "  exit 0", "fi",
              "TRAIN=$(python -c 'import sasi_online.train as t; print(t.__file__)')",
              'case "${SASI_STAGE}:${SLURM_ARRAY_TASK_ID}" in',
              *_case("generate", gen), *_case("train", train),
              '  *) echo "unknown task ${SASI_STAGE}:${SLURM_ARRAY_TASK_ID}" >&2; exit 2 ;;', "esac"]
    return "\n".join(lines) + "\n"


def render(p: Plan, launcher: str) -> str:
    if launcher not in LAUNCHERS:
        raise UserInputError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got '{launcher}'")
    return shell_script(p) if launcher == "deepspeed" else slurm_script(p)
