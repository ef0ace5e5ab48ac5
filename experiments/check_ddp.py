"""DDP correctness (issue 5): `torchrun --nproc_per_node=2 experiments/check_ddp.py [--gpu]`.

On the ``tiny`` pipeline with 2 ranks (gloo on the CPU, or NCCL with --gpu): prior images are
generated split across the ranks into one folder; one masked stage trains under Lightning's DDP
(src/cns_lightning/conf/trainer/ddp.yaml's settings: strategy ddp, no distributed sampler; ``--strategy masked``:
src/cns_lightning/conf/trainer/ddp_masked.yaml's MaskedDDPStrategy, which all-reduces only the masked gradient
entries; ``--strategy compact``: src/cns_lightning/conf/trainer/ddp_compact.yaml's CompactGradStrategy, no DDP
wrapper, one all-reduce of the optimizer's compact gradients); then every rank's K/V
and token embeddings must be bit-identical, entries outside the mask unchanged, and only rank 0
writes the stage folder. Prints one line per check; exits non-zero on a failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cns_lightning.checkpoint import hash_tensors  # noqa: E402
from cns_lightning.concepts import Concept  # noqa: E402
from cns_lightning.data import ConceptDataModule  # noqa: E402
from cns_lightning.distributed import CompactGradStrategy, MaskedDDPStrategy  # noqa: E402
from cns_lightning.models import build_random_pipeline, cross_attention_kv  # noqa: E402
from cns_lightning.methods.base import StageFiles  # noqa: E402
from cns_lightning.methods.kv_store import kv_file, mask_file  # noqa: E402
from cns_lightning.methods.stage import MaskedStage  # noqa: E402
from cns_lightning.module import ContinualModule  # noqa: E402
from cns_lightning.prior import prior_images  # noqa: E402
from cns_lightning.state import stage_dir, write_stage  # noqa: E402
from cns_lightning.tokens import add_concept_tokens  # noqa: E402


STRATEGIES = {"ddp": lambda: "ddp", "masked": MaskedDDPStrategy, "compact": CompactGradStrategy}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--strategy", choices=list(STRATEGIES), default="ddp",
                    help="ddp: Lightning DDP; masked: MaskedDDPStrategy; compact: CompactGradStrategy")
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "cns_check_ddp"))
    args = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("nccl" if args.gpu else "gloo")
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if args.gpu else "cpu"
    if args.gpu:
        torch.cuda.set_device(device)
    root = Path(args.root) / os.environ.get("TORCHELASTIC_RUN_ID", "run")
    folder = root / "concept"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (48, 48, 3)).astype("uint8")).save(folder / f"{i:02d}.png")
    dist.barrier()
    L.seed_everything(0, verbose=False)
    pipe = build_random_pipeline("tiny")
    concept = Concept(name="c0", token="<new1>", class_name="toy", path=folder)
    ids = add_concept_tokens(pipe.tokenizer, pipe.text_encoder, [concept])
    pipe.to(device)
    priors = prior_images(pipe, "a toy", 6, root / "cache", resolution=32, num_inference_steps=2, batch_size=2)
    checks = {"prior images: all 6 written once, split over ranks": len(priors) == 6}
    module = ContinualModule(pipe)
    g = torch.Generator().manual_seed(0)
    kv = cross_attention_kv(pipe.unet)
    masks = {n: (torch.rand(p.shape, generator=g) < 0.2).to(device) for n, p in kv.items()}
    before = {n: p.detach().cpu().clone() for n, p in kv.items()}
    initial = {n: p.detach().clone() for n, p in kv.items()}
    emb = pipe.text_encoder.get_input_embeddings().weight
    module.begin_stage(MaskedStage(key="c01", token_ids=[ids["c0"]], kv={n: (p, masks[n]) for n, p in kv.items()}, embeddings=emb, lr_kv=1e-2, lr_token=1e-2))
    dm = ConceptDataModule(concept, pipe.tokenizer, 32, steps=8, batch_size=2, vae=pipe.vae, seed=0, prior_images=priors, prior_prompt="a toy")
    trainer = L.Trainer(max_steps=8, accelerator="gpu" if args.gpu else "cpu", devices=world, strategy=STRATEGIES[args.strategy](),
                        use_distributed_sampler=False, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, precision="bf16-mixed" if args.gpu else "32-true")
    trainer.fit(module, datamodule=dm)
    module.end_stage()
    digest = hash_tensors([*kv.values(), emb]).hexdigest()
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    checks["K/V and token embeddings identical on every rank"] = len(set(digests)) == 1
    after = {n: p.detach().cpu() for n, p in kv.items()}
    cpu_masks = {n: m.cpu() for n, m in masks.items()}
    checks["entries outside the mask unchanged"] = all(torch.equal(after[n][~cpu_masks[n]], before[n][~cpu_masks[n]]) for n in masks)
    checks["entries inside the mask trained"] = any(not torch.equal(after[n][cpu_masks[n]], before[n][cpu_masks[n]]) for n in masks)
    # ranks drew different samples: compare the first sampled indices of each rank's loader
    first = list(iter(dm.train_dataloader().sampler))[:6]
    firsts = [None] * world
    dist.all_gather_object(firsts, first)
    checks["each rank samples its own data"] = len({tuple(f) for f in firsts}) == world
    # every rank calls write_stage (as the loop does), each into its own folder: only rank 0's appears
    files = StageFiles(tensors={"kv.safetensors": kv_file(dict(kv), initial, [masks]), "masks.safetensors": mask_file(masks),
                                "token.safetensors": ({"embedding": emb[ids["c0"]].detach().float().cpu()}, None)})
    write_stage(stage_dir(root / f"run{rank}", 0, "c0"), files, {"concept": "c0"})
    dist.barrier()
    written = [r for r in range(world) if (stage_dir(root / f"run{r}", 0, "c0") / "manifest.json").is_file()]
    checks["only rank 0 writes the stage folder"] = written == [0]
    ok = all(checks.values())
    if rank == 0:
        for k, v in checks.items():
            print(f"[{'PASS' if v else 'FAIL'}] {k}")
        print(f"world={world} backend={dist.get_backend()} digests={sorted(set(digests))}")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
