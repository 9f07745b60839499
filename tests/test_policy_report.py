"""gopo_jax/envs/policy_report.py: the printed report holds metrics in their ranges, and on the synthetic shop the
reference policy is the best of the scripted ones."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from gopo_jax.envs import policy_report

LINE = re.compile(r"^  (\w+)\s+(-?[\d.]+) ± ([\d.]+)\s+\[(-?[\d.]+), (-?[\d.]+)\]$")
REPO = pathlib.Path(__file__).resolve().parents[1]


def _report(env, policy="reference", episodes=32, **options) -> tuple[str, dict]:
    """(text, {label: (mean, half-width, lo, hi)}) of one report."""
    out = policy_report.report(env, policy, episodes, **options)
    return out, {m[1]: tuple(float(x) for x in m.groups()[1:]) for m in map(LINE.match, out.splitlines()) if m}


@pytest.fixture(scope="module")
def shop_reports():
    return {policy: _report("synthetic_shop", policy, show=1) for policy in ("reference", "random", "greedy")}


def test_metrics_are_in_range(shop_reports):
    for policy, (out, rows) in shop_reports.items():
        assert out.startswith(f"synthetic_shop / {policy}: 32 episodes")
        assert set(rows) == {"TSE", "nTSE", "ESNDCG", "GRE", "outcome", "turns"}, out
        for label, (mean, half, lo, hi) in rows.items():
            assert lo <= mean <= hi and half >= 0, (policy, label)
        assert 0 < rows["TSE"][0] <= 1 and 0 <= rows["ESNDCG"][0] <= 1 and 0 <= rows["outcome"][0] <= 1
        assert 1 <= rows["turns"][0] <= 8  # the shop's T_max
        assert "dialogue 0:" in out and "agent <" in out  # --show 1 prints one transcript


def test_reference_is_the_best_scripted_policy(shop_reports):
    ref = shop_reports["reference"][1]
    assert ref["nTSE"][0] == pytest.approx(1.0) and ref["ESNDCG"][0] == pytest.approx(1.0)
    for other in ("random", "greedy"):
        rows = shop_reports[other][1]
        assert rows["TSE"][0] < ref["TSE"][0] and rows["nTSE"][0] < 1.0, other
        assert rows["GRE"][0] < ref["GRE"][0], other
    # random is the weakest: greedy looks one step ahead
    assert shop_reports["random"][1]["TSE"][0] < shop_reports["greedy"][1]["TSE"][0]


def test_host_world_report_and_missing_data(shared_data, tmp_path):
    out, rows = _report("tmallbrand", episodes=4, data_dir=str(shared_data / "abcd"))
    assert out.startswith("tmallbrand / reference: 4 episodes") and rows["nTSE"][0] == pytest.approx(1.0)
    assert rows["outcome"][0] == pytest.approx(1.0)  # the scripted expert completes every after-sales flow
    with pytest.raises((FileNotFoundError, ValueError), match="env.data_dir"):
        policy_report.report("tmallbrand", "reference", 4, data_dir=str(tmp_path / "none"))


def test_command_line_errors_are_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "gopo_jax.envs.policy_report", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300, check=False)

    for argv, message in ((["--episodes", "4"], "--env is required"),
                          (["--env", "tmallbrand", "--data", str(tmp_path / "none")], "env.data_dir")):
        bad = run(*argv)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, (argv, bad.stderr)
        assert bad.stderr.startswith("error: ") and message in bad.stderr, (argv, bad.stderr)
