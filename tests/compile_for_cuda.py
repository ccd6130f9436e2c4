"""Compile ognet's Triton kernels for a CUDA GPU on a machine without one: python tests/compile_for_cuda.py

Triton's interpreter (the CPU tests) runs a kernel's Python, not its compiler: a construct the GPU
compiler rejects passes there. This runs the real pipeline (Triton IR, LLVM, PTX and the ptxas
that comes with the triton wheel) for sm_90 with the launch options the code uses, and prints one
line per kernel. Run without TRITON_INTERPRET (under it the kernels are not compilable objects).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_for_cuda: unset TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ognet.model import triton_edgeconv as edge  # noqa: E402
from ognet.model import triton_ops as point  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
F32, I64, I32 = "*fp32", "*i64", "i32"
POOL = {"y_ptr": F32, "z_ptr": F32, "gamma_ptr": F32, "idx_ptr": I64, "extreme_ptr": F32, "mean_ptr": F32}
POOL |= {"winner_ptr": I64, "part_ptr": F32} | dict.fromkeys(("C", "N", "K", "n_blocks", "n_parts"), I32)
POOL |= dict.fromkeys(("sy_b", "sy_c", "sz_b", "sz_c"), "i64")
SCATTER = {"dy_ptr": F32, "idx_ptr": I64, "winner_ptr": I64, "win_ptr": F32, "spread_ptr": F32, "lam_ptr": F32}
SCATTER |= {"y_ptr": F32} | dict.fromkeys(("C", "N", "K", "n_blocks"), I32)
SCATTER |= dict.fromkeys(("sd_b", "sd_c", "sy_b", "sy_c"), "i64")
EDGE_TILES = {"BLOCK_C": edge.BLOCK_C, "BLOCK_N": edge.BLOCK_N}
EXACT = {"enable_fp_fusion": False}
FAST = {"num_warps": edge.WARPS, "enable_fp_fusion": True}

# (name, kernel, argument types, constexpr values, compile options): the launches of the code
KERNELS = [
    ("fps 4096 points", point._fps_kernel,
     {"xyz_ptr": F32, "out_ptr": I64, "n": I32, "m": I32, "stride_b": I32, "min_norm2": "fp32"},
     {"BLOCK_N": 4096}, {"num_warps": 8, **EXACT}),
    ("ball query, 3 radii", point._ball_query_kernel,
     {"xyz_ptr": F32, "centres_ptr": F32, "out0_ptr": I64, "out1_ptr": I64, "out2_ptr": I64, "n": I32, "m": I32}
     | dict.fromkeys(("r2_0", "r2_1", "r2_2"), "fp32") | dict.fromkeys(("ns0", "ns1", "ns2"), I32),
     {"NUM_RADII": 3, "BLOCK_M": point.BALL_BLOCK_M, "BLOCK_N": point.BALL_BLOCK_N, "BLOCK_S": 32}, EXACT),
    ("pool_edges k=20, statistics", edge._pool_kernel, POOL,
     {"HAS_SIGN": True, "STATS": True, **EDGE_TILES, "BLOCK_K": 32}, FAST),
    ("pool_edges k=9, no statistics", edge._pool_kernel, POOL,
     {"HAS_SIGN": False, "STATS": False, **EDGE_TILES, "BLOCK_K": 16}, FAST),
    ("merge statistics", edge._merge_kernel,
     {"part_ptr": F32, "mu_ptr": F32, "var_ptr": F32, "C": I32, "n_parts": I32},
     {"BLOCK_C": edge.BLOCK_C, "BLOCK_P": edge.BLOCK_P}, {"enable_fp_fusion": True}),
    ("scatter_edges k=20, spread and statistics", edge._scatter_kernel, SCATTER,
     {"HAS_SPREAD": True, "HAS_LAM": True, **EDGE_TILES, "BLOCK_K": 32}, FAST),
    ("scatter_edges k=9, winners only", edge._scatter_kernel, SCATTER,
     {"HAS_SPREAD": False, "HAS_LAM": False, **EDGE_TILES, "BLOCK_K": 16}, FAST),
]  # fmt: skip


def compile_kernel(kernel, types: dict[str, str], constants: dict[str, object], options: dict) -> object:
    names = kernel.arg_names
    unknown = (set(types) | set(constants)) - set(names)
    if unknown or len(types) + len(constants) != len(names):
        raise SystemExit(f"{kernel.__name__}: arguments {names}, described {sorted({*types, *constants})}")
    signature = {name: types.get(name, "constexpr") for name in names}
    source = ASTSource(kernel, signature, {(names.index(k),): v for k, v in constants.items()})
    return triton.compile(source, target=TARGET, options=options)


def main() -> None:
    for name, kernel, types, constants, options in KERNELS:
        compiled = compile_kernel(kernel, types, constants, options)
        print(f"compiled {name}: {len(compiled.asm['cubin'])} bytes of sm_{TARGET.arch} code")


if __name__ == "__main__":
    main()
