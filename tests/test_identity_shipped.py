"""The shipped micro identity model (``src/cns_lightning/assets/micro/identity/``, trained on a GPU
with ``python -m cns_lightning.microworld.identity train``): it must tell every personal concept
from its class (AUC >= 0.95, issue 14). Kept apart from tests/test_identity.py so its result is
seen on its own.

``style_halftone`` misses the target (AUC 0.72 to 0.82 depending on the sample): the model does not
see two halftone renders of different content as alike (self-similarity 0.23). It is marked as an
expected failure, strictly, so the mark has to go as soon as a retrained model reaches 0.95.
"""

from __future__ import annotations

import pytest

from cns_lightning.microworld import concepts as MC
from cns_lightning.microworld import identity as I

BELOW_TARGET = {"style_halftone"}


@pytest.fixture(scope="module")
def results():
    folder = I.IDENTITY_DIR
    assert (folder / "config.json").is_file() and (folder / "preprocessor_config.json").is_file(), (
        f"{folder} holds no identity model (config.json + preprocessor_config.json): train one on a GPU with "
        "`python -m cns_lightning.microworld.identity train --out DIR --device cuda` and copy DIR/model/ there"
    )
    # 12 held-out positives and 24 negatives per concept, on another seed than the eval command's
    out = I.evaluate(folder, n_pos=12, n_neg=24, seed=1, with_clip=False)
    assert len(out) == 20
    return out


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="AUC below 0.95 (docs/microworld.md)")) if n in BELOW_TARGET else n for n in MC.CONCEPTS]
)
def test_shipped_identity_model_ranks_the_concept_above_its_class(results, name):
    assert results[name]["auc"] >= 0.95, f"AUC {results[name]['auc']:.3f} < 0.95 for {name}\n{I.format_table(results)}"
