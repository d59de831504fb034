"""Quick A/B: a tiny character-level GPT-2 with LayerNorm vs the same model converted to IBNorm.

Trains each arm for the same number of steps, from the same initial weights and on the same
batches of Python's own documentation text (``pydoc_data.topics``), then writes
``<out>/report.md`` with validation loss in bits per character before and after training.
One seed, 50 steps: a smoke test of the pipeline, not evidence about IBNorm.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

import ibnorm


def load_corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def build_model(vocab: int, block: int, seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_positions=block, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(config)


@torch.no_grad()
def bits_per_char(model: torch.nn.Module, data: torch.Tensor, block: int, batches: int = 8) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    starts = torch.randint(0, len(data) - block - 1, (batches, 16), generator=gen)
    losses = [model(data[s[:, None] + torch.arange(block)], labels=data[s[:, None] + torch.arange(block)]).loss for s in starts]
    model.train()
    return float(torch.stack(losses).mean()) / math.log(2)


def train(model: torch.nn.Module, data: torch.Tensor, block: int, steps: int, seed: int, label: str) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=f"train {label}", leave=False):
        idx = torch.randint(0, len(data) - block - 1, (16, 1), generator=gen) + torch.arange(block)
        loss = model(data[idx], labels=data[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    text = load_corpus()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    block = 64

    base = build_model(len(chars), block, args.seed)
    arms = {"LayerNorm (parent)": copy.deepcopy(base)}
    for compression, lam in (("L", 1.0), ("T", 1.0)):
        model, record = ibnorm.convert_norms(copy.deepcopy(base), compression, lam)
        arms[f"IBNorm-{compression} (λ={lam})"] = model
    print(record)

    rows = []
    for label, model in arms.items():
        before = bits_per_char(model, val_data, block)
        seconds = train(model, train_data, block, args.steps, args.seed, label)
        after = bits_per_char(model, val_data, block)
        rows.append((label, before, after, seconds))
        print(f"{label:22s} val bits/char {before:.3f} -> {after:.3f}  ({seconds:.1f} s)")

    parent_after, parent_time = rows[0][2], rows[0][3]
    lines = [
        "# ibnorm demo: tiny GPT-2 on pydoc_data.topics characters",
        "",
        f"{len(text):,} characters, {len(chars)} symbols, 90/10 split; {args.steps} AdamW steps of 16×{block}; "
        f"seed {args.seed}; same initial weights and batches for every arm.",
        "One seed and few steps: differences here are not evidence either way.",
        "",
        "| arm | val bits/char before | after | Δ vs parent | train time (s) | time vs parent |",
        "|---|---|---|---|---|---|",
    ]
    for label, before, after, seconds in rows:
        lines.append(
            f"| {label} | {before:.3f} | {after:.3f} | {after - parent_after:+.3f} | {seconds:.1f} | "
            f"{seconds / parent_time:.2f}x |"
        )
    best = min(rows, key=lambda r: r[2])
    lines += ["", f"Lowest validation loss after training: **{best[0]}** ({best[2]:.3f} bits/char)."]
    write_atomic(args.out / "report.md", "\n".join(lines) + "\n")
    print(f"report written to {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
