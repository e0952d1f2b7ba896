"""GGUF export: llama.cpp (llama-cpp-python) and transformers read what gguf-py wrote, with our logits and ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_optional

from mistral_fast.errors import ModelError
from mistral_fast.export import export_gguf, export_run, quantize_gguf, write_modelfile
from mistral_fast.export import gguf as gguf_export
from mistral_fast.modeling import tiny_model_dir
from mistral_fast.tokenizer import load_tokenizer, reference_chat_ids, reference_tokenizer

TEXT = "Convert 3 miles to kilometres, please. The answer is"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Two  spaces: 10 °F in °C?"}]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return tiny_model_dir()


@pytest.fixture(scope="module")
def f16_gguf(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_gguf(model_dir, tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf", "f16")


@pytest.fixture(scope="module")
def hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        batch = torch.tensor([ids])
        out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False, max_new_tokens=n)
    return out[0, len(ids) :].tolist()


def _llama_cpp_side_matching_logits(gguf_path: Path, model, ids: list[int], new_tokens: int):
    """llama.cpp's run of the GGUF on `ids`, its logits checked against the transformers model's."""
    require_optional("llama_cpp")
    from mistral_fast.export.report import gguf_side

    side = gguf_side(gguf_path, [ids], eos=2, max_new_tokens=new_tokens)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    # fp16 weights (from bf16: exact) and llama.cpp's fp16/fp32 kernels: measured 0.005 of a logit range ~9.
    assert np.abs(side.logits[0] - reference).max() < 0.003 * np.abs(reference).max()
    assert (side.logits[0].argmax(-1) == reference.argmax(-1)).all()
    return side


def test_f16_gguf_logits_and_greedy_match_transformers(f16_gguf: Path, hf_model) -> None:
    ids = load_tokenizer("v3")(TEXT).input_ids
    side = _llama_cpp_side_matching_logits(f16_gguf, hf_model, ids, 12)
    assert side.continuations[0] == _hf_greedy(hf_model, ids, 12)[: len(side.continuations[0])]
    assert len(side.continuations[0]) == 12 or side.stopped[0]


def test_a_tied_model_exports_without_output_weight_and_llama_cpp_computes_its_logits(tmp_path: Path) -> None:
    """`tiny-copy` ties lm_head to the embeddings (as Ministral 3 3B): the GGUF has no `output.weight` (llama.cpp
    then reads token_embd, as its converter writes tied models) and llama.cpp's logits are transformers'."""
    require_optional("llama_cpp")
    import gguf
    from transformers import AutoModelForCausalLM

    from mistral_fast.modeling import resolve_model_path

    directory = Path(resolve_model_path("tiny-copy"))
    path = export_gguf(directory, tmp_path / "tied-f16.gguf", "f16")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    _llama_cpp_side_matching_logits(path, model, load_tokenizer("v3")(TEXT).input_ids, 4)


def test_gguf_tokenizer_gives_mistral_common_ids(f16_gguf: Path) -> None:
    require_optional("llama_cpp")
    from mistral_fast.export.report import TOKENIZER_TEXTS, open_gguf

    reference = reference_tokenizer("v3").instruct_tokenizer.tokenizer
    llm = open_gguf(f16_gguf, n_ctx=64)
    try:
        for text in TOKENIZER_TEXTS:
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == reference.encode(
                text, bos=True, eos=False
            )
        rendered = load_tokenizer("v3").apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
        got = llm.tokenize(rendered.encode(), add_bos=False, special=True)
        assert got == reference_chat_ids(CHAT, "v3", add_generation_prompt=True)
        assert llm.token_bos() == 1 and llm.token_eos() == 2
        assert "[INST]" in llm.metadata["tokenizer.chat_template"]
    finally:
        llm.close()


def test_transformers_loads_our_gguf(f16_gguf: Path, hf_model) -> None:
    from transformers import AutoModelForCausalLM

    # transformers reads GGUF itself (dequantises, and un-permutes Q/K from llama.cpp's layout).
    model = AutoModelForCausalLM.from_pretrained(f16_gguf.parent, gguf_file=f16_gguf.name, dtype=torch.float32)
    ids = torch.tensor([load_tokenizer("v3")(TEXT).input_ids])
    with torch.no_grad():
        got, reference = model(ids).logits, hf_model(ids).logits
    assert (got - reference).abs().max() < 0.003 * reference.abs().max()


@pytest.mark.parametrize(
    ("qtype", "tol"), [("f32", 0.0), ("bf16", 0.0), ("q8_0", 0.01), ("q5_0", 0.06), ("q4_0", 0.12)]
)
def test_gguf_types_hold_the_weights_in_llama_cpp_layout(
    model_dir: Path, tmp_path: Path, qtype: str, tol: float
) -> None:
    import gguf
    from safetensors.torch import load_file

    path = export_gguf(model_dir, tmp_path / f"m-{qtype}.gguf", qtype)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    weights = load_file(model_dir / "model.safetensors")
    assert len(tensors) == len(weights) == 21
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    q = tensors["blk.1.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType[qtype.upper()]
    values = gguf.quants.dequantize(q.data, q.tensor_type).reshape(128, 128)
    expected = gguf_export.permute_qk(weights["model.layers.1.self_attn.q_proj.weight"].float(), 4).numpy()
    scale = np.abs(expected).max()
    assert np.abs(values - expected).max() <= tol * scale
    if qtype in ("f32", "bf16"):  # from bf16 weights both are exact
        assert np.array_equal(values, expected)
    else:  # the bytes llama.cpp's converter writes: gguf-py's quantiser of the permuted fp32 weight
        assert np.array_equal(q.data.reshape(-1), gguf.quants.quantize(expected, q.tensor_type).reshape(-1))
    field = reader.fields["general.file_type"]
    assert int(field.parts[field.data[0]][0]) == gguf_export._file_type(qtype)


@pytest.fixture(scope="module")
def f32_gguf(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_gguf(model_dir, tmp_path_factory.mktemp("gguf32") / "tiny-f32.gguf", "f32")


@pytest.mark.parametrize("qtype", ["q4_0", "q5_0"])
def test_legacy_quants_are_what_llama_cpps_own_quantiser_writes(
    model_dir: Path, f32_gguf: Path, tmp_path: Path, qtype: str
) -> None:
    """q4_0/q5_0 (which llama.cpp's converter does not write) against llama.cpp's C quantiser: the f32 GGUF
    quantised by ``llama_model_quantize`` (``pure``: every 2-D tensor in `qtype`, none promoted to Q6_K) holds
    the same bytes, tensor by tensor, as our direct export (gguf-py's numpy quantiser on each row range)."""
    require_optional("llama_cpp")
    import ctypes

    import gguf
    import llama_cpp

    ours = export_gguf(model_dir, tmp_path / f"ours-{qtype}.gguf", qtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.pure, params.nthread = True, 1
    theirs = tmp_path / f"llama-cpp-{qtype}.gguf"
    assert llama_cpp.llama_model_quantize(str(f32_gguf).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    ref = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    got = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    assert got.keys() == ref.keys()
    kind = gguf.GGMLQuantizationType[qtype.upper()]
    quantised = [name for name, t in ref.items() if t.tensor_type == kind]
    assert len(quantised) == 16, "every 2-D weight (2 layers × 7, embeddings, output) in " + qtype
    for name, tensor in ref.items():
        assert got[name].tensor_type == tensor.tensor_type, name
        assert np.array_equal(np.asarray(got[name].data), np.asarray(tensor.data)), name


def test_q_k_permutation_is_inverted_by_transformers_gguf_loader() -> None:
    # Rows of each head go from HF's halves layout to llama.cpp's interleaved pairs, as llama.cpp's
    # converter does; transformers' GGUF loader applies the inverse.
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8)
    permuted = gguf_export.permute_qk(w, 2)
    assert torch.equal(permuted[0], w[0]) and torch.equal(permuted[1], w[16]) and torch.equal(permuted[2], w[1])
    back = LlamaTensorProcessor()._reverse_permute_weights(permuted.numpy(), 4, 2)
    assert np.array_equal(back, w.numpy())


def test_k_quant_through_llama_cpp(f16_gguf: Path, tmp_path: Path) -> None:
    require_optional("llama_cpp")
    import gguf

    out = quantize_gguf(f16_gguf, tmp_path / "m-q4_k_m.gguf", "q4_k_m")
    reader = gguf.GGUFReader(out)
    types = {t.tensor_type.name for t in reader.tensors}
    # rows of 128 are not a multiple of 256 (QK_K): llama.cpp falls back per tensor, as it must
    assert types <= {"F32", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0", "Q4_0", "Q4_1"}
    assert out.stat().st_size < f16_gguf.stat().st_size / 2


def test_k_quant_without_llama_cpp_says_how_to_get_it(f16_gguf: Path, tmp_path: Path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what an environment without the extra sees
    with pytest.raises(ModelError, match=r"pip install 'mistral-fast\[gguf\]'"):
        quantize_gguf(f16_gguf, tmp_path / "x.gguf", "q4_k_m")
    with pytest.raises(ModelError, match="quantize_gguf"):
        export_gguf(f16_gguf.parent, tmp_path / "x.gguf", "q4_k_m")


def test_interrupted_export_leaves_no_file(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    calls = []

    def failing_encode(tensor, spec):
        calls.append(spec.gguf_name)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-file
        return real(tensor, spec)

    real = gguf_export._encode
    monkeypatch.setattr(gguf_export, "_encode", failing_encode)
    final = tmp_path / "m.gguf"
    with pytest.raises(KeyboardInterrupt):
        export_gguf(model_dir, final, "f16")
    assert list(tmp_path.iterdir()) == []


def test_modelfile(f16_gguf: Path, tmp_path: Path) -> None:
    path = write_modelfile(f16_gguf, system="Be brief.", parameters={"temperature": 0.2})
    text = path.read_text()
    assert path == f16_gguf.with_suffix(".Modelfile")
    assert text.startswith(f"FROM ./{f16_gguf.name}\n")
    assert "[INST]{{ if and $.System" in text and "</s>{{ end }}" in text
    assert 'PARAMETER stop "</s>"' in text and "PARAMETER temperature 0.2" in text and 'SYSTEM """Be brief."""' in text


@pytest.mark.slow
def test_export_run_writes_everything_and_the_report(adapter_run_dir: Path, tmp_path: Path) -> None:
    require_optional("llama_cpp")
    import shutil

    from mistral_fast.config import RunConfig

    run_dir = tmp_path / "run"
    shutil.copytree(adapter_run_dir, run_dir)  # a copy of the session's run: this test exports into it
    saved = _yaml(run_dir / "run_config.yaml")
    train = {**saved["train"], "output_dir": str(run_dir)}
    cfg = RunConfig.from_dict({**saved, "train": train, "export": {"merged": True, "gguf": ["f16", "q8_0", "q4_k_m"]}})
    result = export_run(cfg)
    out = run_dir / "export"
    assert sorted(result["gguf"]) == ["f16", "q4_k_m", "q8_0"] and (out / "merged" / "model.safetensors").is_file()
    assert not (out / "model-f16.gguf.tmp").exists() and (out / "model-q4_k_m.Modelfile").is_file()
    report = json.loads((out / "equivalence.json").read_text())
    pairs = {(p["reference"], p["other"]): p for p in report["pairs"]}
    assert pairs[("adapter", "merged")]["relative_logit_diff"] < 0.02
    f16 = pairs[("merged", "model-f16.gguf")]
    assert f16["relative_logit_diff"] < 0.003 and all(f16["greedy_match"]) and f16["eos_stop_match"]
    assert all(t["all_match"] for t in report["tokenizer"].values())
    assert "| merged | model-f16.gguf |" in (out / "equivalence.md").read_text()
    ppl = report["perplexity"]
    assert ppl["eval_examples"] >= 4 and ppl["eval_tokens"] > 100
    assert abs(ppl["sides"]["model-f16.gguf"] / ppl["sides"]["merged"] - 1) < 0.01
    assert abs(ppl["sides"]["adapter"] / ppl["sides"]["merged"] - 1) < 0.02
    assert "Perplexity on the first" in (out / "equivalence.md").read_text()
    assert json.loads((out / "export.json").read_text())["files"]["model-f16.gguf"] > 0


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_eos_stop_agrees_between_transformers_and_llama_cpp(model_dir: Path, hf_model, tmp_path: Path) -> None:
    """A model whose first greedy token is </s>: both runtimes must stop there (the report's EOS check)."""
    require_optional("llama_cpp")
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from mistral_fast.export.report import _hf_side, compare, gguf_side

    ids = load_tokenizer("v3")(TEXT).input_ids
    first = _hf_greedy(hf_model, ids, 1)[0]
    edited = tmp_path / "eos-model"
    shutil.copytree(model_dir, edited)
    weights = load_file(edited / "model.safetensors")
    weights["lm_head.weight"][2] = weights["lm_head.weight"][first] * 1.5  # </s> outscores the old argmax
    save_file(weights, edited / "model.safetensors", metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(edited, dtype=torch.float32)
    reference = _hf_side("hf", model, [ids], eos=2, max_new_tokens=8)
    side = gguf_side(export_gguf(edited, tmp_path / "eos.gguf", "f16"), [ids], eos=2, max_new_tokens=8)
    assert reference.continuations == side.continuations == [[2]]
    assert compare(reference, side)["eos_stop_match"] and side.stopped == [True]


@pytest.fixture(scope="module")
def adapter_run_dir(shared_adapter_run) -> Path:
    return shared_adapter_run[0]  # built once per session (conftest)


@pytest.mark.parametrize(("qtype", "base"), [("f16", "dequantized"), ("q8_0", "dequantized"), ("bf16", "original")])
def test_one_pass_gguf_is_byte_identical_to_merge_then_export(
    adapter_run_dir: Path, tmp_path: Path, qtype: str, base: str
) -> None:
    from mistral_fast.export import export_merged_gguf, merge_adapter

    merged = merge_adapter(adapter_run_dir, tmp_path / "merged", base=base, shard_size="3MB")  # shards != base's
    two_step = export_gguf(merged, tmp_path / "two-step.gguf", qtype, name="run")
    one_pass = export_merged_gguf(adapter_run_dir, tmp_path / "one-pass.gguf", qtype, base=base)
    assert one_pass.read_bytes() == two_step.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "one-pass.gguf", "two-step.gguf"]


def test_export_run_without_merged_writes_no_checkpoint(adapter_run_dir: Path, tmp_path: Path) -> None:
    import shutil

    from mistral_fast.config import RunConfig

    run_dir = tmp_path / "run"
    shutil.copytree(adapter_run_dir, run_dir)
    cfg = RunConfig.from_dict({**_yaml(run_dir / "run_config.yaml"), "train": {"output_dir": str(run_dir)}})
    result = export_run(cfg, merged=False, gguf=["f16"], report=False)
    assert result["merged"] is None and Path(result["gguf"]["f16"]).is_file()
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == [
        "export.json",
        "model-f16.Modelfile",
        "model-f16.gguf",
    ]
    assert not list(run_dir.glob(".merge-*"))


def test_perplexity_of_f16_gguf_matches_merged_model(adapter_run_dir: Path, tmp_path: Path) -> None:
    """The report's perplexity: llama.cpp's logits of an f16 GGUF score the eval split like transformers does."""
    require_optional("llama_cpp")
    from mistral_fast.export import export_merged_gguf, merge_adapter
    from mistral_fast.export.report import eval_rows, gguf_side, merged_side
    from mistral_fast.rundir import RunDir

    rows = eval_rows(RunDir.open(adapter_run_dir).config, limit=4)
    assert len(rows) == 4 and all(any(t != -100 for t in labels) for _, labels in rows)
    merged = merged_side(merge_adapter(adapter_run_dir, tmp_path / "merged"), [], 2, 0, "float32", rows)
    side = gguf_side(export_merged_gguf(adapter_run_dir, tmp_path / "m.gguf", "f16"), [[1]], 2, 1, rows)
    assert merged.eval_tokens == side.eval_tokens == sum(sum(t != -100 for t in lab[1:]) for _, lab in rows)
    assert merged.perplexity > 1 and abs(side.perplexity / merged.perplexity - 1) < 0.01


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "f16", "bf16"])
def test_row_range_encoder_writes_what_llama_cpp_converter_writes(qtype: str, torch_threads: int) -> None:
    """Q rows over several row ranges, permuted and quantised: the bytes of gguf-py (llama.cpp's converter)."""
    import gguf

    from mistral_fast.export.kernels import CHUNK_VALUES, RowMerge

    gen = torch.Generator().manual_seed(5)
    cols = 512
    rows = (CHUNK_VALUES // cols) * 3  # three row ranges, 8 heads of 2 * rows/16 rows
    weight = (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16)
    weight[0, :32] = 0  # an all-zero q8_0 block
    weight[1, :32] = (torch.arange(32) - 15.5) / 127 * 2  # x/d exactly k + 0.5: round half away from zero
    kind = gguf.GGMLQuantizationType[qtype.upper()]
    spec = gguf_export._Tensor(Path("x"), "q_proj.weight", "blk.0.attn_q.weight", (rows, cols), kind, 8)
    got = gguf_export._encode(RowMerge(weight), spec)
    permuted = gguf_export.permute_qk(weight.float(), 8).numpy()
    if qtype == "bf16":
        expected = gguf_export.permute_qk(weight, 8).view(torch.int16).numpy()
    else:
        expected = gguf.quants.quantize(permuted, kind)
    assert got.dtype == expected.dtype and np.array_equal(got.reshape(-1), expected.reshape(-1))


def test_q8_0_rounds_ties_away_from_zero_as_ggml_does() -> None:
    import gguf

    from mistral_fast.export.kernels import q8_0_rows

    blocks = torch.zeros(3, 32)
    blocks[:, 0] = 127.0  # d = 1: every other value is x/d itself
    blocks[:, 1:] = torch.arange(31) + 0.5  # exact ties: round() would go to even, ggml goes away from zero
    blocks[1] *= -1
    blocks[2, 1:] = torch.nextafter(blocks[2, 1:], torch.tensor(0.0))  # just below the ties
    got = q8_0_rows(blocks).numpy()
    assert np.array_equal(got, gguf.quants.quantize(blocks.numpy(), gguf.GGMLQuantizationType.Q8_0))
    assert got[0, 2 + 1] == 1 and got[0, 2 + 2] == 2  # 0.5 -> 1, 1.5 -> 2 (not 0, 2)


def test_gguf_export_without_the_gguf_package_stops_first_and_says_how_to_get_it(
    model_dir: Path, f16_gguf: Path, tmp_path: Path, monkeypatch
) -> None:
    """scripts/setup.sh's demo layer has neither gguf nor llama-cpp-python (issue 26): each export says what to
    install and what it costs, before any file is written."""
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ModelError, match=r"compiles llama\.cpp once, about 3 min"):
        quantize_gguf(f16_gguf, tmp_path / "x.gguf", "q4_k_m")
    monkeypatch.setitem(sys.modules, "gguf", None)  # what the demo layer's environment sees
    with pytest.raises(ModelError, match=r"qtype='f16': GGUF files are written with the gguf package.*pip install"):
        export_gguf(model_dir, tmp_path / "m.gguf", "f16")
    assert list(tmp_path.iterdir()) == []
