"""What the Triton kernels compile to on NVIDIA GPUs, measured on any machine (no GPU needed).

    python bench/kernel_report.py                          # sm_90a and sm_80, the full matrix
    python bench/kernel_report.py --arch sm_90a --bits 4 --layout 1x128 --json rows.json

Every kernel × every shipped autotune config × bits × block layout × activation dtype is compiled
ahead of time with `triton.compile` for the target architecture, once per distinct specialization a
real call has at the memory table's LLaMA shapes (7B, 13B, 70B, 405B: every projection, M sampled in
each autotune bucket): the dispatch's own arguments and constexprs (taken from `lowbit_ft.kernels` on
meta tensors), specialized by Triton's own launcher (16-divisibility of pointers, N, K, strides), plus
each call's twin with no alignment on blocks per row (BLOCK_ALIGN = 1: any width outside the table).
Each compile is a row:

    row_align / block_align   the ROW_ALIGN / BLOCK_ALIGN constexprs compiled (the layer shape `shape`
                   first gave them; "any" for the twin without block alignment)
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
import functools
import inspect
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple
from unittest import mock

if __name__ == "__main__":  # compile for real, not for the interpreter (tests import the pure helpers only)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from lowbit_ft.kernels import triton_qmatmul as tq  # noqa: E402
from lowbit_ft.kernels import triton_supports  # noqa: E402

ARCHS = {"sm_80": 80, "sm_90a": 90}
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}  # max dynamic shared memory per block
ALL_BITS = (2, 3, 4, 8)
ALL_LAYOUTS = ((1, 32), (1, 64), (1, 128), (8, 4))
ALL_DTYPES = ("bf16", "fp16")
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
GEMM_KERNELS = ("qmatmul", "qmatmul_t")
# hidden, intermediate, key/value width (heads × head dim): the models of bench/memory_table.py (the tests check
# that the layer shapes agree), and SmolLM2 on request
MODELS = {"LLaMA-7B": (4096, 11008, 4096), "LLaMA-13B": (5120, 13824, 5120), "LLaMA-70B": (8192, 28672, 1024),
          "LLaMA-405B": (16384, 53248, 1024), "SmolLM2-135M": (576, 1536, 192)}
TABLE_MODELS = ("LLaMA-7B", "LLaMA-13B", "LLaMA-70B", "LLaMA-405B")
NO_BLOCK_ALIGN = "any"  # the `shape` of a call's twin compiled without alignment on blocks per row


@dataclass(frozen=True)
class Row:
    kernel: str
    arch: str
    bits: int
    block_out: int
    block_in: int
    dtype: str
    config: str
    row_align: int
    block_align: int
    shape: str
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


def layer_shapes(models=TABLE_MODELS) -> list[tuple[int, int]]:
    """(out, in) of every quantized projection of these models: q/o, k/v, gate/up, down."""
    shapes = set()
    for name in models:
        hidden, inter, kv = MODELS[name]
        shapes |= {(hidden, hidden), (kv, hidden), (inter, hidden), (hidden, inter)}
    return sorted(shapes)


def sample_m(kernel: str, bucket: str) -> tuple[int, ...]:
    """Token counts at both ends of an autotune bucket (the grad-input kernel also takes M = 1)."""
    if kernel == "qgemv":
        return (1,)
    low = {"small": 1 if kernel == "qmatmul_t" else 2, "medium": 17, "large": 129}[bucket]
    high = {"small": 16, "medium": 128, "large": 4096}[bucket]
    assert tq.m_bucket(low) == tq.m_bucket(high) == bucket
    return low, high


@functools.cache
def dispatch_call(kernel: str, m: int, out_f: int, in_f: int, bits: int, layout: tuple[int, int],
                  dtype: str) -> tuple[tuple, dict]:
    """The runtime arguments and constexprs `lowbit_ft.kernels` passes to `kernel` for this call on a CUDA
    tensor, taken from the dispatch itself on meta tensors (shapes only: no data, no GPU)."""
    meta = "meta"  # QuantLinear's storage: int32 codes, float16 scales, float32 zeros
    w = SimpleNamespace(bits=bits, block_out=layout[0], block_in=layout[1],
                        qweight=torch.empty(out_f, in_f * bits // 32, dtype=torch.int32, device=meta),
                        scales=torch.empty(out_f // layout[0], in_f // layout[1], dtype=torch.float16, device=meta),
                        zeros=torch.empty(out_f // layout[0], in_f // layout[1], dtype=torch.float32, device=meta))
    a = torch.empty(m, out_f if kernel == "qmatmul_t" else in_f, dtype=TORCH_DTYPES[dtype], device=meta)
    launches = []
    with mock.patch.object(tq, "INTERPRET", False), \
            mock.patch.object(tq, "_launch", lambda tuned, name, grid, args, meta, config: launches.append(
                (name, args, meta))):
        (tq.qmatmul_t if kernel == "qmatmul_t" else tq.qmatmul)(a, w)
    [(name, args, meta)] = launches
    assert name == kernel, (name, kernel)
    return args, meta


def param_names(kernel: str) -> list[str]:
    """The kernel's parameters in order (runtime arguments first), compiled or under the interpreter."""
    return list(inspect.signature(KERNELS[kernel][0].fn).parameters)


