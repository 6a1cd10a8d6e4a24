"""GPTQ or AWQ with GPTQModel called directly: the floor quantkit's gptq/awq steps are compared with.

The same work as quantkit's step: tokenize the calibration text once, take the same seeded
windows, load, quantize, save. No store, no verification, no tokenizer copy.

    python benchmarks/gptqmodel_direct.py gptq|awq MODEL_DIR CALIBRATION.txt --out DIR [--bits 4 ...]
"""

from __future__ import annotations

import argparse
import os
import random

if (os.cpu_count() or 1) <= 2:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel cannot run with one CPU worker

import torch  # noqa: E402
from gptqmodel import BACKEND, GPTQModel  # noqa: E402
from gptqmodel.quantization.config import FORMAT, AWQConfig, GPTQConfig  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("method", choices=["gptq", "awq"])
    ap.add_argument("model")
    ap.add_argument("calibration")
    ap.add_argument("--out", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--desc-act", default="True", help="GPTQ")
    ap.add_argument("--damp", type=float, default=0.1, help="GPTQ")
    ap.add_argument("--zero-point", default="True", help="AWQ")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    ids = AutoTokenizer.from_pretrained(a.model)(open(a.calibration, encoding="utf-8").read(),
                                                 add_special_tokens=False, verbose=False)["input_ids"]
    rng = random.Random(a.seed)
    offsets = sorted(rng.sample(range(len(ids) - a.seq_len + 1), a.samples))
    windows = [ids[o:o + a.seq_len] for o in offsets]
    torch.manual_seed(a.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.method == "gptq":
        config = GPTQConfig(bits=a.bits, group_size=a.group_size, desc_act=a.desc_act == "True",
                            act_group_aware=False, damp_percent=a.damp)
        backend = BACKEND.AUTO
    else:
        config = AWQConfig(bits=a.bits, group_size=a.group_size, sym=a.zero_point != "True", format=FORMAT.GEMM)
        backend = BACKEND.AWQ_TORCH if device == "cpu" else BACKEND.AUTO  # the GEMM packer asks for CUDA
    model = GPTQModel.load(a.model, config, device=device)
    model.quantize([{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows], batch_size=1,
                   backend=backend)
    model.save(a.out)


if __name__ == "__main__":
    main()
