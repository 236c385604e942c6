"""What the Triton kernels compile to on NVIDIA GPUs, measured on any machine (no GPU needed).

    python bench/kernel_report.py                          # sm_90a and sm_80, the full matrix
    python bench/kernel_report.py --arch sm_90a --bits 4 --layout 1x128 --json rows.json

Every kernel × every shipped autotune config × bits × block layout × activation dtype is compiled
ahead of time with `triton.compile` for the target architecture, with the 16-divisibility hints a real
call on LLaMA shapes has (pointers, N, K, strides, blocks per row; not M, nor the row length in
words, which a SmolLM2-sized row does not have: rows are 4-word aligned, as at every LLaMA-7B and
SmolLM2 width, and the kernels are told so by a constexpr). Per row:

    registers      per thread (ptxas -v)
    spill_bytes    spill stores (ptxas -v); anything above 0 goes through local memory
    shared_bytes   shared memory the launch needs (pipeline buffers + layout conversions)
    ldg_widths     global loads of *packed words* by width in bits ({"128": n, "64": n, "32": n}); the
                   loads are attributed to the `qw_ptr` argument by tracing each load's address back
                   through the PTX, and cp.async copies count by their copy size
    sass_ldg       every global load in the SASS by width (LDG.E.128 / LDGSTS.E.BYPASS.128 → "128", …)
    tensor_core_ops HMMA / HGMMA instructions in the SASS (with --no-sass: mma.sync / wgmma in the PTX,
                   which ptxas turns into exactly those, one to one; the tests check that it does)

Deterministic: the same triton and ptxas give the same table. tests/test_kernel_static.py asserts a
subset of it in CI (0 spills, shared memory within the limit, packed words read ≥ 64 bits at a time,
tensor cores in the GEMMs).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

if __name__ == "__main__":  # compile for real, not for the interpreter (tests import the pure helpers only)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lowbit_ft.kernels import triton_qmatmul as tq  # noqa: E402

ARCHS = {"sm_80": 80, "sm_90a": 90}
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}  # max dynamic shared memory per block
ALL_BITS = (2, 3, 4, 8)
ALL_LAYOUTS = ((1, 32), (1, 64), (1, 128), (8, 4))
ALL_DTYPES = ("bf16", "fp16")
GEMM_KERNELS = ("qmatmul", "qmatmul_t")
_WEIGHT_PTRS = {"qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp32"}  # QuantLinear's storage dtypes
# M is arbitrary, and a row's length in words need not be a multiple of 16 (SmolLM2 at INT4: 72 words), so it
# gets no hint: rows pass as (words / ROW_ALIGN) with ROW_ALIGN = 4, the alignment of LLaMA-7B and SmolLM2
# rows at every bit width. Blocks per row keep the hint (LLaMA-7B's, and SmolLM2's at (8, 4) blocks).
_NO_HINT = {"M", "M_BUCKET", "row_units"}
ROW_ALIGN = 4


@dataclass(frozen=True)
class Row:
    kernel: str
    arch: str
    bits: int
    block_out: int
    block_in: int
    dtype: str
    config: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    ldg_widths: dict
    sass_ldg: dict
    tensor_core_ops: dict


KERNELS = {  # name → (jit function, its config table); "qgemv"'s buckets are code widths, the GEMMs' are M
    "qmatmul": (tq._qmatmul_kernel, tq.GEMM_CONFIGS),
    "qmatmul_t": (tq._qmatmul_t_kernel, tq.GEMM_T_CONFIGS),
    "qgemv": (tq._qgemv_kernel, tq.GEMV_CONFIGS),
}


def kernel_configs(bits: int) -> list[tuple[str, str, int]]:
    """(kernel, bucket, index in bucket) of every config the autotuner may run at this code width."""
    out = []
    for name, (_, table) in KERNELS.items():
        for bucket, configs in table.items():
            if name == "qgemv" and bucket != tq.gemv_bucket(bits):
                continue
            out += [(name, bucket, i) for i in range(len(configs))]
    return out


def describe(cfg: triton.Config) -> str:
    meta = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in cfg.kwargs.items())
    return f"{meta} w{cfg.num_warps} s{cfg.num_stages}"


def _signature(fn, dtype: str, constexprs: dict) -> tuple[dict, dict, dict]:
    signature, attrs, constants = {}, {}, {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            constants[(index,)] = constexprs[name]
            continue
        signature[name] = _WEIGHT_PTRS.get(name, f"*{dtype}") if name.endswith("_ptr") else "i32"
        if name not in _NO_HINT:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs, constants


_REG = re.compile(r"%[a-z]+\d+")


def packed_word_loads(ptx: str, qw_index: int) -> Counter:
    """Global loads (and cp.async copies) whose address derives from argument `qw_index`, by width in bits."""
    defs: dict[str, set[str]] = {}
    params: dict[str, int] = {}
    loads: list[tuple[str, int]] = []
    for line in ptx.splitlines():
        line = line.strip()
        if not line or line.startswith(("//", ".", "{", "}")) or line.endswith(":"):
            continue
        body = re.sub(r"^@!?%p\d+\s+", "", line).rstrip(";")
        opcode, _, operands = body.partition(" ")
        if opcode.startswith("ld.param"):
            match = re.search(r"(%rd\d+), \[(\w+_param_(\d+))\]", body)
            if match:
                params.setdefault(match.group(1), int(match.group(3)))
            continue
        if opcode.startswith("ld.global"):
            lanes = re.search(r"\.v(\d)", opcode)
            element = int(re.findall(r"\.[bsuf](\d+)", opcode)[-1])
            width = element * (int(lanes.group(1)) if lanes else 1)
            loads.append((re.search(r"\[\s*(%rd\d+)", operands).group(1), width))
            continue
        if opcode.startswith("cp.async") and ".global" in opcode:
            brackets = re.findall(r"\[\s*(%r\w+)", operands)
            size = int(operands.split("],")[-1].split(",")[0].strip(), 0)
            loads.append((brackets[1], 8 * size))
            continue
        if opcode.startswith(("st.", "setp", "bra", "bar")):
            continue
        # destinations: the first operand, or every register of a leading {…} list (mov.b64 {%r1, %r2}, %rd3)
        if operands.startswith("{"):
            dests, _, sources = operands[1:].partition("}")
            dests, sources = _REG.findall(dests), _REG.findall(sources)
        else:
            regs = _REG.findall(operands)
            dests, sources = regs[:1], regs[1:]
        for dest in dests:
            defs.setdefault(dest, set()).update(sources)

    def roots(reg: str) -> set[int]:
        seen, stack, found = set(), [reg], set()
        while stack:
            r = stack.pop()
            if r in seen:
                continue
            seen.add(r)
            if r in params:
                found.add(params[r])
            stack.extend(defs.get(r, ()))
        return found

    return Counter(width for reg, width in loads if qw_index in roots(reg))


def _sass_counts(cubin: bytes) -> tuple[Counter, Counter]:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    loads, mma = Counter(), Counter()
    for op in re.findall(r"\b(LDGSTS|LDG)((?:\.[A-Z0-9_]+)*)", sass):
        widths = [w for w in re.findall(r"\.(\d+)", op[1]) if w in ("64", "128")]
        loads[widths[0] if widths else "32"] += 1
    for op in re.findall(r"\b(HGMMA|HMMA)\.", sass):
        mma[op] += 1
    return loads, mma


def _ptxas_log(ptx: str, arch: str) -> str:
    """`ptxas -v` on the PTX, with the ptxas and flags triton itself uses (its cache may skip its own run)."""
    ptxas = get_ptxas(ARCHS[arch]).path
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(source),
                               "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def ptx_mma_counts(ptx: str) -> Counter:
    """Tensor-core instructions in the PTX, named as the SASS names what each becomes (one to one)."""
    return Counter({"HMMA": len(re.findall(r"\bmma\.sync\.", ptx)),
                    "HGMMA": len(re.findall(r"\bwgmma\.mma_async\.", ptx))}) + Counter()  # drops zeros


def compile_row(kernel: str, fn, cfg: triton.Config, bits: int, layout: tuple[int, int], dtype: str,
                arch: str, sass: bool = True) -> Row:
    """Compile one kernel variant for `arch` and read its static properties. `sass=False` skips the
    disassembler (about a third of the time) and reads the tensor-core instructions off the PTX."""
    constexprs = {"BITS": bits, "BO": layout[0], "BI": layout[1], "ROW_ALIGN": ROW_ALIGN, "F32_DOT": False,
                  **cfg.kwargs}
    signature, attrs, constants = _signature(fn, dtype, constexprs)
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", ARCHS[arch], 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    text = _ptxas_log(compiled.asm["ptx"], arch)
    registers = int(re.findall(r"Used (\d+) registers", text)[-1])
    spills = int(re.findall(r"(\d+) bytes spill stores", text)[-1])
    qw_index = [p.name for p in fn.params if not p.is_constexpr].index("qw_ptr")  # PTX numbers runtime args
    widths = packed_word_loads(compiled.asm["ptx"], qw_index)
    sass_ldg, mma = _sass_counts(compiled.asm["cubin"]) if sass else (Counter(), ptx_mma_counts(compiled.asm["ptx"]))
    return Row(kernel, arch, bits, layout[0], layout[1], dtype, describe(cfg), registers, spills,
               compiled.metadata.shared, {str(k): v for k, v in sorted(widths.items())}, dict(sorted(sass_ldg.items())),
               dict(sorted(mma.items())))


def compile_job(job: tuple) -> Row:
    """Compile one entry of `jobs(...)`."""
    kernel, bucket, index, bits, layout, dtype, arch, sass = job
    fn, table = KERNELS[kernel]
    return compile_row(kernel, fn, table[bucket][index], bits, layout, dtype, arch, sass)


def jobs(archs, bits, layouts, dtypes, kernels=None, sass=True) -> list[tuple]:
    """Every (config, bits, layout, dtype, arch) to compile, the configs as pruned for each bits."""
    return [(name, bucket, i, b, tuple(lay), d, a, sass) for a in archs for b in bits
            for name, bucket, i in kernel_configs(b) if not kernels or name in kernels
            for lay in layouts for d in dtypes]


def run(job_list: list[tuple], processes: int | None = None, progress: bool = False) -> list[Row]:
    """Compile every job, in parallel processes (forked: the kernels module is imported once)."""
    processes = processes or os.cpu_count() or 1
    if processes == 1:
        return [compile_job(j) for j in job_list]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        rows = []
        for i, row in enumerate(pool.imap(compile_job, job_list, chunksize=2)):
            rows.append(row)
            if progress and (i + 1) % 20 == 0:
                print(f"  compiled {i + 1}/{len(job_list)}", file=sys.stderr, flush=True)
        return rows


def violations(row: Row) -> list[str]:
    """What is wrong with a row, by the targets of bench/RESULTS.md; empty when it passes."""
    problems = []
    if row.spill_bytes:
        problems.append(f"{row.spill_bytes} bytes spilled")
    if row.shared_bytes > SHARED_LIMIT[row.arch]:
        problems.append(f"{row.shared_bytes} B shared > {SHARED_LIMIT[row.arch]} B")
    narrow = sum(n for width, n in row.ldg_widths.items() if int(width) < 64)
    if narrow or not row.ldg_widths:
        problems.append(f"packed words read {row.ldg_widths or 'by no load found'} (want >= 64-bit loads)")
    if row.kernel in GEMM_KERNELS and not row.tensor_core_ops:
        problems.append("no tensor-core instruction")
    return problems


def table(rows: list[Row]) -> str:
    head = ("| kernel | arch | bits | layout | dtype | config | regs | spill B | shared KiB | packed-word loads "
            "(bits: count) | tensor-core ops | ok |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        loads = " ".join(f"{w}:{n}" for w, n in r.ldg_widths.items()) or "-"
        mma = " ".join(f"{k} {v}" for k, v in r.tensor_core_ops.items()) or "none"
        problems = violations(r)
        lines.append(f"| {r.kernel} | {r.arch} | {r.bits} | {r.block_out}×{r.block_in} | {r.dtype} | {r.config} | "
                      f"{r.registers} | {r.spill_bytes} | {r.shared_bytes / 1024:.0f} | {loads} | {mma} | "
                      f"{'yes' if not problems else '; '.join(problems)} |")
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    """One line per kernel × arch × bits: the worst case over configs, layouts and dtypes."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.kernel, r.arch, r.bits), []).append(r)
    head = ("| kernel | arch | bits | variants | max regs | max spill B | max shared KiB | packed-word loads "
            "| tensor-core ops | variants failing |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (kernel, arch, bits), group in groups.items():
        widths = sorted({int(w) for r in group for w in r.ldg_widths}, reverse=True)
        mma = sorted({k for r in group for k in r.tensor_core_ops}) or ["none"]
        lines.append(f"| {kernel} | {arch} | {bits} | {len(group)} | {max(r.registers for r in group)} | "
                     f"{max(r.spill_bytes for r in group)} | {max(r.shared_bytes for r in group) / 1024:.0f} | "
                     f"{', '.join(f'{w}-bit' for w in widths) or '-'} | {', '.join(mma)} | "
                     f"{sum(1 for r in group if violations(r))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS), help="target architectures")
    parser.add_argument("--bits", nargs="+", type=int, default=list(ALL_BITS), help="code widths")
    parser.add_argument("--layout", nargs="+", default=[f"{o}x{i}" for o, i in ALL_LAYOUTS],
                        help="block layouts as OUTxIN (1x64 = GPTQ g64, 8x4 = QA-HiRA)")
    parser.add_argument("--dtype", nargs="+", default=list(ALL_DTYPES), choices=list(ALL_DTYPES),
                        help="activation dtypes")
    parser.add_argument("--kernel", nargs="+", choices=["qmatmul", "qmatmul_t", "qgemv"], help="only these kernels")
    parser.add_argument("--no-sass", dest="sass", action="store_false",
                        help="skip the disassembler (faster; tensor-core ops from the PTX, no sass_ldg column)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--processes", type=int, default=None, help="parallel compiles (default: CPU count)")
    args = parser.parse_args(argv)
    layouts = [tuple(int(v) for v in s.lower().split("x")) for s in args.layout]
    job_list = jobs(args.arch, args.bits, layouts, args.dtype, args.kernel, args.sass)
    print(f"triton {triton.__version__}: compiling {len(job_list)} kernel variants ...", file=sys.stderr, flush=True)
    rows = run(job_list, args.processes, progress=True)
    print(table(rows))
    print("\nWorst case per kernel, architecture and code width:\n")
    print(summary(rows))
    bad = [r for r in rows if violations(r)]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} variants meet every static target.")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
