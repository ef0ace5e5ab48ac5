"""The shipped micro identity model (``src/cns_lightning/assets/micro/identity/``, trained on a GPU
with ``python -m cns_lightning.microworld.identity train``): it must tell every personal concept
from its class. Kept apart from tests/test_identity.py so its result is seen on its own."""

from __future__ import annotations

from cns_lightning.microworld import identity as I


def test_shipped_identity_model_auc_at_least_095_for_every_concept():
    folder = I.IDENTITY_DIR
    assert (folder / "config.json").is_file() and (folder / "preprocessor_config.json").is_file(), (
        f"{folder} holds no identity model (config.json + preprocessor_config.json): train one on a GPU with "
        "`python -m cns_lightning.microworld.identity train --out DIR --device cuda` and copy DIR/model/ there"
    )
    # 12 held-out positives and 24 negatives per concept, on another seed than the eval command's
    results = I.evaluate(folder, n_pos=12, n_neg=24, seed=1, with_clip=False)
    assert len(results) == 20
    low = {name: round(r["auc"], 3) for name, r in results.items() if r["auc"] < 0.95}
    assert not low, f"AUC < 0.95 for {low}\n{I.format_table(results)}"
