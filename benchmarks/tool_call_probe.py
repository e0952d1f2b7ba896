"""Tool-call probe: LoRA (or full) training on the tools-smoke data, teacher-forced call exact match.

Scores held-out and training rows every --every steps, so one run shows whether a tiny model can learn a call
in CPU minutes, without generation or 4-bit loading (results: benchmarks/README.md, issue 22).
"""
# ruff: noqa: E402, E501, E741  (a research probe: imports after torch's thread setting, short loop names)

import argparse
import math
import random
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import torch

p = argparse.ArgumentParser()
p.add_argument("--model", default="tiny-copy")
p.add_argument(
    "--data", default=str(__import__("pathlib").Path(__file__).resolve().parents[1] / "data" / "sample_tools.jsonl")
)
p.add_argument("--steps", type=int, default=600)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--rank", type=int, default=16)
p.add_argument("--alpha", type=float, default=32)
p.add_argument("--mode", default="lora")  # lora | full | lora+emb
p.add_argument("--bs", type=int, default=4)
p.add_argument("--every", type=int, default=100)
p.add_argument("--name", default="x")
p.add_argument("--cosine", action="store_true")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
from transformers import AutoModelForCausalLM

from mistral_fast.config import load_config
from mistral_fast.dataset import prepare_data
from mistral_fast.modeling.checks import resolve_model_path

cfg = load_config(
    "tools-smoke", {"model.name_or_path": a.model, "data.path": a.data, "train.output_dir": f"/tmp/x/runs/{a.name}"}
)
data = prepare_data(cfg)
path = resolve_model_path(a.model)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
from mistral_fast.tokenizer import load_tokenizer

tok = load_tokenizer("v3")
TC = tok.convert_tokens_to_ids("[TOOL_CALLS]")
ID = tok.convert_tokens_to_ids("id")
if a.mode.startswith("lora"):
    from peft import LoraConfig, get_peft_model

    extra = {"modules_to_save": ["embed_tokens"]} if a.mode == "lora+emb" else {}
    model = get_peft_model(
        model, LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=a.targets.split(","), **extra)
    )
else:
    for n, q in model.named_parameters():
        q.requires_grad = "embed" not in n and "lm_head" not in n
params = [q for q in model.parameters() if q.requires_grad]
print("trainable", sum(q.numel() for q in params))
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)


def rows(ds):
    return [(r["input_ids"], r["labels"]) for r in ds]


train = rows(data.train)
ev = rows(data.eval)


def call_mask(ids, labels):
    """positions (as label positions) of the first call turn, ids excluded."""
    try:
        s = ids.index(TC)
    except ValueError:
        return None
    out = []
    i = s + 1
    toks = tok.convert_ids_to_tokens(ids)
    while i < len(ids) and ids[i] != 2:
        if toks[i] == "id" and toks[i + 1] == '":':
            out += [i, i + 1, i + 2]
            j = i + 3
            while j < len(ids) and not toks[j].startswith('"'):
                j += 1
            i = j
            continue  # skip id chars; continue from closing quote
        out.append(i)
        i += 1
    out.append(i)  # </s>
    return out


def measure(rs, n=40):
    model.eval()
    ex = 0
    cnt = 0
    tokc = 0
    tokn = 0
    with torch.no_grad():
        for ids, lab in rs[:n]:
            m = call_mask(ids, lab)
            if m is None:
                continue
            x = torch.tensor([ids])
            pred = model(x).logits[0].argmax(-1)
            ok = [pred[i - 1].item() == ids[i] for i in m]
            ex += all(ok)
            cnt += 1
            tokc += sum(ok)
            tokn += len(ok)
    model.train()
    return ex / max(cnt, 1), tokc / max(tokn, 1), cnt


from collections import Counter


def dump(rs):
    model.eval()
    c = Counter()
    with torch.no_grad():
        for ids, lab in rs[:40]:
            m = call_mask(ids, lab)
            if m is None:
                continue
            pred = model(torch.tensor([ids])).logits[0].argmax(-1)
            toks = tok.convert_ids_to_tokens(ids)
            for i in m:
                if pred[i - 1].item() != ids[i]:
                    c[(" ".join(toks[i - 3 : i]), toks[i])] += 1
    model.train()
    for k, v in c.most_common(25):
        print("ERR", v, k)


random.seed(0)
t0 = time.time()
losses = []
for step in range(1, a.steps + 1):
    batch = random.sample(train, a.bs)
    L = max(len(i) for i, _ in batch)
    x = torch.tensor([i + [0] * (L - len(i)) for i, _ in batch])
    y = torch.tensor([l + [-100] * (L - len(l)) for _, l in batch])
    att = torch.tensor([[1] * len(i) + [0] * (L - len(i)) for i, _ in batch])
    warm = min(1.0, step / 10)
    if a.cosine:
        warm *= 0.5 * (1 + math.cos(math.pi * step / a.steps))
    for g in opt.param_groups:
        g["lr"] = a.lr * warm
    out = model(input_ids=x, attention_mask=att, labels=y)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()
    losses.append(out.loss.item())
    if step % a.every == 0 or step == a.steps:
        e = measure(ev)
        t = measure(train)
        if step == a.steps:
            dump(ev)
        print(
            f"{a.name} step {step} loss {sum(losses[-a.every :]) / len(losses[-a.every :]):.3f} eval_exact {e[0]:.2f} tok {e[1]:.3f} (n={e[2]}) train_exact {t[0]:.2f} tok {t[1]:.3f} t={time.time() - t0:.0f}s",
            flush=True,
        )
