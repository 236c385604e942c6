"""The package's import structure: stages of the data path, imports only downward (or within a stage), no circle.

Every `import` / `from ... import` in the package's source — module level or inside a function — is an arrow;
what it points at must sit on the same stage or a lower one, and the arrows must form no cycle."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: where each part of the package lives (callbacks/ and kernels/ install as lowbit_ft.callbacks / .kernels)
SOURCES = {"lowbit_ft": ROOT / "lowbit_ft", "lowbit_ft.callbacks": ROOT / "callbacks",
           "lowbit_ft.kernels": ROOT / "kernels"}
#: the stages, lowest first: a module may import from its own stage and those before it
STAGES = [
    ("foundation", ["lowbit_ft.kernels", "lowbit_ft.dtypes", "lowbit_ft.checks", "lowbit_ft.fsutil",
                    "lowbit_ft.quiet", "lowbit_ft.progress", "lowbit_ft.records", "lowbit_ft.hostmem",
                    "lowbit_ft.checkout", "lowbit_ft.chat", "lowbit_ft.sources", "lowbit_ft.examples",
                    "lowbit_ft.config_files", "lowbit_ft.families"]),
    ("quantization", ["lowbit_ft.quant"]),
    ("adapters", ["lowbit_ft.adapters"]),
    ("formats", ["lowbit_ft.formats"]),
    ("evaluation", ["lowbit_ft.evaluation"]),
    ("callbacks", ["lowbit_ft.callbacks"]),
    ("training", ["lowbit_ft.train"]),
    ("commands", ["lowbit_ft.commands", "lowbit_ft.cli", "lowbit_ft.__main__", "lowbit_ft"]),
]


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if package == "lowbit_ft" and parts and parts[0] in ("callbacks", "kernels"):
                continue
            found[name] = path
    return found


def stage(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is on no stage: add it to STAGES")
    return best[0]


def arrows(known: dict[str, Path]) -> dict[str, set[str]]:
    """module → the package modules it imports."""
    out = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                if not base.startswith("lowbit_ft"):
                    continue
                for alias in node.names:  # `from lowbit_ft import adapters` imports a module
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in known else base)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("lowbit_ft")}
        out[name] = {t for t in targets if t != name}
    return out


def test_every_module_is_on_a_stage():
    for name in modules():
        stage(name)


def test_imports_point_down_the_stages():
    known = modules()
    upward = [f"{src} ({STAGES[stage(src)][0]}) imports {dst} ({STAGES[stage(dst)][0]})"
              for src, dsts in arrows(known).items() for dst in sorted(dsts) if stage(dst) > stage(src)]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph = arrows(modules())
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" → ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("src, dst", [("lowbit_ft.quant.modules", "lowbit_ft.formats.load"),
                                      ("lowbit_ft.adapters.model", "lowbit_ft.train.module")])
def test_an_upward_import_is_caught(src, dst, monkeypatch):
    """The checks above can fail: an upward arrow and the circle it closes are both reported."""
    real = arrows(modules())
    monkeypatch.setitem(globals(), "arrows", lambda known: {**real, src: real[src] | {dst}})
    with pytest.raises(AssertionError, match=f"{src} .* imports {dst}"):
        test_imports_point_down_the_stages()
    with pytest.raises(AssertionError, match=src):
        test_no_import_circle()


def test_the_checkout_root_does_not_shadow_installed_kernels_or_callbacks(tmp_path):
    """`kernels/` and `callbacks/` sit in the checkout's root, where `python` and pytest put them on sys.path
    under bare names; transformers imports Hugging Face's `kernels`. From the root, `import kernels` must reach an
    installed `kernels` (or fail as missing), while lowbit_ft's own packages still load."""
    installed = tmp_path / "site"
    for name in ("kernels", "callbacks"):
        (installed / name).mkdir(parents=True)
        (installed / name / "__init__.py").write_text(f"WHO = 'installed {name}'\n")
    code = ("import kernels, callbacks; print(kernels.WHO); print(callbacks.WHO)\n"
            "from lowbit_ft.kernels import quant_matmul; from lowbit_ft.callbacks import MergeCheck; print('ours')")
    env = {**os.environ, "PYTHONPATH": str(installed)}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.stdout.split() == ["installed", "kernels", "installed", "callbacks", "ours"], run.stderr

    env.pop("PYTHONPATH")
    missing = subprocess.run([sys.executable, "-c", "import callbacks"], cwd=ROOT, env=env, capture_output=True,
                             text=True)
    assert missing.returncode == 1 and "No module named 'callbacks'" in missing.stderr, missing.stderr
    # transformers ≥ 5.25 requires Hugging Face's `kernels` and imports it with its activations
    real = subprocess.run([sys.executable, "-c", "from transformers import LlamaConfig; import kernels; "
                           "print(kernels.__file__)"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert real.returncode == 0 and "site-packages" in real.stdout, real.stderr
