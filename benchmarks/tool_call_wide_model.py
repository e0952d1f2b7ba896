"""Build the 256-wide tiny-copy recipe (issue 22 probe): python benchmarks/tool_call_wide_model.py OUT_DIR."""

import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from mistral_fast.modeling.tiny import TINY_VARIANTS, build_tiny_model

t = time.time()
build_tiny_model(
    sys.argv[1], **TINY_VARIANTS["tiny-copy"], hidden_size=256, num_heads=8, num_kv_heads=4, intermediate_size=896
)
print("built", time.time() - t)
