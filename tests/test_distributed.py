"""Scale-out through accelerate/torchrun: shipped configs parse with accelerate's own launcher code; DDP on
two CPU processes (gloo) trains one adapter that is identical on both ranks, with one run directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

from mistral_fast.config import CONFIGS_DIR, load_config
from mistral_fast.distributed import accumulation_for_world
from mistral_fast.errors import ConfigError

ACCELERATE = CONFIGS_DIR / "accelerate"


def launch_env(name: str, monkeypatch) -> tuple[object, dict[str, str]]:
    """What `accelerate launch --config_file NAME` would export to the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    monkeypatch.chdir(CONFIGS_DIR.parent)  # deepspeed_config_file paths are relative to the repository
    argv = ["--config_file", str(ACCELERATE / f"{name}.yaml"), "-m", "mistral_fast.cli", "train"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = []  # what `accelerate launch` sets before this call
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def test_ddp_configs(monkeypatch) -> None:
    for name, cpu in (("ddp", False), ("ddp_cpu", True)):
        args, env = launch_env(name, monkeypatch)
        assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # precision comes from the run config
        assert args.multi_gpu and args.num_processes == 2 and bool(args.use_cpu) == cpu


def test_fsdp_qlora_config_builds_accelerates_plugin(monkeypatch) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin

    _, env = launch_env("fsdp_qlora", monkeypatch)
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == env["FSDP_SYNC_MODULE_STATES"] == "true"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # With sync_module_states the plugin asks the GPU for its device: switch both off to build it here.
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")
    plugin = FullyShardedDataParallelPlugin()
    assert not plugin.use_orig_params and not plugin.cpu_offload.offload_params
    assert plugin.transformer_cls_names_to_wrap == ["MistralDecoderLayer"]
    assert str(plugin.sharding_strategy).endswith("FULL_SHARD")


@pytest.mark.parametrize(
    ("name", "stage", "offload"), [("deepspeed_zero2_offload", 2, True), ("deepspeed_zero3", 3, False)]
)
def test_deepspeed_configs_build_accelerates_plugin(name, stage, offload, monkeypatch) -> None:
    """DeepSpeed itself cannot run on a CPU-only machine (its CPU accelerator needs oneCCL); what can be
    checked here is that accelerate accepts the configs and reads the ZeRO settings we ship."""
    from accelerate.utils import DeepSpeedPlugin

    _, env = launch_env(name, monkeypatch)
    plugin = DeepSpeedPlugin(hf_ds_config=env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
    assert plugin.zero_stage == stage and plugin.hf_ds_config.is_offload() == offload
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["overlap_comm"] and zero["contiguous_gradients"]


def test_accumulation_keeps_the_effective_batch() -> None:
    cfg = load_config(None, ["train.per_device_batch_size=4", "train.gradient_accumulation_steps=4"])
    assert [accumulation_for_world(cfg, n) for n in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=4 cannot be split over 3 processes"):
        accumulation_for_world(cfg, 3)


def _launch(launcher: list[str], tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = tmp_path / "run"
    sets = [
        "train.max_steps=4",
        "train.eval_steps=2",
        "train.save_steps=2",
        "data.max_examples=48",
        "train.gradient_accumulation_steps=2",
        "train.learning_rate=1e-3",
        f"train.output_dir={run_dir}",
        *overrides,
    ]
    cmd = [*launcher, "-m", "mistral_fast.cli", "train", "smoke", *[x for s in sets for x in ("--set", s)]]
    port = str(free_port())  # from the OS: torchrun reads PET_MASTER_PORT (its --master-port), others MASTER_PORT
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": port, "PET_MASTER_PORT": port}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, run_dir


def _check_two_ranks(proc: subprocess.CompletedProcess, run_dir: Path) -> None:
    digests = dict(re.findall(r"rank (\d)/2 adapter sha256 ([0-9a-f]{64})", proc.stderr))
    assert set(digests) == {"0", "1"}, proc.stderr[-3000:]
    assert digests["0"] == digests["1"], "the ranks ended with different adapters"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["train"]["extra"]["world_size"] == 2
    assert result["train"]["extra"]["adapter_sha256"] == digests["0"]
    assert proc.stdout.count("run directory:") == 1  # only rank 0 reports
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["run"]


# Full-batch steps: 8 training examples, each step takes all of them (1 process: batch 4 x accumulation 2;
# 2 processes: batch 4 on each rank, accumulation 1), so the data order cannot make the runs differ and the
# 2-process adapter must equal the 1-process one up to float summation order.
FULL_BATCH = ("data.max_examples=8", "data.eval_fraction=0", "train.max_steps=3", "train.logging_steps=1")
DDP_TOLERANCE = 1e-3  # |adapter(2 processes) - adapter(1 process)| / |its update from init|, per tensor


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _initial_adapter() -> dict:
    """The adapter both runs start from: the LoRA weights load_model gives (lora_A seeded, lora_B zero),
    keyed as peft saves them."""
    import torch
    from peft import get_peft_model_state_dict

    from mistral_fast.modeling import load_model

    loaded = load_model(load_config("smoke", list(FULL_BATCH)))
    return {k: v.detach().to(torch.float32).clone() for k, v in get_peft_model_state_dict(loaded.model).items()}


@pytest.mark.slow
def test_ddp_qlora_on_two_cpu_processes_with_torchrun(tmp_path) -> None:
    """Two ranks agree, and what they agree on is what one process trains at the same effective batch."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    _check_two_ranks(*_launch(torchrun, tmp_path / "ddp", *FULL_BATCH))
    _, single = _launch([sys.executable], tmp_path / "single", *FULL_BATCH)
    one = json.loads((single / "result.json").read_text())["train"]
    two = json.loads((tmp_path / "ddp" / "run" / "result.json").read_text())["train"]
    assert (one["extra"]["world_size"], one["steps"], two["steps"]) == (1, 3, 3)
    a, b = _adapter(single), _adapter(tmp_path / "ddp" / "run")
    init = _initial_adapter()
    assert a.keys() == b.keys() == init.keys() and any("lora_B" in k for k in a)
    ratios = {}
    for name in a:
        update = (a[name].float() - init[name].float()).norm()
        assert update > 0, f"{name} never moved from its init: nothing trained"
        ratios[name] = ((a[name].float() - b[name].float()).norm() / update).item()
    print(f"\nDDP vs 1 process: worst |difference| / |update| = {max(ratios.values()):.2e}")
    assert max(ratios.values()) <= DDP_TOLERANCE, sorted(ratios.items(), key=lambda kv: -kv[1])[:3]
    assert one["train_loss"] == pytest.approx(two["train_loss"], rel=1e-3)
    assert one["train_loss"] < one["first_logged_loss"], "the loss did not go down"


@pytest.mark.slow
def test_ddp_16bit_lora_through_accelerate_launch(tmp_path) -> None:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "ddp_cpu.yaml")]
    _check_two_ranks(*_launch(launcher, tmp_path, "model.load_in_4bit=false"))
