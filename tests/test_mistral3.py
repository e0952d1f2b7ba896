"""Mistral 3 wrappers (Mistral3ForConditionalGeneration): text fine-tuning of the language model, vision kept.

One tiny `tiny-mistral3` run (prepare → train → evaluate → merge → GGUF + mmproj) is shared by the module; each
test holds one of its outputs against an independent reference: transformers' own model (which modules exist,
what is 16-bit), peft's merge_and_unload on the 16-bit wrapper, the base checkpoint's bytes, and llama.cpp's
convert_hf_to_gguf.py (text model and --mmproj).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import mistral_fast as mf
from mistral_fast.errors import DataError
from mistral_fast.export import export_run, merge_adapter
from mistral_fast.export.merge import model_weight_name
from mistral_fast.modeling import load_model, resolve_model_path

_OVERRIDES = [
    "model.backend=hf",
    "train.max_steps=2",
    "train.eval_steps=2",
    "train.save_steps=2",
    "train.logging_steps=1",
    "eval.max_new_tokens=4",
    "eval.num_samples=1",
    "export.merged=false",
    "export.gguf=[]",
]
_VISION = ("vision_tower.", "multi_modal_projector.")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """The smoke-mistral3 preset, a few steps, through the pipeline; then merge + f16 GGUF + mmproj (no report)."""
    from mistral_fast.pipeline import run as run_pipeline

    run_dir = tmp_path_factory.mktemp("mistral3") / "run"
    cfg = mf.load_config("smoke-mistral3", [*_OVERRIDES, f"train.output_dir={run_dir}"])
    result = run_pipeline(cfg)
    exports = export_run(run_dir, merged=True, gguf=["f16"], report=False)
    return run_dir, json.loads(json.dumps(result.__dict__, default=str)), exports


@pytest.fixture(scope="module")
def base_dir() -> Path:
    return Path(resolve_model_path("tiny-mistral3"))


def test_pipeline_trains_the_language_model_and_exports_vision(run) -> None:
    run_dir, result, exports = run
    assert result["train"]["train_loss"] > 0 and (run_dir / "eval.json").is_file()
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert adapter and all(".language_model.layers." in k for k in adapter)  # LoRA inside the language model only
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained: every B left zero
    merged = json.loads((Path(exports["merged"]) / "config.json").read_text())
    assert merged["architectures"] == ["Mistral3ForConditionalGeneration"]
    assert Path(exports["gguf"]["f16"]).is_file() and Path(exports["mmproj"]).name == "mmproj-F16.gguf"


def test_loading_quantises_the_language_model_only(base_dir: Path) -> None:
    """Against transformers' own wrapper: LoRA on exactly its language-model linears of the target names, 4-bit
    there; the vision tower and projector are 16-bit, frozen and hold the checkpoint's values."""
    from transformers import AutoConfig, Mistral3ForConditionalGeneration

    cfg = mf.load_config("smoke-mistral3", ["model.backend=hf"])
    loaded = load_model(cfg, for_training=True)
    with torch.device("meta"):
        reference = Mistral3ForConditionalGeneration(AutoConfig.from_pretrained(base_dir))
    targets = cfg.lora.target_modules
    linears = [n for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear)]
    wanted = {n for n in linears if n.startswith("model.language_model.") and n.split(".")[-1] in targets}
    modules = dict(loaded.model.base_model.model.named_modules())
    with_lora = {n for n, m in modules.items() if hasattr(m, "lora_A")}
    assert with_lora == wanted and len(wanted) == 14
    assert all(type(modules[n].base_layer).__name__ == "Linear4bit" for n in wanted)
    stored = load_file(base_dir / "model.safetensors")
    params = loaded.model.base_model.model.named_parameters()
    vision = {n: p for n, p in params if n.startswith(("model.vision_tower.", "model.multi_modal_projector."))}
    assert len(vision) == sum(1 for k in stored if k.startswith(_VISION))
    for name, param in vision.items():
        assert param.dtype == torch.bfloat16 and not param.requires_grad, name
        checkpoint_name = next(k for k in stored if model_weight_name(k) == name)
        assert torch.equal(param, stored[checkpoint_name]), name


def test_adapter_loads_with_peft_and_the_merge_is_peft_s(run, base_dir: Path, tmp_path: Path) -> None:
    """The saved adapter loads with peft onto transformers' 16-bit wrapper; its merge_and_unload is our
    ``original`` merge tensor for tensor (names mapped to the checkpoint's layout)."""
    from peft import PeftModel
    from transformers import Mistral3ForConditionalGeneration

    run_dir, _, _ = run
    model = Mistral3ForConditionalGeneration.from_pretrained(base_dir, dtype=torch.bfloat16)
    reference = PeftModel.from_pretrained(model, run_dir / "adapter").merge_and_unload().state_dict()
    ours = load_file(merge_adapter(run_dir, tmp_path / "merged", base="original") / "model.safetensors")
    assert {model_weight_name(k) for k in ours} == set(reference)
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[model_weight_name(name)]), name


