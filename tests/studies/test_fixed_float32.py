"""The float32 fixed-m study end to end on a tiny checkpoint: rows, budget, the table."""

import dataclasses

import pytest

from jaxrecover.studies import run_study
from jaxrecover.studies.fixed_float32 import FixedFloat32Study
from jaxrecover.training import TrainConfig

TINY = TrainConfig(model="twolayer", epochs=1, batch_size=32, max_train=256, max_test=64)


class TinyFixedFloat32(FixedFloat32Study):
    def checkpoints(self, cfg):
        return {m: TINY for m in cfg.models}


def test_fixed_float32_study_recovers_and_reports(tmp_path):
    study = TinyFixedFloat32()
    cfg = dataclasses.replace(study.make_config(), models=("twolayer",), n=2, configs=("gausslegendre/15",),
                              budgets=("twolayer=4096",))
    res = run_study(study, cfg, out=tmp_path / "out", checkpoints=tmp_path / "ckpt", progress=False)
    rows = res.rows
    assert [r["image"] for r in rows] == [0, 1]
    for r in rows:
        assert not r["stopped"] and r["queries"] <= 4096 and r["budget"] == 4096
        assert r["distance"] <= 1e-4, r  # float32 floor ~1e-7 on trained TwoLayerNet (docs/SERVICES.md)
        assert r["error_estimate"] <= 1e-3 and r["coordinates"] == 784
    table = study.markdown(rows, cfg)
    assert "| twolayer | gausslegendre/15 | 2 |" in table
    with pytest.raises(ValueError, match="model=answers"):  # a malformed budget is one clear line
        study.units(dataclasses.replace(cfg, budgets=("twolayer:4096",)))
