"""QLoRA training on the hf backend (CPU): every LoRA matrix learns, the run directory is complete and
loadable by peft, a SIGKILLed run resumes to the same adapter, and the model learns to stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mistral_fast.config import load_config
from mistral_fast.train import COMPLETE_MARKER, last_complete_checkpoint

pytestmark = pytest.mark.slow

BASE = [
    "data.max_examples=48",
    "model.max_seq_length=128",
    "train.per_device_batch_size=4",
    "train.logging_steps=2",
]


def smoke(tmp_path: Path, *extra: str):
    return load_config("smoke", [*BASE, f"train.output_dir={tmp_path / 'run'}", *extra])


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from mistral_fast.pipeline import run

    tmp = tmp_path_factory.mktemp("train")
    cfg = smoke(tmp, "train.max_steps=8", "train.eval_steps=4", "train.save_steps=4", "train.learning_rate=1e-3")
    return cfg, run(cfg)


def test_every_lora_matrix_moves(trained) -> None:
    from mistral_fast.modeling import load_model

    cfg, result = trained
    after = adapter_weights(Path(result.run_dir))
    init = load_model(cfg).model  # same seed: the adapter exactly as it was before training
    before = {n: p.detach().float() for n, p in init.named_parameters() if "lora_" in n}
    assert len(after) == len(before) == 2 * len(cfg.lora.target_modules) * 2  # A and B, 2 layers
    for name, tensor in after.items():
        key = next(k for k in before if k.replace(".default", "").endswith(name.split("base_model.model.")[-1]))
        moved = (tensor.float() - before[key]).abs() > 0
        assert moved.float().mean() > 0.95, f"{name}: only {moved.float().mean():.0%} of entries changed"
        assert tensor.dtype == torch.float32, "adapters are kept and saved in fp32"


def test_run_directory_is_complete(trained) -> None:
    cfg, result = trained
    run_dir = Path(result.run_dir)
    assert load_config(run_dir / "run_config.yaml") == cfg
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][:2] == [1, 2]
    assert any("eval_loss" in r for r in rows)
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((run_dir / "result.json").read_text())
    assert saved["train"]["steps"] == 8 and saved["train"]["tokens_per_second"] > 0
    assert saved["train"]["eval_loss"] == pytest.approx(result.train["eval_loss"])
    assert all((c / COMPLETE_MARKER).exists() for c in (run_dir / "checkpoints").glob("checkpoint-*"))


def peft_reference(result):
    """The saved adapter loaded by transformers + bitsandbytes + peft themselves onto the 4-bit base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from mistral_fast.modeling import disable_cpu_weight_repacking, resolve_model_path

    adapter = Path(result.train["adapter_dir"])
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, result.train["extra"]["compute_dtype"]),
    )
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"), quantization_config=bnb)
    disable_cpu_weight_repacking(base)
    return PeftModel.from_pretrained(base, adapter).eval(), AutoTokenizer.from_pretrained(adapter)


def test_adapter_loads_with_peft_and_reproduces_eval_loss(trained) -> None:
    """transformers + bitsandbytes + peft reproduce the eval loss the trainer reported."""
    from mistral_fast.dataset import prepare_data

    cfg, result = trained
    adapter = Path(result.train["adapter_dir"])
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == cfg.lora.rank
    model, tok = peft_reference(result)
    data = prepare_data(cfg, tok)
    rows, bs, losses = data.eval, cfg.train.per_device_batch_size, []
    for i in range(0, len(rows), bs):
        batch = rows[i : i + bs]
        width = max(len(x) for x in batch["input_ids"])
        ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in batch["input_ids"]])
        labels = torch.tensor([y + [-100] * (width - len(y)) for y in batch["labels"]])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        losses += [loss.item()] * len(batch["input_ids"])
    assert sum(losses) / len(losses) == pytest.approx(result.train["eval_loss"], rel=2e-3)