def test_merge_writes_the_vision_tower_s_original_bytes(run, base_dir: Path) -> None:
    _, _, exports = run
    merged = Path(exports["merged"]) / "model.safetensors"
    with safe_open(base_dir / "model.safetensors", "pt") as base, safe_open(merged, "pt") as out:
        vision = [k for k in base.keys() if k.startswith(_VISION)]  # noqa: SIM118
        assert len(vision) == 33
        for name in vision:
            a, b = base.get_tensor(name), out.get_tensor(name)
            assert a.dtype == b.dtype and a.view(torch.uint8).equal(b.view(torch.uint8)), name
        text = [k for k in base.keys() if k.startswith("language_model.")]  # noqa: SIM118
        changed = [k for k in text if not base.get_tensor(k).equal(out.get_tensor(k))]
        assert any(".self_attn.q_proj." in k for k in changed)  # the LoRA update is there


def _gguf(path: Path) -> tuple[dict[str, bytes], dict[str, tuple[str, tuple[int, ...], bytes]]]:
    """Every metadata key's encoded bytes (its types and value) and every tensor, from one parse of the file
    (parsing a 131k-token vocabulary is the slow part: ~12 s of CPU each time)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    fields = {
        k: b"".join(bytes(np.ascontiguousarray(p).data) for p in f.parts[1:])  # parts[0]: the key's own name
        for k, f in reader.fields.items()
        if not k.startswith("GGUF.")
    }
    tensors = {
        t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape), bytes(np.ascontiguousarray(t.data).data))
        for t in reader.tensors
    }
    return fields, tensors


@pytest.mark.slow  # as the other converter comparisons (tests/test_export_llama_cpp.py)
def test_gguf_and_mmproj_equal_llama_cpp_converter(run, llama_cpp_source: Path, tmp_path: Path) -> None:
    """The pipeline's text GGUF ("mistral3") and mmproj file are what convert_hf_to_gguf.py (and --mmproj) write
    for the same merged checkpoint: every tensor's name, type, shape and bytes and every metadata key."""
    from conftest import require_module
    from test_export_llama_cpp import run_converter

    require_module("llama_cpp", "pip install 'mistral-fast[gguf]'")
    run_dir, _, exports = run
    merged = Path(exports["merged"])
    for args, ours in (([], exports["gguf"]["f16"]), (["--mmproj"], exports["mmproj"])):
        theirs = tmp_path / f"converter{'-'.join(args)}.gguf"
        argv = [str(merged), "--outfile", str(theirs), "--outtype", "f16", "--model-name", run_dir.name, *args]
        run_converter(llama_cpp_source, "convert_hf_to_gguf.py", argv)
        (reference_kv, reference), (got_kv, got) = _gguf(theirs), _gguf(Path(ours))
        assert sorted(got) == sorted(reference) and len(reference) == (33 if args else 21)
        for name, value in reference.items():
            assert got[name] == value, name
        # as tests/test_tekken_gguf.py: add_sep_token (sentence pairs) is the one key ours leaves out; the chat
        # template differs by design (no {% generation %} marks)
        assert set(reference_kv) - set(got_kv) <= {"tokenizer.ggml.add_sep_token"}
        for key, value in reference_kv.items():
            if key in got_kv and key != "tokenizer.chat_template":
                assert got_kv[key] == value, key
        assert (b"clip" if args else b"mistral3") in got_kv["general.architecture"]


def test_adapter_gguf_is_refused_with_what_to_use(run, tmp_path: Path) -> None:
    from mistral_fast.export import export_adapter_gguf

    run_dir, _, _ = run
    with pytest.raises(mf.ModelError, match=r"Mistral3ForConditionalGeneration.*set export.gguf"):
        export_adapter_gguf(run_dir, tmp_path / "adapter.gguf", "f16")


def test_unsloth_backend_is_refused_with_unsloth_s_reason() -> None:
    cfg = mf.load_config("smoke-mistral3", ["model.backend=unsloth"])
    with pytest.raises(mf.ModelError, match=r"FastLanguageModel.*AutoModelForCausalLM.*model.backend=hf"):
        load_model(cfg)


def test_images_in_the_data_are_refused() -> None:
    from mistral_fast.data import to_messages

    chunk = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": "https://x/cat.png"}]
    record = {"messages": [{"role": "user", "content": chunk}, {"role": "assistant", "content": "A cat."}]}
    with pytest.raises(DataError, match=r"messages\[0\] has a 'image_url' content chunk: images are not supported"):
        to_messages(record, "messages")
    sharegpt = {"conversations": [{"from": "human", "value": "Describe it", "images": ["cat.png"]}]}
    with pytest.raises(DataError, match=r"conversations\[0\] has an image field"):
        to_messages(sharegpt, "sharegpt")
