"""load_quantized never builds a float copy of a quantized weight: peak host memory ≤ the fp16 size."""

import subprocess
import sys
import textwrap

from lowbit_ft import BlockLayout, quantize_model, save_gptq

from .conftest import make_tiny_llama

MEASURE = textwrap.dedent("""
    import sys
    from lowbit_ft import load_quantized

    def status_kb(field):  # VmHWM is this process's own peak; ru_maxrss would inherit pytest's
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    load_quantized(sys.argv[2])  # warm up: imports and code paths, on a tiny checkpoint
    rss_before = status_kb("VmRSS")
    model = load_quantized(sys.argv[1])
    print(status_kb("VmHWM") - rss_before)
""")


def test_peak_memory_while_loading_below_fp16_size(tmp_path):
    # ~77M parameters, 95% of them in quantized linears, so the fp16 size (154 MB) dwarfs the noise
    model = make_tiny_llama(hidden=1024, intermediate=2816, layers=6, heads=8, kv_heads=8, vocab=256)
    fp16_bytes = 2 * sum(p.numel() for p in model.parameters())
    quantize_model(model, BlockLayout.group(4, 128), progress=False)
    save_gptq(model, tmp_path / "big")
    del model
    small = make_tiny_llama()
    quantize_model(small, BlockLayout.group(4, 32), progress=False)
    save_gptq(small, tmp_path / "small")
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "big"), str(tmp_path / "small")],
                         capture_output=True, text=True, check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    # resident growth counts the packed model itself plus the safetensors pages read from disk
    assert growth <= fp16_bytes, f"loading grew RSS by {growth / 1e6:.0f} MB, fp16 size is {fp16_bytes / 1e6:.0f} MB"
