"""The demo's post-training part on a tiny model: merge check → export → reload with from_pretrained →
generate, and the merged model's outputs equal the adapter-on model's."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lowbit_ft.callbacks.demo import DEMO_PROMPTS
from lowbit_ft.cli import main
from lowbit_ft.evaluation.generate import generate_answers
from lowbit_ft.train.checkpoint import module_from_checkpoint

DEMO = Path(__file__).parent.parent / "recipes" / "demo.yaml"


def test_demo_recipe_reloads_the_merged_model_and_it_answers_like_the_adapters(tiny_model_dir, tmp_path,
                                                                             monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert "dtype: float32" in DEMO.read_text()  # float32 storage: "equal" is exact up to float32 matmul order
    main(["fit", "--config", str(DEMO), "--model.base", str(tiny_model_dir), "--model.r", "4",
          "--model.lr", "0.01", "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
          "--trainer.limit_val_batches", "1", "--data.limit", "20", "--data.val_fraction", "0.2",
          "--data.max_length", "64", "--trainer.callbacks.every_n_train_steps", "4"])
    out = capsys.readouterr().out
    run = tmp_path / "out/demo/version_0"
    assert "── lowbit-ft demo" in out and f"merged INT4 model      {(run / 'merged').resolve()}" in out
    assert "reloaded from disk    AutoModelForCausalLM.from_pretrained" in out and "top-1 agreement 1.000" in out
    assert out.count("before fine-tuning") == len(DEMO_PROMPTS) and "lowbit-ft export --checkpoint" in out

    adapter_on = module_from_checkpoint(run / "checkpoints/last.ckpt").model.eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, m = adapter_on(tokens).logits, merged(tokens).logits
    assert (m - a).norm() / a.norm() < 1e-5 and torch.equal(m.argmax(-1), a.argmax(-1))
    tokenizer = module_from_checkpoint(run / "checkpoints/last.ckpt").base.tokenizer
    assert generate_answers(merged, tokenizer, list(DEMO_PROMPTS), 8) == \
        generate_answers(adapter_on, tokenizer, list(DEMO_PROMPTS), 8)