def without_block_align(kernel: str, args: tuple, meta: dict) -> tuple[tuple, dict]:
    """The same call with blocks per row passed whole and BLOCK_ALIGN = 1: no alignment assumed."""
    args = list(args)
    args[param_names(kernel).index("block_units")] *= meta["BLOCK_ALIGN"]
    return tuple(args), {**meta, "BLOCK_ALIGN": 1}


@functools.cache
def _launcher(kernel: str, arch: str):
    """The kernel, the arch's backend, and Triton's own argument binder (what a launch runs to specialize)."""
    fn = KERNELS[kernel][0]
    backend = make_backend(GPUTarget("cuda", ARCHS[arch], 32))
    return fn, backend, create_function_from_signature(fn.signature, fn.params, backend)


def specialize(kernel: str, arch: str, args: tuple, meta: dict, cfg: triton.Config) -> tuple:
    """(signature, constexprs, attrs, options) exactly as Triton's launcher derives them for this call."""
    fn, backend, binder = _launcher(kernel, arch)
    kwargs = {**meta, **cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "debug": False}
    bound, specialization, options = binder(*args, **kwargs)
    # JITFunction.run's own next step (a private method: a triton that renames it fails here, loudly)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


class Call(NamedTuple):
    """One call that reaches a kernel config: a layer shape, M, and whether block alignment is dropped."""
    out_f: int
    in_f: int
    m: int
    no_block_align: bool

    def arguments(self, kernel: str, bits: int, layout: tuple[int, int], dtype: str) -> tuple[tuple, dict]:
        args, meta = dispatch_call(kernel, self.m, self.out_f, self.in_f, bits, tuple(layout), dtype)
        return without_block_align(kernel, args, meta) if self.no_block_align else (args, meta)