def test_incomplete_checkpoint_is_skipped(tmp_path) -> None:
    ckpts = tmp_path / "checkpoints"
    for step, complete in ((4, True), (8, True), (12, False)):
        (ckpts / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (ckpts / f"checkpoint-{step}" / COMPLETE_MARKER).write_text(str(step))
    assert last_complete_checkpoint(ckpts).name == "checkpoint-8"
    assert last_complete_checkpoint(tmp_path / "nothing") is None


def _train_cmd(cfg_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mistral_fast.cli", "train", str(cfg_path), *extra]


def test_sigkill_then_resume_reaches_the_same_adapter(tmp_path) -> None:
    common = [
        "train.max_steps=12",
        "train.save_steps=2",
        "train.eval_steps=2",
        "train.save_total_limit=20",
        "data.eval_fraction=0.1",
        "train.learning_rate=1e-3",
        "train.logging_steps=1",
    ]
    straight = smoke(tmp_path / "a", *common)
    killed = smoke(tmp_path / "b", *common)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_train_cmd(straight.save(tmp_path / "a.yaml")), check=True, env=env, capture_output=True)

    # paused (mistral_fast.pause) once step 7 is logged: checkpoint-6 is complete, checkpoint-8 not begun
    marker = tmp_path / "paused"
    pause = {"MISTRAL_FAST_TEST_PAUSE_AT": "log:7", "MISTRAL_FAST_TEST_PAUSE_MARKER": str(marker)}
    proc = subprocess.Popen(
        _train_cmd(killed.save(tmp_path / "b.yaml")), env=env | pause, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, "training ended before it reached its pause point"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-training, between checkpoints 6 and 8
    proc.wait()
    ckpts = Path(killed.train.output_dir) / "checkpoints"
    assert (ckpts / "checkpoint-6" / COMPLETE_MARKER).exists() and not (ckpts / "checkpoint-8").exists()
    assert not (Path(killed.train.output_dir) / "adapter").exists()

    resumed = subprocess.run(_train_cmd(tmp_path / "b.yaml", "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    train = json.loads((Path(killed.train.output_dir) / "result.json").read_text())["train"]
    assert train["resumed_from"] == str(ckpts / "checkpoint-6")
    assert (train["extra"]["start_step"], train["extra"]["steps_run"], train["steps"]) == (6, 6, 12)
    a, b = adapter_weights(tmp_path / "a" / "run"), adapter_weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_it_learns_to_answer_and_stop(tmp_path) -> None:
    """Over-fit a few conversations: greedy decoding reproduces an answer and then emits </s>."""
    from mistral_fast.data import write_jsonl
    from mistral_fast.pipeline import run

    convs = [
        [{"role": "user", "content": "Convert 5 km to mi."}, {"role": "assistant", "content": "5 km = 3.11 mi."}],
        [{"role": "user", "content": "Convert 2 kg to lb."}, {"role": "assistant", "content": "2 kg = 4.41 lb."}],
        [{"role": "user", "content": "Convert 3 ft to m."}, {"role": "assistant", "content": "3 ft = 0.91 m."}],
    ]
    path = write_jsonl(({"messages": c} for c in convs * 4), tmp_path / "few.jsonl")
    cfg = smoke(
        tmp_path,
        f"data.path={path}",
        "data.eval_fraction=0",
        "data.max_examples=0",
        "train.max_steps=100",
        "train.learning_rate=3e-3",
        "train.warmup_ratio=0",
        "train.lr_scheduler=constant",
        "train.save_steps=100",
        "train.max_grad_norm=1.0",
        "train.logging_steps=10",
        "lora.rank=16",
        "lora.alpha=32",
    )
    result = run(cfg)
    model, tok = peft_reference(result)
    for conv in convs:
        prompt = tok.apply_chat_template(conv[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, prompt["input_ids"].shape[1] :].tolist()
        answer = tok.encode(conv[1]["content"], add_special_tokens=False)
        assert new[: len(answer) + 1] == [*answer, tok.eos_token_id], tok.decode(new)


def test_packing_without_flash_attention_is_refused(tmp_path) -> None:
    """Packed examples must not attend to each other: with sdpa on CPU the run stops before training."""
    from mistral_fast.errors import ConfigError
    from mistral_fast.pipeline import run

    with pytest.raises(ConfigError, match=r"train\.packing=true needs flash attention.*'sdpa'"):
        run(smoke(tmp_path, "train.packing=true", "train.max_steps=2"))
    assert not (tmp_path / "run" / "adapter").exists()
