"""generate.main on a real tiny run: files, sizes, prompts.json, token checks."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from test_export import tiny_run  # the same session-cached run (tests/ is on sys.path under pytest)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp() / "cns_tiny_run")[0]


def test_generate_writes_images_for_prompts_combining_concepts(run_dir, tmp_path):
    from cns_lightning.generate import main

    out = tmp_path / "imgs"
    prompts = ["a <new1> dog next to a <new2> cat", "a <new2> cat"]
    got = main([str(run_dir), "--prompt", prompts[0], "--prompt", prompts[1], "--n", "2", "--steps", "2", "--seed", "5", "--batch-size", "2", "--out", str(out)])
    assert got == out
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4
    for p in pngs:
        with Image.open(p) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    meta = json.loads((out / "prompts.json").read_text())
    assert [r["prompt"] for r in meta["prompts"]] == prompts
    assert meta["prompts"][0]["tokens"] == ["<new1>", "<new2>"] and meta["prompts"][1]["tokens"] == ["<new2>"]
    assert meta["prompts"][0]["seeds"] == [5, 6] and meta["stage"] == 2
    assert meta["guidance"] == 2.5  # no --guidance: the run's model.guidance_scale (tiny_run sets 2.5)
    assert sorted(f for r in meta["prompts"] for f in r["files"]) == [p.name for p in pngs]
    # same seed, same image: image 2 generated alone (batch of 1) equals image 2 of the batched call
    again = main([str(run_dir), "--prompt", prompts[1], "--n", "1", "--steps", "2", "--seed", "6", "--out", str(tmp_path / "one")])
    with Image.open(again / "p00_i00.png") as a, Image.open(out / "p01_i01.png") as b:
        assert a.tobytes() == b.tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "one"], "temp folders left behind"


def test_generate_rejects_tokens_not_learned(run_dir, tmp_path):
    from cns_lightning.generate import main

    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        main([str(run_dir), "--prompt", "a <new1> dog and a <new7> bird", "--n", "1", "--steps", "2", "--out", str(out)])
    msg = str(e.value)
    assert "token <new7> is not a token of this run" in msg and "<new1> (a, a dog)" in msg and "<new2> (b, a cat)" in msg
    # learned by the run, but not by stage 1
    with pytest.raises(SystemExit) as e:
        main([str(run_dir), "--prompt", "a <new2> cat", "--stage", "1", "--n", "1", "--steps", "2", "--out", str(out)])
    msg = str(e.value)
    assert "token <new2> is learned at stage 2" in msg and "--stage 2" in msg and "<new1> (a, a dog)" in msg and "(b, a cat)" not in msg
    with pytest.raises(SystemExit, match="stage=3 is out of range"):
        main([str(run_dir), "--prompt", "a <new1> dog", "--stage", "3", "--out", str(out)])
    assert not out.exists() and not list(tmp_path.iterdir())
    # argparse: --prompt is required, the exit code is non-zero
    with pytest.raises(SystemExit) as e:
        main([str(run_dir)])
    assert e.value.code == 2