@functools.cache
def calls(kernel: str, bucket: str, bits: int, layout: tuple[int, int], dtype: str, arch: str,
          models=TABLE_MODELS) -> list[Call]:
    """One call per distinct specialization (runtime hints and constexprs) the models' layers give this
    kernel bucket, and the twin of each without block alignment. Compiling one config for two calls of
    the same specialization would compile the same kernel twice."""
    cfg = KERNELS[kernel][1][bucket][0]  # the config adds constexprs only: it does not change the hints
    seen, out = set(), []
    for out_f, in_f in layer_shapes(models):
        if in_f % layout[1] or out_f % layout[0] or not triton_supports(
                SimpleNamespace(qweight=torch.empty(0, in_f * bits // 32), bits=bits, block_in=layout[1])):
            continue  # a layer this layout cannot quantize, or one the dispatch sends to the torch reference
        for m in sample_m(kernel, bucket):
            for drop in (False, True):
                call = Call(out_f, in_f, m, drop)
                signature, constexprs, attrs, _ = specialize(kernel, arch, *call.arguments(kernel, bits, layout,
                                                                                           dtype), cfg)
                key = repr((signature, sorted(constexprs.items()), sorted(attrs.items())))
                if key not in seen:
                    seen.add(key)
                    out.append(call)
    return out


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


class Job(NamedTuple):
    """One compile: a kernel config (by bucket and index in its table) for one call's specialization."""
    kernel: str
    bucket: str
    index: int
    bits: int
    layout: tuple[int, int]
    dtype: str
    arch: str
    call: Call
    sass: bool = True


def compile_job(job: Job) -> Row:
    """Compile one kernel variant for its arch and read its static properties. `sass=False` skips the
    disassembler (about a third of the time) and reads the tensor-core instructions off the PTX."""
    fn, table = KERNELS[job.kernel]
    cfg = table[job.bucket][job.index]
    args, meta = job.call.arguments(job.kernel, job.bits, job.layout, job.dtype)
    signature, constexprs, attrs, options = specialize(job.kernel, job.arch, args, meta, cfg)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                              target=GPUTarget("cuda", ARCHS[job.arch], 32), options=options.__dict__)
    text = _ptxas_log(compiled.asm["ptx"], job.arch)
    registers = int(re.findall(r"Used (\d+) registers", text)[-1])
    spills = int(re.findall(r"(\d+) bytes spill stores", text)[-1])
    # the PTX numbers the runtime arguments that stayed arguments (Triton turns those equal to 1 into constants)
    qw_index = [name for name, ty in signature.items() if ty != "constexpr"].index("qw_ptr")
    widths = packed_word_loads(compiled.asm["ptx"], qw_index)
    if job.sass:
        sass_ldg, mma = _sass_counts(compiled.asm["cubin"])
    else:
        sass_ldg, mma = Counter(), ptx_mma_counts(compiled.asm["ptx"])
    shape = NO_BLOCK_ALIGN if job.call.no_block_align else f"{job.call.out_f}x{job.call.in_f}"
    return Row(job.kernel, job.arch, job.bits, job.layout[0], job.layout[1], job.dtype, describe(cfg),
               meta["ROW_ALIGN"], meta["BLOCK_ALIGN"], shape, registers, spills, compiled.metadata.shared,
               {str(k): v for k, v in sorted(widths.items())}, dict(sorted(sass_ldg.items())),
               dict(sorted(mma.items())))


def jobs(archs, bits, layouts, dtypes, kernels=None, sass=True, models=TABLE_MODELS) -> list[Job]:
    """Every (config, bits, layout, dtype, arch, specialization) to compile: the configs as pruned for each
    bits, the specializations the models' calls give each config's bucket."""
    out = []
    for a in archs:
        for b in bits:
            for name, bucket, i in kernel_configs(b):
                if kernels and name not in kernels:
                    continue
                for lay in layouts:
                    for d in dtypes:
                        out += [Job(name, bucket, i, b, tuple(lay), d, a, call, sass)
                                for call in calls(name, bucket, b, tuple(lay), d, a, tuple(models))]
    return out


def run(job_list: list[Job], processes: int | None = None, progress: bool = False) -> list[Row]:
    """Compile every job, in parallel processes (forked: the kernels module is imported once)."""
    processes = processes or os.cpu_count() or 1
    rows = []
    with multiprocessing.get_context("fork").Pool(processes) if processes > 1 else nullcontext() as pool:
        for i, row in enumerate(pool.imap(compile_job, job_list, chunksize=2) if pool else map(compile_job, job_list)):
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
    head = ("| kernel | arch | bits | layout | dtype | config | align rows/blocks | first shape | regs | spill B | "
            "shared KiB | packed-word loads (bits: count) | tensor-core ops | ok |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        loads = " ".join(f"{w}:{n}" for w, n in r.ldg_widths.items()) or "-"
        mma = " ".join(f"{k} {v}" for k, v in r.tensor_core_ops.items()) or "none"
        problems = violations(r)
        lines.append(f"| {r.kernel} | {r.arch} | {r.bits} | {r.block_out}×{r.block_in} | {r.dtype} | {r.config} | "
                      f"{r.row_align}/{r.block_align} | {r.shape} | {r.registers} | {r.spill_bytes} | "
                      f"{r.shared_bytes / 1024:.0f} | {loads} | {mma} | "
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
    parser.add_argument("--models", nargs="+", default=list(TABLE_MODELS), choices=list(MODELS),
                        help="compile the specializations of these models' layer shapes (default: the memory table's)")
    parser.add_argument("--no-sass", dest="sass", action="store_false",
                        help="skip the disassembler (faster; tensor-core ops from the PTX, no sass_ldg column)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--processes", type=int, default=None, help="parallel compiles (default: CPU count)")
    args = parser.parse_args(argv)
    layouts = [tuple(int(v) for v in s.lower().split("x")) for s in args.layout]
    job_list = jobs(args.arch, args.bits, layouts, args.dtype, args.kernel, args.sass, args.models)
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
