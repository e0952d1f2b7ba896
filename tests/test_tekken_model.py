"""The tekken generation end to end on tiny local models: the real tekken vocabulary, head_dim decoupled from
hidden/heads (as in Nemo and Small 3), QLoRA training and evaluation on the hf backend, merge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import require_optional
from safetensors.torch import load_file

from mistral_fast.config import load_config
from mistral_fast.errors import ModelError
from mistral_fast.modeling import TINY_VARIANTS, resolve_model_path
from mistral_fast.tokenizer import check_tokenizer, load_tokenizer, reference_chat_ids

pytestmark = pytest.mark.slow

BASE = ["data.max_examples=24", "model.max_seq_length=128", "train.per_device_batch_size=4", "train.logging_steps=2"]


@pytest.mark.parametrize(("name", "version"), [("tiny-nemo", "v3-tekken"), ("tiny-small", "v7-tekken")])
def test_tiny_tekken_models(name, version):
    directory = Path(resolve_model_path(name))
    config = json.loads((directory / "config.json").read_text())
    assert config["vocab_size"] == 131072 and config["head_dim"] == 16
    assert config["hidden_size"] // config["num_attention_heads"] != config["head_dim"]  # decoupled, as in Nemo
    assert config["sliding_window"] is None
    assert TINY_VARIANTS[name]["tokenizer"] == version
    saved = load_tokenizer(version, path=directory)  # the model's own tokenizer.json, checked on the probes
    assert check_tokenizer(saved, version) == []
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert saved.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False) == (
        reference_chat_ids(conversation, version, add_generation_prompt=True)
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from mistral_fast.pipeline import run

    tmp = tmp_path_factory.mktemp("nemo")
    extra = ["train.max_steps=4", "train.eval_steps=2", "train.save_steps=4", "train.learning_rate=1e-3"]
    cfg = load_config("smoke-nemo", [*BASE, f"train.output_dir={tmp / 'run'}", *extra])
    return cfg, run(cfg)


def test_qlora_trains_and_evaluates_on_the_hf_backend(trained):
    _, result = trained
    run_dir = Path(result.run_dir)
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())  # every B moved off its zero init
    q_a = next(v for k, v in adapter.items() if "q_proj.lora_A" in k)
    o_a = next(v for k, v in adapter.items() if "o_proj.lora_A" in k)
    assert q_a.shape[1] == 128 and o_a.shape[1] == 4 * 16  # o_proj reads heads x head_dim, not hidden
    figures = [result.train["first_logged_loss"], result.train["train_loss"], result.train["eval_loss"]]
    assert all(x is not None and torch.isfinite(torch.tensor(x)) for x in figures), figures
    assert (run_dir / "result.json").is_file() and result.evaluation is not None


def test_merge_keeps_the_tekken_tokenizer(trained, tmp_path):
    from mistral_fast.export.merge import merge_adapter

    _, result = trained
    merged = merge_adapter(Path(result.run_dir), tmp_path / "merged")
    assert check_tokenizer(load_tokenizer("v3-tekken", path=merged), "v3-tekken") == []
    assert not (Path(merged) / "tokenizer.model").exists()


def test_a_tokenizer_of_another_generation_is_refused(tmp_path):
    from mistral_fast.modeling import load_model

    cfg = load_config("smoke-nemo", [*BASE, "model.tokenizer=v3", f"train.output_dir={tmp_path}"])
    with pytest.raises(ModelError, match=r"model.tokenizer='v3' has 32768 ids but 'tiny-nemo' has 131072"):
        load_model(cfg)


UNSLOTH_SCRIPT = """
import json
import torch
from mistral_fast.config import RunConfig
from mistral_fast.modeling import load_model
cfg = RunConfig().with_overrides({"model.name_or_path": "tiny-nemo", "model.tokenizer": "v3-tekken",
                                  "model.backend": "unsloth", "lora.dropout": 0.0, "lora.rank": 8})
loaded = load_model(cfg)
model = loaded.model
model.train()
params = {n: p for n, p in model.named_parameters() if p.requires_grad}
optimizer = torch.optim.SGD(params.values(), lr=1.0)
tokens = torch.randint(1000, 131072, (2, 64), generator=torch.Generator().manual_seed(0))
for _ in range(2):  # lora_B starts at 0: lora_A gets a gradient once B has moved
    optimizer.zero_grad()
    out = model(input_ids=tokens, labels=tokens)
    out.loss.backward()
    optimizer.step()
dead = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum()]
print("UNSLOTH_RESULT " + json.dumps({"backend": loaded.backend, "loss": out.loss.item(), "dead": dead,
                                      "lora": len(params), "head_dim": model.config.head_dim}))
"""


@pytest.mark.unsloth
def test_unsloth_backend_trains_the_tiny_nemo(tmp_path):
    """Unsloth's CPU fallback (its own process: importing it patches transformers in place)."""
    require_optional("unsloth")
    env = {**os.environ, "MISTRAL_FAST_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", UNSLOTH_SCRIPT], capture_output=True, text=True, env=env, cwd=repo, timeout=600
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("UNSLOTH_RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(lines[-1].removeprefix("UNSLOTH_RESULT "))
    assert result["backend"] == "unsloth" and result["head_dim"] == 16
    assert result["lora"] == 2 * 14 and result["dead"] == []
    assert 0 < result["loss"] < 30


def test_export_run_writes_a_tekken_gguf(trained):
    """The run's exports end to end: merged checkpoint, one GGUF per type, Modelfile (no report: no llama.cpp)."""
    from mistral_fast.export import export_run
    from mistral_fast.export.gguf import _tekken_json

    _, result = trained
    exported = export_run(result.run_dir, merged=True, gguf=["q8_0"], report=False)
    merged = Path(exported["merged"])
    assert _tekken_json(merged) is not None and Path(exported["gguf"]["q8_0"]).stat().st_size > 0
    assert Path(exported["modelfiles"]["q8_0"]).read_text().count("[INST]") >= 1
