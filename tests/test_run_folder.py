"""run_folder.py: which differences keep a run folder from resuming, from the knob declarations."""

from __future__ import annotations

import json

import pytest

from cns_lightning.run_folder import RunFolderError, check_run_folder, differences, flat, run_identity
from conftest import FIXTURES, compose_cfg

FIXTURE = ["data.concepts=[{name:dog_patch,source:microworld},{name:cup_heart,source:microworld},{name:cat_tabby,source:microworld}]",
           "method.steps=4", "prior.num_images=2", "prior.num_inference_steps=2"]


@pytest.mark.parametrize("method", ["cns", "textual_inversion", "full_kv"])
def test_an_identity_of_the_release_before_methods_matches_its_command(tmp_path, method):
    old = json.loads((FIXTURES / "runs_v0" / method / "run_identity.json").read_text())
    assert "method.neurons" in flat(old) and "method._target_" not in flat(old)
    cfg = compose_cfg(tmp_path, [*FIXTURE, f"method={method}"])
    assert differences(old, run_identity(cfg), cfg) == []
    other = compose_cfg(tmp_path, [*FIXTURE, f"method={method}", "method.steps=5"])
    assert differences(old, run_identity(other), other) == ["method.steps"]


def test_declared_knobs_decide(tmp_path):
    cfg = compose_cfg(tmp_path, ["method=cns"])
    base = run_identity(cfg)
    for override, expected in [("data.num_workers=3", []), ("prior.batch_size=1", []), ("method.lambda1=0.5", ["method.lambda1"]),
                               ("method.selection.ratio=0.2", ["method.selection.ratio"])]:
        new = compose_cfg(tmp_path, ["method=cns", override])
        assert differences(base, run_identity(new), new) == expected, override
    older = json.loads(json.dumps(base))
    del older["prior"]["compile"]  # a knob declared ``added``: a folder made before it resumes
    assert differences(older, base, cfg) == []
    del older["seed"]  # not declared ``added``: a real difference
    assert differences(older, base, cfg) == ["seed"]


def test_only_resumable_knobs_change_on_resume_and_only_when_asked(tmp_path):
    run = tmp_path / "run"
    (run / "stages" / "01_a").mkdir(parents=True)
    (run / "stages" / "01_a" / "manifest.json").write_text("{}")  # a completed stage
    check_run_folder(run, compose_cfg(tmp_path, ["method=cns"]))
    with pytest.raises(RunFolderError, match=r"method.lr_neurons differ\), so it cannot be resumed. To keep the completed stages .*\+resume_with_changes=true"):
        check_run_folder(run, compose_cfg(tmp_path, ["method=cns", "method.lr_neurons=1e-6"]))
    check_run_folder(run, compose_cfg(tmp_path, ["method=cns", "method.lr_neurons=1e-6", "+resume_with_changes=true"]))
    assert json.loads((run / "run_identity.json").read_text())["_changes"] == [{"method.lr_neurons": [3e-5, 1e-6]}]
    with pytest.raises(RunFolderError, match=r"method.selection.tokens differ\), so it cannot be resumed. Give this run"):
        check_run_folder(run, compose_cfg(tmp_path, ["method=cns", "method.lr_neurons=1e-6", "method.selection.tokens=all", "+resume_with_changes=true"]))


def test_concepts_added_after_the_folders_extend_it_and_other_changes_are_refused(tmp_path):
    run = tmp_path / "run"
    (run / "stages" / "01_a").mkdir(parents=True)
    (run / "stages" / "01_a" / "manifest.json").write_text("{}")  # a completed stage
    a, b, c = ("{name:a,class_name:dog,path:/x/a}", "{name:b,class_name:cup,path:/x/b}", "{name:c,class_name:cat,path:/x/c}")
    check_run_folder(run, compose_cfg(tmp_path, [f"data.concepts=[{a},{b}]"]))
    assert check_run_folder(run, compose_cfg(tmp_path, [f"data.concepts=[{a},{b},{c}]"])) == 1
    assert [e["name"] for e in json.loads((run / "run_identity.json").read_text())["data"]["concepts"]] == ["a", "b", "c"]
    for concepts, says in [
        (f"[{a},{b}]", r"the folder's sequence has 3 concepts, this command 2 \(c removed\)"),
        (f"[{b},{a},{c}]", r"data.concepts\[0\] was 'a' and is now 'b' \('a' moved to position 1\)"),
        (f"[{a},{{name:b,class_name:mug,path:/x/b}},{c}]", r"data.concepts\[1\] \(b\) changed: class_name 'cup' -> 'mug'"),
        (f"[{a},{c},{b}]", r"data.concepts\[1\] was 'b' and is now 'c'"),
    ]:
        with pytest.raises(RunFolderError, match=says + r".*A run can only be extended.*its own run folder.*cns_lightning.export"):
            check_run_folder(run, compose_cfg(tmp_path, [f"data.concepts={concepts}"]))
    # an extension together with another change still needs that change to be allowed
    with pytest.raises(RunFolderError, match=r"method.lambda1 differ"):
        check_run_folder(run, compose_cfg(tmp_path, [f"data.concepts=[{a},{b},{c},{{name:d,class_name:car,path:/x/d}}]", "method.lambda1=0.5"]))
