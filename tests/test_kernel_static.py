"""The Triton kernels as an H100 / A100 would run them, checked on this CPU machine: every shipped autotune
config × bits {2, 3, 4, 8} × layouts (1, 64) and (8, 4), bf16, compiled ahead of time for sm_80 and sm_90a
(bench/kernel_report.py; the full matrix runs there), once for each specialization real calls at the
memory table's LLaMA shapes (7B to 405B) have, and once with no alignment on blocks per row.
Static properties are deterministic for a given triton + ptxas, so they are asserted exactly: no spilled
byte, shared memory within the architecture's limit, packed words read 64 or 128 bits at a time,
tensor-core instructions in both GEMMs. To stay near 3.5 minutes on one core the matrix skips the disassembler
and reads the tensor-core instructions off the PTX; a separate test checks those equal the SASS's."""

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lowbit_ft.kernels import triton_qmatmul as tq

BENCH = Path(__file__).parent.parent / "bench"


def load_bench(name: str):
    """A bench/ script as a module, for its pure helpers (compiling needs TRITON_INTERPRET unset: a
    subprocess does that)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module



@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel-report") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for the GPU, not the interpreter
    done = subprocess.run([sys.executable, str(BENCH / "kernel_report.py"), "--arch", "sm_80", "sm_90a", "--dtype",
                           "bf16", "--layout", "1x64", "8x4", "--no-sass", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert out.exists(), done.stderr[-3000:]
    return done, json.loads(out.read_text())


# BLOCK_ALIGN per layout and kernel bucket at the memory table's widths, and 1 for any other width: a g64 GEMM
# tile (BLOCK_K = 64) holds one block per row, so no alignment is passed; the GEMV's 128/256-wide tiles hold
# 2/4 (every LLaMA width has 4 | blocks per row); (8, 4) rows of 1024 to 13312 blocks are 16-aligned.
EXPECTED_BLOCK_ALIGNS = {(1, 64): {"qmatmul": {1}, "qmatmul_t": {1}, "2/4/8-bit": {4, 1}, "3-bit": {2, 1}},
                         (8, 4): {"qmatmul": {16, 1}, "qmatmul_t": {16, 1}, "2/4/8-bit": {16, 1}, "3-bit": {16, 1}}}


def test_every_shipped_config_compiles_without_spills_within_shared_memory_with_wide_loads(rows):
    done, table = rows
    report = load_bench("kernel_report")
    compiled = Counter((r["kernel"], r["config"], r["arch"], r["bits"], (r["block_out"], r["block_in"]), r["row_align"],
                        r["block_align"]) for r in table)
    expected = Counter()  # a config listed in two buckets (the grad-input's 64 × 64) is compiled for each
    for bits in (2, 3, 4, 8):
        for kernel, bucket, index in report.kernel_configs(bits):
            config = report.describe(report.KERNELS[kernel][1][bucket][index])
            for layout, aligns in EXPECTED_BLOCK_ALIGNS.items():
                for align in aligns[tq.gemv_bucket(bits) if kernel == "qgemv" else kernel]:
                    for arch in ("sm_80", "sm_90a"):  # rows of every LLaMA width are 4-word aligned
                        expected[(kernel, config, arch, bits, layout, 4, align)] += 1
    assert compiled == expected  # every alignment the table's shapes give, and 1; no specialization twice
    failing = [f"{r['kernel']} {r['arch']} INT{r['bits']} {r['block_out']}x{r['block_in']} {r['config']} "
               f"BLOCK_ALIGN={r['block_align']}: {problems}"
               for r in table if (problems := report.violations(report.Row(**r)))]
    assert not failing, "\n".join(failing[:20])
    n = len(table)
    assert done.returncode == 0 and f"{n} of {n} variants meet every static target" in done.stdout
    # every shipped config, compiled with no alignment on blocks per row: 0 spilled bytes
    unaligned = [r for r in table if r["block_align"] == 1]
    assert len(unaligned) == sum(len(report.kernel_configs(bits)) for bits in (2, 3, 4, 8)) * 2 * 2
    assert all(r["spill_bytes"] == 0 for r in unaligned)


def test_the_gemms_run_on_tensor_cores_and_hopper_gets_its_own_instructions(rows):
    _, table = rows
    for r in table:
        if r["kernel"] != "qgemv":
            assert sum(r["tensor_core_ops"].values()) > 0, r
    # the kernel report reads mma instructions off the SASS; sm_80 has only HMMA
    assert all(set(r["tensor_core_ops"]) <= {"HMMA"} for r in table if r["arch"] == "sm_80")


def test_tensor_core_counts_from_the_ptx_equal_the_sass():
    """The CI run skips the disassembler; the PTX's mma.sync / wgmma must be what the SASS holds."""
    report = load_bench("kernel_report")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = ("import sys, json; sys.path.insert(0, sys.argv[1]); import kernel_report as r; "
              "jobs = r.jobs(['sm_80', 'sm_90a'], [4], [(1, 64)], ['bf16'], ['qmatmul']); "
              "print(json.dumps([[r.compile_job(j._replace(sass=s)).tensor_core_ops for s in (True, False)] "
              "for j in jobs if j.bucket == 'large']))")
    done = subprocess.run([sys.executable, "-c", script, str(BENCH)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    pairs = json.loads(done.stdout.splitlines()[-1])
    assert len(pairs) == 2 * len(tq.GEMM_CONFIGS["large"])
    assert all(sass == ptx and sass for sass, ptx in pairs), pairs
    assert any("HGMMA" in sass for sass, _ in pairs)  # Hopper's warpgroup MMA, not only the Ampere path
    assert report.ptx_mma_counts("mma.sync.aligned.m16n8k16\n wgmma.mma_async.sync") == {"HMMA": 1, "HGMMA": 1}


def test_load_tracing_follows_addresses_to_their_argument():
    """A hand-written PTX fragment: a 128-bit load through pointer arithmetic on argument 1 and a split
    64-bit register, a 64-bit cp.async from argument 1, a 32-bit load from argument 0 (not packed words)."""
    ptx = """
    ld.param.u64 %rd1, [k_param_0];
    ld.param.u64 %rd2, [k_param_1];
    mul.wide.s32 %rd3, %r1, 4;
    add.s64 %rd4, %rd2, %rd3;
    mov.b64 {%r5, %r6}, %rd4;
    mov.b64 %rd7, {%r5, %r6};
    @%p1 ld.global.v4.b32 { %r10, %r11, %r12, %r13 }, [ %rd7 + 0 ];
    @%p1 ld.global.v2.b64 { %rd20, %rd21 }, [ %rd4 + 0 ];
    cp.async.ca.shared.global [ %r30 + 0 ], [ %rd4 + 0 ], 0x8, %r31;
    @%p2 ld.global.b32 { %r40 }, [ %rd1 + 0 ];
    """
    assert load_bench("kernel_report").packed_word_loads(ptx, 1) == {128: 2, 64: 1}


def test_violations_catches_each_kind_of_fault():
    report = load_bench("kernel_report")
    good = report.Row("qmatmul", "sm_90a", 4, 1, 64, "bf16", "cfg", 4, 1, "4096x4096", 128, 0, 64 * 1024, {"128": 4},
                      {"128": 4}, {"HGMMA": 8})
    assert report.violations(good) == []
    bad = [good.__class__(**{**good.__dict__, **change}) for change in (
        {"spill_bytes": 8}, {"shared_bytes": 228 * 1024}, {"ldg_widths": {"128": 4, "32": 1}}, {"ldg_widths": {}},
        {"tensor_core_ops": {}})]
    assert all(len(report.violations(row)) == 1 for row in bad)
    assert report.violations(good.__class__(**{**good.__dict__, "kernel": "qgemv", "tensor_core_ops": {}})) == []


def test_the_gate_compiles_the_arguments_the_dispatch_passes():
    """The report takes each call's arguments from the dispatch itself (meta tensors, no GPU): LLaMA-7B's
    down_proj (11008 inputs) passes 344 blocks per row at g32 as 172 × BLOCK_ALIGN 2 (a 64-wide GEMM tile
    holds 2 blocks), 86 at g128 to the GEMV as 43 × 2, 2752 at (8, 4) as 172 × 16; its twin without block
    alignment passes 344 × 1."""
    report = load_bench("kernel_report")
    for kernel, m, bits, layout, units, align in (("qmatmul", 16, 3, (1, 32), 172, 2), ("qgemv", 1, 4, (1, 128), 43, 2),
                                                  ("qmatmul_t", 4096, 4, (8, 4), 172, 16)):
        args, meta = report.dispatch_call(kernel, m, 4096, 11008, bits, layout, "bf16")
        block_units = args[report.param_names(kernel).index("block_units")]
        assert (block_units, meta["BLOCK_ALIGN"], meta["ROW_ALIGN"]) == (units, align, 4)
    args, meta = report.Call(4096, 11008, 16, True).arguments("qmatmul", 3, (1, 32), "bf16")
    assert (args[report.param_names("qmatmul").index("block_units")], meta["BLOCK_ALIGN"]) == (344, 1)
    assert {(4096, 11008), (1024, 8192), (53248, 16384)} <= set(report.layer_shapes())


def test_the_gate_compiles_the_shapes_of_the_memory_table():
    table = load_bench("memory_table")
    shapes = {(out_f, in_f) for model in table.MODELS.values() for in_f, out_f in model.linears().values()}
    assert set(load_bench("kernel_report").layer_shapes()) == shapes


def test_autotune_keeps_a_choice_in_every_m_bucket():
    """Pruning configs to pass the static test must not leave a bucket with no choice, nor the GEMMs without
    a large-M tile; 3-bit tiles need whole 64-code runs."""
    for table in (tq.GEMM_CONFIGS, tq.GEMM_T_CONFIGS):
        assert set(table) == {"small", "medium", "large"}
        assert all(len(configs) >= 2 for configs in table.values())
        assert any(c.kwargs["BLOCK_M"] >= 64 for c in table["large"])
        assert all(c.kwargs["BLOCK_M"] == 16 for c in table["small"])
    assert set(tq.GEMV_CONFIGS) == {tq.gemv_bucket(bits) for bits in (2, 3, 4, 8)}
    assert all(len(configs) >= 2 for configs in tq.GEMV_CONFIGS.values())
    every = [c for t in (tq.GEMM_CONFIGS, tq.GEMM_T_CONFIGS, tq.GEMV_CONFIGS) for cs in t.values() for c in cs]
    assert all(c.kwargs["BLOCK_K"] % tq.MIN_BLOCK_K == 0 for c in every)
    assert [tq.m_bucket(m) for m in (2, 16, 17, 128, 129, 4096)] == ["small", "small", "medium", "medium", "large",
                                                                     "large"]
