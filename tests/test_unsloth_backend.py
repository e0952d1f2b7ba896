"""The unsloth backend on CPU (Unsloth's own CPU fallback), run in a subprocess.

Importing unsloth patches transformers and TRL in place, so it never happens in the pytest
process: the work runs in a fresh interpreter that prints one JSON line, and the tests assert on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import require_optional

pytestmark = [pytest.mark.unsloth, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _unsloth_installed() -> None:
    """Skip (locally) or fail (CI=true) when unsloth is missing, per test, so deselected tests never ask."""
    require_optional("unsloth")

MARKER = "UNSLOTH_RESULT "

# Loads the tiny model through our load_model with backend=unsloth, generates (the bitsandbytes
# repacking trap), then trains two SGD steps and reports what it found.
SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from collections import Counter

    from mistral_fast.config import RunConfig
    from mistral_fast.modeling import load_model

    early = sorted({"transformers", "trl", "peft"} & set(sys.modules))
    cfg = RunConfig().with_overrides(
        {"model.name_or_path": "tiny", "model.backend": "unsloth", "lora.dropout": 0.0, "lora.rank": 8}
    )
    start = time.perf_counter()
    loaded = load_model(cfg)
    load_s = time.perf_counter() - start
    import torch

    model = loaded.model
    types = Counter(
        f"{type(m).__module__}.{type(m).__name__}" for _, m in model.named_modules() if "Linear" in type(m).__name__
    )
    base = [m for m in model.modules() if type(m).__module__.startswith("bitsandbytes")]
    states = {(s.quant_type, s.blocksize, s.nested) for s in (m.weight.quant_state for m in base)}
    inner = model.get_base_model()

    model.eval()
    model.generate(input_ids=torch.tensor([[1, 1778, 1117]]), max_new_tokens=3, do_sample=False)
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(params.values(), lr=1.0)
    tokens = torch.randint(3, 32768, (2, 64), generator=torch.Generator().manual_seed(0))
    timings = []
    for _ in range(2):  # lora_B starts at 0: lora_A gets a gradient once B has moved
        optimizer.zero_grad()
        t0 = time.perf_counter()
        out = model(input_ids=tokens, labels=tokens)
        t1 = time.perf_counter()
        out.loss.backward()
        timings.append([round(t1 - t0, 3), round(time.perf_counter() - t1, 3)])
        optimizer.step()
    result = {
        "backend": loaded.backend,
        "reason": loaded.reasons["backend"],
        "compute_dtype": str(loaded.compute_dtype),
        "imported_before_unsloth": early,
        "layer_types": dict(types),
        "quant_states": sorted(map(list, states)),
        "repacking_off": all(m.support_avx512bf16_for_cpu is False for m in base),
        "lora_params": sorted(params),
        "trainable_dtypes": sorted({str(p.dtype) for p in params.values()}),
        "dead_grads": [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum()],
        "loss": out.loss.item(),
        "gradient_checkpointing": bool(inner.is_gradient_checkpointing),
        "use_cache": model.config.use_cache,
        "pad_matches_ours": inner.config.pad_token_id == loaded.tokenizer.pad_token_id != loaded.tokenizer.eos_token_id,
        "tokenizer_class": type(loaded.tokenizer).__name__,
        "padding_side": loaded.tokenizer.padding_side,
        "info": loaded.info,
        "load_seconds": round(load_s, 2),
        "fwd_bwd_seconds": timings,
    }
    print("UNSLOTH_RESULT " + json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def unsloth_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run SCRIPT once in a fresh interpreter; return its JSON result and its console output."""
    env = {
        **os.environ,
        "MISTRAL_FAST_CACHE": str(tmp_path_factory.mktemp("cache")),  # "tiny" gets built there
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=repo, timeout=600
    )
    output = proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    assert proc.returncode == 0 and lines, f"subprocess failed (rc={proc.returncode}):\n{output[-4000:]}"
    return {**json.loads(lines[-1].removeprefix(MARKER)), "output": output}


def test_unsloth_loads_real_4bit_layers_with_lora(unsloth_run: dict[str, Any]) -> None:
    r = unsloth_run
    assert r["backend"] == "unsloth" and "CPU fallback" in r["reason"]
    assert "no GPU found, training on CPU" in r["output"]  # Unsloth's own CPU backend
    assert r["imported_before_unsloth"] == []  # load_model imports unsloth before transformers/trl/peft
    assert "unsloth is being imported after" not in r["output"]
    types = r["layer_types"]
    assert types["bitsandbytes.nn.modules.Linear4bit"] == 14  # real bitsandbytes 4-bit, all 7 x 2 projections
    assert types["peft.tuners.lora.bnb.Linear4bit"] == 14
    assert r["quant_states"] == [["nf4", 64, True]]
    assert r["repacking_off"]
    assert r["info"]["quantized_layers"] == 14 and r["info"]["lora_layers"] == 14


def test_unsloth_forward_backward_trains_every_lora_matrix(unsloth_run: dict[str, Any]) -> None:
    r = unsloth_run
    assert len(r["lora_params"]) == 2 * 14 and all("lora_" in n for n in r["lora_params"])
    assert r["trainable_dtypes"] == ["torch.float32"]
    assert r["dead_grads"] == []  # also after generate(): the repacking trap is off
    assert 0 < r["loss"] < 20
    assert r["gradient_checkpointing"] and r["use_cache"] is False


def test_unsloth_backend_uses_our_tokenizer(unsloth_run: dict[str, Any]) -> None:
    r = unsloth_run
    assert r["pad_matches_ours"]  # Unsloth would otherwise set pad = eos
    assert r["padding_side"] == "right"


def test_unsloth_backend_trains_through_the_cli(tmp_path: Path) -> None:
    """The same pipeline (`mistral-fast train`) on the unsloth backend: 4-bit LoRA SFT runs and saves an adapter."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "mistral_fast.cli",
        "train",
        "smoke",
        "--set",
        "model.backend=unsloth",
        "--set",
        "train.max_steps=4",
        "--set",
        "train.eval_steps=2",
        "--set",
        "train.save_steps=2",
        "--set",
        "data.max_examples=32",
        "--set",
        f"train.output_dir={run_dir}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["train"]["backend"] == "unsloth" and result["train"]["steps"] == 4
    # peft initialises every lora_B to zero: a B with a non-zero entry was trained (a file of the right size is not)
    from safetensors.torch import load_file

    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    lora_b = {name: w for name, w in weights.items() if "lora_B" in name}
    assert len(lora_b) == 2 * 7, sorted(lora_b)  # 2 layers of the tiny model × 7 target modules
    assert not [name for name, w in lora_b.items() if not w.float().abs().sum()], "untrained lora_B"
    adapter_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert set(adapter_cfg["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
