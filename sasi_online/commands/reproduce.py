"""`sasi reproduce TABLE`: the paper's experiments, then their results beside the paper's.

    sasi reproduce 1 --print                       # Table 1's 12 runs as a shell script, on stdout
    sasi reproduce 1 --gpus 8                      # writes reproduce_table1.sh (DeepSpeed, 8 GPUs)
    sasi reproduce 12 --launcher slurm --gpus 4    # writes reproduce_table12.sbatch (bash it to submit)
    sasi reproduce 1 --collect                     # runs/paper/table1.md: ours (the paper's)

Tables 1-4, 8-12 and 14 (5-7 are downstream tasks: `sasi export` the backbone; 13 is GPU
hours). Runs live under --runs (default runs/paper/<run id>); tables that share a setting
share its run. Each run's config is configs/paper/<run id>.yaml (base runs: the same
config with train.pair_mode=base).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sasi_online.paper.script import DEFAULT_RUNS_ROOT, LAUNCHERS
    from sasi_online.paper.tables import table_numbers

    parser.description = ("The paper's experiments as runs: writes a table's SASI generation, training and "
                          "evaluation commands as a shell script (or a Slurm sbatch array), and after the runs "
                          "gathers their results beside the paper's numbers. Examples: 'sasi reproduce 1 --print', "
                          "'sasi reproduce 1 --gpus 8', 'sasi reproduce 12 --launcher slurm --gpus 4', "
                          "'sasi reproduce 1 --collect'. Run configs: configs/paper/.")
    parser.add_argument("table", metavar="TABLE", help=f"the paper's table: {', '.join(table_numbers())}")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="deepspeed",
                        help="deepspeed: a shell script of deepspeed commands; slurm: an sbatch array "
                             "(generation tasks, then one training task per run)")
    parser.add_argument("--gpus", type=int, default=1,
                        help="GPUs per training run; each trainer gets global batch / GPUS")
    parser.add_argument("--runs", default=DEFAULT_RUNS_ROOT, help="folder holding the table's runs")
    parser.add_argument("--print", action="store_true", dest="print_only",
                        help="print the script instead of writing it")
    parser.add_argument("--out", default=None,
                        help="script file (default reproduce_tableN.sh / .sbatch) or, with --collect, "
                             "the table's Markdown (default RUNS/tableN.md, with a .json beside it)")
    parser.add_argument("--collect", action="store_true",
                        help="gather the runs' eval.json into the paper's table layout, the paper's numbers beside")


def _collect(args, table) -> int:
    import json

    from sasi_online.paper.collect import collect, markdown
    from sasi_online.utils import atomic_write_text

    result = collect(table, args.runs)
    text = markdown(result, args.runs)
    out = Path(args.out) if args.out else Path(args.runs) / f"table{table.number}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result.as_dict(), indent=1, ensure_ascii=False))
    print(text, end="")
    print(f"\nwrote {out} and {out.with_suffix('.json')}")
    return 0


def run(args) -> int:
    from sasi_online.paper.script import plan, render
    from sasi_online.paper.tables import get_table
    from sasi_online.utils import atomic_write_text

    table = get_table(args.table)
    if args.collect:
        return _collect(args, table)
    p = plan(table, args.runs, args.gpus)
    text = render(p, args.launcher)
    if args.print_only:
        print(text, end="")
        return 0
    suffix = ".sh" if args.launcher == "deepspeed" else ".sbatch"
    out = Path(args.out or f"reproduce_table{table.number}{suffix}")
    atomic_write_text(out, text)
    from sasi_online.utils import current_umask

    out.chmod(0o777 & ~current_umask())  # executable, readable as far as the umask allows
    how = f"bash {out}" if args.launcher == "slurm" else f"./{out}" if out.parent == Path(".") else str(out)
    print(f"wrote {out}: {len(p.stores)} SASI store(s), {len(p.runs)} runs on {args.gpus} GPU(s) each. "
          f"Start it with: {how}; afterwards: sasi reproduce {table.number} --collect --runs {args.runs}")
    return 0
