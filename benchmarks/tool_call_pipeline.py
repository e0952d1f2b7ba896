"""Experiment harness: train through the package (prepare_data, load_model, train) and score tuned call accuracy."""
# ruff: noqa: E402, SIM115  (a throwaway probe for issue 22, kept on this branch only)

import argparse
import json
import os
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from mistral_fast.config import load_config
from mistral_fast.dataset import prepare_data
from mistral_fast.evaluate import GenerationSettings, _inference_mode, _prompts, calls_match, generate
from mistral_fast.modeling import load_model
from mistral_fast.tokenizer import parse_tool_calls
from mistral_fast.train import train

p = argparse.ArgumentParser()
p.add_argument("--set", action="append", default=[])
p.add_argument("--name", default="x")
p.add_argument("--base", action="store_true")
a = p.parse_args()
import yaml

over = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
over.setdefault("train.output_dir", f"/tmp/tool_call_pipeline/runs/{a.name}")
over.setdefault("train.report_to", ["none"])
cfg = load_config("tools-smoke", over)
t0 = time.time()
data = prepare_data(cfg)
loaded = load_model(cfg)
t1 = time.time()
tr = train(cfg, loaded, data)
t2 = time.time()
pr = _prompts(data.eval_examples, cfg.eval.num_samples, "v3")
settings = GenerationSettings(max_new_tokens=cfg.eval.max_new_tokens, temperature=0.0, seed=42)


def score():
    with _inference_mode(loaded):
        g = generate(loaded.model, loaded.tokenizer, pr.calls, settings, tools=pr.call_tools)
    parsed = [parse_tool_calls(x["raw"], "v3") for x in g]
    hits = [calls_match(q, r) for q, r in zip(parsed, pr.call_references, strict=False)]
    names = [
        sorted(c["name"] for c in q) == sorted(c["name"] for c in r)
        for q, r in zip(parsed, pr.call_references, strict=False)
    ]
    by = {}
    for _q, r, h in zip(parsed, pr.call_references, hits, strict=False):
        k = "+".join(sorted(c["name"] for c in r))
        by.setdefault(k, [0, 0])
        by[k][0] += h
        by[k][1] += 1
    score.by = by
    return sum(hits) / len(hits), sum(names) / len(names), sum(bool(q) for q in parsed) / len(parsed), g


pr_eval = pr
pr = _prompts(data.train_examples[:40], 40, "v3")
res_train = score()[0]
pr = pr_eval
acc, nm, fmt, g = score()
t3 = time.time()
res = {
    "name": a.name,
    "over": over,
    "acc": acc,
    "name_acc": nm,
    "format": fmt,
    "prompts": len(pr.calls),
    "train_s": round(t2 - t1, 1),
    "eval_s": round(t3 - t2, 1),
    "load_s": round(t1 - t0, 1),
    "train": {k: v for k, v in tr.to_dict().items() if "loss" in k},
    "load": os.getloadavg(),
    "by": score.by,
    "train_acc": res_train,
}
if a.base:
    with loaded.model.disable_adapter():
        res["base_acc"] = score()[0]
print("RESULT", json.dumps(res))
for x, r in list(zip(g, pr.call_references, strict=False))[:8]:
    print("GEN", x["raw"][:200], "| REF", json.dumps(r))
json.dump(
    [{"raw": x["raw"], "ref": r} for x, r in zip(g, pr.call_references, strict=False)],
    open(f"/tmp/tool_call_pipeline/gen_{a.name}.json", "w"),
    indent=0,
)
with open("/tmp/tool_call_pipeline/results.jsonl", "a") as f:
    f.write(json.dumps(res) + "\n")
