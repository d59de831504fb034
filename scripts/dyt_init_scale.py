"""Signal scale at initialization of the character LMs with their parent norm and with DyT.

The LMs start from ``transformers``' initialization (embeddings and projections ~ N(0, 0.02)),
which a LayerNorm or RMSNorm rescales to unit scale and DyT (tanh(αx), α = 0.5) does not.
Prints, per model and norm, the mean standard deviation of the norms' inputs and outputs and
of the logits, on random tokens. Run: ``PYTHONPATH=src .venv/bin/python scripts/dyt_init_scale.py``.
"""

from __future__ import annotations

from statistics import fmean

import torch

from ibnorm.baselines import convert_to_dyt
from ibnorm.lab.experiments.models import gpt2_char_model, llama_char_model
from ibnorm.norms import find_norm

VOCAB, BLOCK = 90, 128


def main() -> None:
    for build in (gpt2_char_model, llama_char_model):
        for norm in ("parent", "dyt"):
            torch.manual_seed(0)
            model = build(VOCAB, BLOCK)
            if norm == "dyt":
                model, _ = convert_to_dyt(model)
            seen: list[tuple[float, float]] = []
            for module in model.modules():
                if find_norm(module) is not None or type(module).__name__ == "DyT":
                    module.register_forward_hook(lambda m, args, out: seen.append((args[0].std().item(), out.std().item())))
            with torch.no_grad():
                logits = model(torch.randint(0, VOCAB, (4, BLOCK))).logits
            print(
                f"{build.__name__:16s} {norm:6s} norm input std {fmean(i for i, _ in seen):.4f}  "
                f"norm output std {fmean(o for _, o in seen):.4f}  logits std {logits.std().item():.4f}"
            )


if __name__ == "__main__":
    main()
