"""restore.load_run and export.export_pipeline on a real tiny run (2 concepts, 3 steps each).

The run goes through the real loop in-process (``hydra.compose`` + ``continual.run``); an
evaluator (the loop's own hook, ``cfg.eval``) snapshots the in-memory UNet and text encoder after
each stage, so the restored and exported models are compared with the models the loop held.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cns_lightning.models import cross_attention_kv

ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = [("a", "dog"), ("b", "cat")]
_RUNS: dict[str, tuple[Path, list[dict]]] = {}


class StageSnapshots:
    """An evaluator for the loop (``cfg.eval``): keeps a copy of the model after every stage."""

    stages: list[dict] = []  # [base model (tokens added), after stage 1, after stage 2, ...]

    def setup(self, run_dir, concepts, device):
        StageSnapshots.stages = []

    @staticmethod
    def snapshot(pipe) -> dict:
        return dict(
            unet={k: v.detach().clone() for k, v in pipe.unet.state_dict().items()},
            text={k: v.detach().clone() for k, v in pipe.text_encoder.state_dict().items()},
        )

    def before_training(self, pipe):
        StageSnapshots.stages.append(self.snapshot(pipe))

    def after_stage(self, pipe, stage, concepts):
        StageSnapshots.stages.append(self.snapshot(pipe))
        return {}

    def finish(self, pipe, concepts):
        pass

    def is_evaluated(self, stage):
        return stage < len(StageSnapshots.stages)

    def stage_images(self, stage):
        return None

    def stage_tables(self):
        return None


def tiny_run(root: Path) -> tuple[Path, list[dict]]:
    """A finished 2-concept run on the tiny model (made once per session) and its in-memory
    snapshots: ``snaps[0]`` the base model with the tokens added, ``snaps[m]`` after stage m."""
    if "run" in _RUNS:
        return _RUNS["run"]
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from cns_lightning.continual import run

    rng = np.random.default_rng(0)
    for name, _ in CONCEPTS:
        folder = root / "images" / name
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    concepts = ",".join(f"{{name:{n},class_name:{c},path:{root / 'images' / n}}}" for n, c in CONCEPTS)
    run_dir = root / "run"
    with initialize_config_dir(config_dir=str(ROOT / "src" / "cns_lightning" / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"data.concepts=[{concepts}]", "method.steps=3", "prior.num_images=1", "prior.num_inference_steps=2",
                "calibration.num_prompts=4", f"paths.run_dir={run_dir}", f"paths.cache_dir={root / 'cache'}",
                "device=cpu", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
                "model.guidance_scale=2.5",  # generate and the model card take it (not a fixed 6.0)
                "data.token_init=random",  # restore must rebuild the not-yet-learned token's random row
            ],
        )
    with open_dict(cfg):
        cfg.eval = OmegaConf.create({"_target_": f"{__name__}.StageSnapshots"})
        cfg.logger = None
    result = run(cfg)
    assert result["status"] == "complete"
    assert len(StageSnapshots.stages) == 1 + len(CONCEPTS)
    _RUNS["run"] = (run_dir, list(StageSnapshots.stages))
    return _RUNS["run"]


@pytest.fixture(scope="module")
def run_and_snapshots(tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp() / "cns_tiny_run")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k} differs"


def token_key(state: dict) -> str:
    """The text encoder's token-embedding weight in a state dict (its prefix varies by transformers version)."""
    (key,) = [k for k in state if k.endswith("token_embedding.weight")]
    return key


# ----------------------------------------------------------------------------------- restore
def test_restore_is_bit_identical_to_the_loop_after_every_stage(run_and_snapshots):
    from cns_lightning.restore import check_stage, load_run, read_run

    run_dir, snaps = run_and_snapshots
    for stage in range(1, len(CONCEPTS) + 1):
        pipe, learned = load_run(run_dir, stage=stage)
        assert [c.name for c in learned] == [n for n, _ in CONCEPTS[:stage]]
        assert_same(pipe.unet.state_dict(), snaps[stage]["unet"], f"unet after stage {stage}")
        assert_same(pipe.text_encoder.state_dict(), snaps[stage]["text"], f"text encoder after stage {stage}")
    # every stage really changed K/V and its token row (else the comparison above proves little)
    kv = cross_attention_kv(pipe.unet)
    key = token_key(snaps[0]["text"])
    ids = pipe.tokenizer.convert_tokens_to_ids(["<new1>", "<new2>"])
    for m in (1, 2):
        assert any(not torch.equal(snaps[m - 1]["unet"][k], snaps[m]["unet"][k]) for k in kv)
        assert not torch.equal(snaps[m - 1]["text"][key][ids[m - 1]], snaps[m]["text"][key][ids[m - 1]])
    # default: the last completed stage
    assert check_stage(read_run(run_dir), None) == len(CONCEPTS)


def test_restore_errors_name_the_folder_and_the_fix(run_and_snapshots, tmp_path):
    from cns_lightning.restore import RestoreError, load_run

    run_dir, _ = run_and_snapshots
    with pytest.raises(RestoreError, match=r"not a run folder \(no config.yaml\)"):
        load_run(tmp_path)
    with pytest.raises(RestoreError, match="no such folder"):
        load_run(tmp_path / "missing")
    for bad in (0, 3):
        with pytest.raises(RestoreError, match=rf"stage={bad} is out of range: stages 1..2 are complete .*Pass a stage from 1 to 2"):
            load_run(run_dir, stage=bad)
    # a run whose first stage has not finished
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    with pytest.raises(RestoreError, match=rf"{fresh}: no completed stage yet .*rerun its command"):
        load_run(fresh)


