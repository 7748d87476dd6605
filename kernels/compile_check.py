"""Compile every Triton kernel for a CUDA architecture without a GPU.

Triton's CPU interpreter runs kernels as Python and accepts code the real compiler
rejects; compiling ahead of time (Triton's own front end, LLVM and ptxas, which ship with
it) catches those errors on a machine without a GPU. Must run in a process where triton
was imported WITHOUT TRITON_INTERPRET=1:

    python -m sasi_online.kernels.compile_check [--arch 90]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from sasi_online.errors import UserInputError

from ._triton import interpret_mode, triton_import_problem


def _plans() -> list[tuple[object, list[str], dict[str, object]]]:
    """(kernel, argument types, constexpr values) for representative specialisations."""
    from . import guided_step as gs
    from . import infonce as nf
    from . import probe as pr
    from . import ring_augment as ra

    i32, f32 = "i32", "fp32"
    plans = [(pr.probe_kernel, ["*fp32", "*fp32", i32], {"BLOCK": 16})]
    for dtype in ("*fp32", "*fp16"):
        plans.append((gs.guided_step_kernel, [dtype] * 5 + [i32] + [f32] * 10,
                      {"HAS_NOISE": True, "CLIP": True, "USE_EPS": True, "BLOCK": 1024}))
    plans.append((ra.grey_sum_kernel, ["*u8", "*fp32", "*fp32"] + [i32] * 8, {"BLOCK": 256}))
    plans.append((ra.augment_kernel, ["*u8", "*fp32", "*fp32", "*fp32"] + [i32] * 7 + [f32] * 6,
                  {"BLOCK": 256}))
    blocks = {"BLOCK_B": 16, "BLOCK_K": 64, "BLOCK_D": 128, "PRECISION": "ieee"}
    plans.append((nf.infonce_fwd_kernel, ["*fp32"] * 6 + [i32] * 3 + [f32, i32], blocks))
    plans.append((nf.infonce_bwd_kernel, ["*fp32"] * 8 + [i32] * 3 + [f32, i32],
                  {**blocks, "NEED_DK": True}))
    return plans


def compile_all(arch: int = 90) -> list[dict]:
    """Compile each plan for sm_`arch`; one record per kernel (name, ok, seconds, error)."""
    problem = triton_import_problem()
    if problem:
        raise UserInputError(f"compile_check: {problem}.")
    if interpret_mode():
        raise UserInputError("compile_check: triton was imported with TRITON_INTERPRET=1, "
                             "which replaces the compiler; run this in a process without it.")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", int(arch), 32)
    records = []
    for kernel, types, consts in _plans():
        names = kernel.arg_names
        signature = dict(zip(names, types + ["constexpr"] * len(consts)))
        constexprs = {(names.index(k),): v for k, v in consts.items()}
        t0 = time.perf_counter()
        record = {"kernel": kernel.__name__, "arch": f"sm_{arch}", "types": types[0]}
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target)
            record.update(ok=True, shared_bytes=int(compiled.metadata.shared),
                          num_warps=int(compiled.metadata.num_warps))
        except Exception as exc:  # noqa: BLE001 - report every kernel's failure, not the first
            record.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
        record["seconds"] = round(time.perf_counter() - t0, 2)
        records.append(record)
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Compile the Triton kernels for a CUDA arch.")
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    records = compile_all(ap.parse_args(argv).arch)
    print(json.dumps(records, indent=2))
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
