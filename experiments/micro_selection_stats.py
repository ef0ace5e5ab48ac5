"""What shapes CNS on the micro world: Eq. 3-6 statistics of every micro concept on a micro pipeline.

Per concept: the base, general and concept densities and the share of base neurons that are
general (the paper reports about 53% on SD-1.5), and per layer the mean concept density over the
concepts. CPU, seconds; no training.

    python experiments/micro_selection_stats.py [--model PIPELINE_DIR] [--ratio 0.1] [--tokens no_bos]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from cns_lightning.microworld import concepts as MC
from cns_lightning.microworld.assets import micro_pipeline
from cns_lightning.models import cross_attention_kv
from cns_lightning.selection import SelectionConfig, encode_norms, select_concept_neurons


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--tokens", default="no_bos")
    a = ap.parse_args()
    pipe = micro_pipeline(a.model)
    cfg = SelectionConfig(ratio=a.ratio, tokens=a.tokens)
    pipe.tokenizer.add_tokens(["<new1>"])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    kv = {n: p.detach() for n, p in cross_attention_kv(pipe.unet).items()}
    with torch.no_grad():
        calib = encode_norms(pipe.text_encoder, pipe.tokenizer, MC.calibration_prompts(20), cfg.tokens)
    width = pipe.text_encoder.config.hidden_size
    print(f"text width {width}, {sum(w.numel() for w in kv.values())} K/V entries in {len(kv)} tensors, {cfg}")
    print(f"| concept | category | base density | general density | concept density | general share of base |")
    print("| --- | --- | --- | --- | --- | --- |")
    per_layer: dict[str, list[float]] = defaultdict(list)
    shares = []
    for name, c in MC.CONCEPTS.items():
        caps = [s.caption().replace("{token}", "<new1>") for s in c.scenes()]
        with torch.no_grad():  # the token starts as its class noun, as tokens.add_concept_tokens does
            emb = pipe.text_encoder.get_input_embeddings().weight
            emb[-1] = emb[pipe.tokenizer(c.class_name, add_special_tokens=False).input_ids].mean(0)
            norms = encode_norms(pipe.text_encoder, pipe.tokenizer, caps, cfg.tokens)
            _, stats = select_concept_neurons(kv, norms, calib, cfg)
        t = stats["total"]
        shares.append(t["general_share_of_base"])
        for layer, v in stats["layers"].items():
            per_layer[layer].append(v["concept_density"])
        print(f"| {name} | {c.category} | {t['base_density']:.4f} | {t['general_density']:.4f} | {t['concept_density']:.4f} | {t['general_share_of_base']:.3f} |")
    print(f"\nmean general share of base: {sum(shares) / len(shares):.3f} (the paper: about 0.53 on SD-1.5)\n")
    print("| layer | mean concept density |")
    print("| --- | --- |")
    for layer, v in per_layer.items():
        print(f"| {layer.replace('.transformer_blocks.0.attn2.', ' ').replace('.weight', '')} | {sum(v) / len(v):.4f} |")


if __name__ == "__main__":
    main()