def test_restore_reads_only_and_reports_a_damaged_stage(run_and_snapshots, tmp_path):
    import shutil

    from cns_lightning.restore import RestoreError, load_run

    run_dir, snaps = run_and_snapshots
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "stages" / "03_c.partial").mkdir()  # a stage still being written by a live run
    kv = copy / "stages" / "02_b" / "kv.safetensors"
    data = bytearray(kv.read_bytes())
    data[-1] ^= 1
    kv.write_bytes(bytes(data))
    with pytest.raises(RestoreError, match=r"02_b/kv.safetensors: file was modified or damaged.*restore an earlier stage \(stage=1 / --stage 1\)"):
        load_run(copy)
    pipe, _ = load_run(copy, stage=1)  # the stages before it still restore
    assert_same(pipe.unet.state_dict(), snaps[1]["unet"], "stage 1 of the damaged copy")
    # nothing was deleted or repaired (the loop's completed_stages would remove these)
    assert kv.read_bytes() == bytes(data) and (copy / "stages" / "03_c.partial").is_dir()


# ------------------------------------------------------------------------------------ export
def test_export_loads_with_plain_diffusers_and_matches_the_restored_run(run_and_snapshots, tmp_path):
    from diffusers import StableDiffusionPipeline

    from cns_lightning.export import main

    run_dir, snaps = run_and_snapshots
    out = tmp_path / "export"
    main([str(run_dir), str(out)])
    card = (out / "README.md").read_text()
    assert "`<new1>`" in card and "`<new2>`" in card
    assert "guidance_scale=2.5" in card and "6.0" not in card  # the run's model.guidance_scale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"], "temp folder left behind"
    # a standard folder: every component is a diffusers / transformers class (no custom code to load)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert {v[0] for k, v in index.items() if isinstance(v, list) and v[0]} == {"diffusers", "transformers"}

    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    tok = pipe.tokenizer
    assert tok.convert_tokens_to_ids(["<new1>", "<new2>"]) == [49408, 49409]
    assert tok.tokenize("a <new1> dog next to a <new2> cat") == ["a</w>", "<new1>", "dog</w>", "next</w>", "to</w>", "a</w>", "<new2>", "cat</w>"]
    # bit-exact: the exported weights are the loop's final model, which restore reproduces
    # (test above); so K/V, token rows and every other weight equal the restored run's
    assert_same(pipe.unet.state_dict(), snaps[-1]["unet"], "exported unet")
    assert_same(pipe.text_encoder.state_dict(), snaps[-1]["text"], "exported text encoder")
    # the saved tokenizer splits text exactly as the project's tokenizer does
    from cns_lightning.tokenizer import clip_tokenizer

    ref = clip_tokenizer()
    ref.add_tokens(["<new1>", "<new2>"])
    for text in ("a <new1> dog next to a <new2> cat", "A photo of the Eiffel tower, 4k!", "<new2><new1> and émigré"):
        assert tok(text).input_ids == ref(text).input_ids
    # the slow-format files beside tokenizer.json (as SD-1.5 ships them) give the same tokenizer
    from transformers import CLIPTokenizer

    d = out / "tokenizer"
    slow = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), **json.loads((d / "special_tokens_map.json").read_text()))
    added = json.loads((d / "added_tokens.json").read_text())
    assert added == {"<new1>": 49408, "<new2>": 49409}
    slow.add_tokens(list(added))
    for text in ("a <new1> dog next to a <new2> cat", "A photo of the Eiffel tower, 4k!"):
        assert slow(text).input_ids == ref(text).input_ids
    image = pipe("a <new1> dog next to a <new2> cat", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_export_of_an_earlier_stage_holds_only_its_tokens(run_and_snapshots, tmp_path):
    from diffusers import StableDiffusionPipeline

    from cns_lightning.export import export_pipeline

    run_dir, snaps = run_and_snapshots
    out = export_pipeline(run_dir, tmp_path / "s1", stage=1)
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert "<new1>" in pipe.tokenizer.get_vocab() and "<new2>" not in pipe.tokenizer.get_vocab()
    assert_same(pipe.unet.state_dict(), snaps[1]["unet"], "stage-1 export unet")
    key = token_key(snaps[1]["text"])
    emb, loop = pipe.text_encoder.state_dict()[key], snaps[1]["text"][key]
    assert emb.shape[0] == loop.shape[0] - 1 and torch.equal(emb, loop[:-1])  # all but <new2>
    assert json.loads((out / "cns_concepts.json").read_text())["stage"] == 1


def test_export_refuses_to_overwrite_and_is_atomic(run_and_snapshots, tmp_path):
    from cns_lightning.export import main

    run_dir, _ = run_and_snapshots
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"exists and is not empty; .*--overwrite"):
        main([str(run_dir), str(out)])
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit, match="stage=5 is out of range"):
        main([str(run_dir), str(tmp_path / "x"), "--stage", "5"])
    with pytest.raises(SystemExit, match="the run folder"):
        main([str(run_dir), str(run_dir / "export"), "--overwrite"])
    assert not (tmp_path / "x").exists() and not (run_dir / "export").exists()
    main([str(run_dir), str(out), "--overwrite", "--stage", "1"])
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"], "temp folders left behind"
    # SystemExit with a message: Python prints it and exits with status 1
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), str(tmp_path / "y")])
    assert isinstance(e.value.code, str) and "not a run folder" in e.value.code
