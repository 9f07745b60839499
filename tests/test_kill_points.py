"""Kill points (scripts/kill_points.py): a tiny run SIGKILLed during SFT, during a GOPO iteration and in the middle of
a checkpoint write, then rerun on its workdir, ends with bitwise the parameters of an uninterrupted run."""
import os

import pytest

from scripts import kill_points

TIMEOUT_S = 1800


@pytest.mark.slow
def test_kill9_during_sft_gopo_and_checkpoint_write_resumes_exactly(tmp_path):
    # This worker's compilation cache (conftest): the four runs compile their programs once between them.
    env = kill_points.environment(os.environ["JAX_COMPILATION_CACHE_DIR"])
    reference = kill_points.reference_run(tmp_path / "reference", env, TIMEOUT_S)
    # Halfway into the last SFT block and the last iteration; a checkpoint write as soon as its temporary directory
    # shows (a write of the tiny state is a fraction of a second).
    points = [kill_points.point_at(reference, "sft"), kill_points.point_at(reference, "gopo"),
              kill_points.point_at(reference, "checkpoint", fraction=0.0)]
    for k, point in enumerate(points):
        outcome = kill_points.kill_and_resume(point, tmp_path / f"point{k}", reference, env, TIMEOUT_S)
        print(kill_points.table_row(k, outcome, reference))
        assert outcome.landed and outcome.resumed, outcome
        assert outcome.params_hash == reference.params_hash, outcome
        if point.phase == "checkpoint":
            assert ".orbax-checkpoint-tmp" in outcome.left, f"the kill was not mid-write: {outcome}"
