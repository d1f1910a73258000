"""Compile a Triton kernel for a GPU architecture without a GPU and count the instructions of its loops.

Usage:
    python scripts/sass_loop.py quantkit.kernels.w4a16_moe _moe_mma --divisible stride_am,stride_be,stride_bn \\
        --constexprs '{"K": 3072, "GROUP": 128, "A_ROW_DIV": 8, "GATED": true, "MUL_ROUTED_WEIGHT": false,
                       "BLOCK_M": 16, "BLOCK_N": 64, "MAGIC": 17152, "UPCAST": false, "OUT_MANT": 0}' \\
        --types '{"a_ptr": "*bf16", "b_ptr": "*i32", "z_ptr": "*u8", "s_ptr": "*bf16", "c_ptr": "*bf16",
                  "topk_weights_ptr": "*fp32", "sorted_token_ids_ptr": "*i32", "expert_ids_ptr": "*i32",
                  "num_tokens_post_padded_ptr": "*i32"}' --num-warps 4 --num-stages 3 --dump /tmp/k

Arguments not named in --constexprs or --types are taken as i32; name every constexpr the launcher passes (a
signature's defaults are filled in for those left out). Prints, for each loop of the SASS (a backward
branch and its target), the number of instructions and the opcodes by count: divide by the weights a thread
handles per iteration for instructions per weight. --dump PREFIX writes PREFIX.ttgir, .ptx and .sass. The kernel
module must be imported for a GPU (TRITON_INTERPRET unset); ptxas and nvdisasm come with the triton wheel.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import json
import re
import subprocess
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def loops(sass: str) -> list[tuple[int, collections.Counter]]:
    """(instruction count, opcode counts) of each loop body in nvdisasm -c output."""
    labels, ins = {}, []
    for line in sass.splitlines():
        if m := re.match(r"^\s*(\.L_x_\d+):", line):
            labels[m.group(1)] = len(ins)
        elif m := re.match(r"^\s*/\*[0-9a-f]+\*/\s+(.*?);", line):
            ins.append(m.group(1))
    out = []
    for i, text in enumerate(ins):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", text)
        if m and labels.get(m.group(1), len(ins)) <= i:
            body = ins[labels[m.group(1)]:i + 1]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
            out.append((len(body), ops))
    return out


def compile_for(fn, consts: dict, types: dict, divisible: set[str] = frozenset(), arch: int = 90, num_warps: int = 4,
                num_stages: int = 3):
    """triton.compile of a JIT function for cuda sm_<arch> with the given constexprs and argument types (others
    i32), the named integers and every pointer specialized as divisible by 16; no GPU needed."""
    if not isinstance(fn, triton.runtime.JITFunction):
        raise SystemExit(f"{fn} is not a compiled-mode Triton kernel (is TRITON_INTERPRET set?)")
    # constexprs left out take their signature defaults, as a launch would (left out of the signature, they would
    # be compiled as i32 arguments)
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.default is not inspect.Parameter.empty},
              **consts}
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    divisible = set(divisible) | {n for n, t in signature.items() if t.startswith("*")}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    source = ASTSource
    if getattr(fn, "is_gluon", lambda: False)():  # a Gluon kernel: its own front end (layouts given, not inferred)
        from triton.experimental.gluon._runtime import GluonASTSource as source
    src = source(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps,
                                                                                 num_stages=num_stages))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("module")
    ap.add_argument("kernel", help="the module's JIT function")
    ap.add_argument("--constexprs", default="{}", help="JSON: constexpr argument values")
    ap.add_argument("--types", default="{}", help="JSON: argument types (*bf16, *i32, fp32, ...); default i32")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--num-stages", type=int, default=3)
    ap.add_argument("--dump", help="path prefix for the .ttgir, .ptx and .sass files")
    ap.add_argument("--divisible", default="", help="comma-separated integer arguments the launch will see as "
                    "multiples of 16 (strides, sizes): the JIT specializes them so, and vectorizes loads on it; "
                    "pointers are taken as 16-byte aligned, as torch allocates them")
    args = ap.parse_args()
    fn = getattr(importlib.import_module(args.module), args.kernel)
    compiled = compile_for(fn, json.loads(args.constexprs), json.loads(args.types),
                           {n for n in args.divisible.split(",") if n}, args.arch, args.num_warps, args.num_stages)
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    cubin = Path(args.dump + ".cubin" if args.dump else "/tmp/sass_loop.cubin")
    cubin.write_bytes(compiled.asm["cubin"])
    sass = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    if args.dump:
        for ext in ("ttgir", "ptx"):
            Path(f"{args.dump}.{ext}").write_text(compiled.asm[ext])
        Path(f"{args.dump}.sass").write_text(sass)
    print(f"{args.kernel}, sm_{args.arch}, triton {triton.__version__}, shared memory {compiled.metadata.shared} B")
    for n, ops in loops(sass):
        print(f"loop of {n} instructions: " + ", ".join(f"{k} {v}" for k, v in ops.most_common(20)))


if __name__ == "__main__":
    main()
