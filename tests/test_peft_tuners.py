"""PEFT's other tuners (AdaLoRA, IA³, LoHa, LoKr, VeRA, OFT, BOFT), made by PEFT itself on a
tiny Llama and a tiny BERT (which has biases), their weights randomised (PEFT initialises many
to the identity): merge equals PEFT's ``merge_and_unload()`` bit for bit in float32, unmerge
gives the base back, inspect tells each, convert to LoRA reports the error an independent
SVD measures, and the steps that need LoRA factors refuse in one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loratool
from loratool.errors import FormatError

from conftest import cli, llama_config

TUNERS = ["adalora", "ia3", "loha", "lokr", "vera", "oft", "boft"]
MODELS = ["llama", "bert"]
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"],
           "bert": ["query", "value", "output.dense"]}
FEEDFORWARD = {"llama": ["down_proj"], "bert": ["output.dense"]}


def tuner_config(kind: str, model: str):  # type: ignore[no-untyped-def]
    """Small configs; the non-default settings that change the math are exercised: LoKr with
    both sides whole and one factored, OFT's Neumann series, BOFT's scale."""
    import peft

    t = TARGETS[model]
    return {
        "adalora": lambda: peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8,
                                              target_modules=t, total_step=10),
        "ia3": lambda: peft.IA3Config(target_modules=t, feedforward_modules=FEEDFORWARD[model]),
        "loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=t,
                                        rank_pattern={"v_proj": 2, "value": 2}),
        "lokr": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=t),
        "vera": lambda: peft.VeraConfig(r=4, target_modules=t),
        "oft": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=t),
        "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=t),
    }[kind]()


def base_model(model: str):  # type: ignore[no-untyped-def]
    from transformers import BertConfig, BertModel, LlamaForCausalLM

    torch.manual_seed(0)
    if model == "llama":
        return LlamaForCausalLM(llama_config()).eval()
    bert = BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, vocab_size=100,
                                max_position_embeddings=64)).eval()
    with torch.no_grad():  # BERT initialises its biases to zero: IA³'s scaling would not show
        for name, p in bert.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return bert


def randomise(peft_model, seed: int) -> None:  # type: ignore[no-untyped-def]
    """Every trainable adapter value random (IA³'s l and BOFT's s around 1, OFT/BOFT's
    generators small, as training leaves them), so that a wrong formula shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if not p.requires_grad and "vera_" not in name:
                continue
            noise = torch.randn(p.shape, generator=g)
            if "ia3_l" in name or "boft_s" in name:
                p.copy_(1 + 0.3 * noise)
            elif "oft_R" in name or "boft_R" in name:
                p.copy_(0.05 * noise)
            else:
                p.copy_(0.2 * noise)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[tuple[str, str], dict[str, object]]:
    """Per (tuner, model): the base folder, the adapter folder, PEFT's merged state dict."""
    import peft

    out: dict[tuple[str, str], dict[str, object]] = {}
    for model in MODELS:
        base = base_model(model)
        base_dir = tmp_path_factory.mktemp(f"{model}_base")
        base.save_pretrained(base_dir)
        for i, kind in enumerate(TUNERS):
            pm = peft.get_peft_model(copy.deepcopy(base), tuner_config(kind, model))
            randomise(pm, i)
            d = tmp_path_factory.mktemp(f"{model}_{kind}")
            pm.save_pretrained(d)
            merged = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
            out[kind, model] = {"base": base_dir, "adapter": d, "merged": merged}
    return out


def _merged_file(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


CASES = [(k, m) for k in TUNERS for m in MODELS]


@pytest.mark.parametrize("kind,model", CASES)
def test_merge_equals_peft_and_unmerge_gives_the_base_back(made, tmp_path: Path, kind: str,
                                                           model: str) -> None:
    c = made[kind, model]
    out = tmp_path / "merged"
    report = loratool.merge(c["base"], [c["adapter"]], out, verify=True)
    assert report.verify is not None and report.verify.ok
    print(kind, model, "verify ratio", report.verify.ratio)
    got = _merged_file(out)
    want = c["merged"]
    changed = 0
    base = _merged_file(Path(c["base"]))
    for name, t in got.items():
        assert torch.equal(t, want[name]), (kind, model, name,
                                            float((t - want[name]).abs().max()))
        changed += not torch.equal(t, base[name])
    assert changed == report.tensors_changed and changed >= 6
    back = tmp_path / "back"
    u = loratool.unmerge(out, [c["adapter"]], back, verify=True)
    print(kind, model, "unmerge verify ratio", u.verify.ratio)
    restored = _merged_file(back)
    for name, t in base.items():  # bit for bit: the merge's record holds what rounding lost
        assert torch.equal(restored[name], t), (kind, model, name)
