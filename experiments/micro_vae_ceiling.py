"""How much of each micro concept survives the VAE: the identity score's ceiling for any method.

Every sample a personalized model draws passes through the VAE decoder, so a concept the VAE cannot
reconstruct cannot be learned by any trainable set. For each of the 20 concepts this renders new
views of the concept (``identity.concept_eval_sets``' positives: new seeds, backgrounds, positions,
sizes), scores them against the concept's reference images with the identity embedding (ID, 100 x
mean cosine), then scores the same views after a VAE round trip (encode to the posterior mean,
decode) of each ``--pipeline``. The learned rule (``metrics.learned``) needs half of the gap between
the base model's class samples and the references' self-similarity, so a round-trip ID below that
bar means the concept cannot pass.

    python experiments/micro_vae_ceiling.py --pipeline shipped=src/cns_lightning/assets/micro/pipeline \\
        --pipeline old=/path/to/an/earlier/pipeline --out ceiling.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image

from cns_lightning.evaluation.metrics import self_similarity
from cns_lightning.microworld import concepts as MC
from cns_lightning.microworld import identity as I
from cns_lightning.microworld.assets import micro_pipeline


@torch.no_grad()
def round_trip(vae, images: list[Image.Image]) -> list[Image.Image]:
    """Encode to the posterior mean and decode: what the VAE can give back of ``images``."""
    x = torch.stack([torch.from_numpy(np.array(i.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1 for i in images])
    y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return [Image.fromarray(((t.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for t in y]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", action="append", default=[], help="NAME=FOLDER of a micro pipeline (repeatable)")
    ap.add_argument("--identity", default=str(I.IDENTITY_DIR))
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--out", default=None, help="JSON file for the table's numbers")
    a = ap.parse_args()
    if any("=" not in p for p in a.pipeline):
        ap.error(f"--pipeline takes NAME=FOLDER, got {[p for p in a.pipeline if '=' not in p]}")
    pipes = dict(p.split("=", 1) for p in a.pipeline) or {"shipped": None}
    vaes = {name: micro_pipeline(path).vae.eval() for name, path in pipes.items()}
    embed = I.identity_embedder(a.identity)
    rows = {}
    print("| concept | category | references (self) | new renders | " + " | ".join(f"after the {n} VAE" for n in vaes) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in vaes) + " |")
    for name, c in MC.CONCEPTS.items():
        sets = I.concept_eval_sets(name, n_pos=a.views, n_neg=1)
        refs = embed(sets["references"])
        score = lambda ims: 100 * float((embed(ims) @ refs.T).mean())
        row = {"category": c.category, "references": self_similarity(refs), "renders": score(sets["positives"])}
        for n, vae in vaes.items():
            row[n] = score(round_trip(vae, sets["positives"]))
        rows[name] = row
        print(f"| {name} | {c.category} | {row['references']:.1f} | {row['renders']:.1f} | " + " | ".join(f"{row[n]:.1f}" for n in vaes) + " |", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
