"""scripts/regenerate_results.py: the README's main-job block is rebuilt from a run's summary.json between its
markers, and only there; a comparison config error is a message."""
import subprocess
import sys

import pytest

from scripts import regenerate_results as regen


def _block(t, g):
    return {"tse": {"mean": t, "lo": t - 0.01, "hi": t + 0.01}, "gre": {"mean": g, "lo": g - 0.1, "hi": g + 0.1},
            "esndcg": {"mean": 0.9, "lo": 0.8, "hi": 1.0}, "outcome": {"mean": 0.5, "lo": 0.4, "hi": 0.6},
            "ntse": t / 0.35, "alignment": None}


def test_main_job_block_is_rebuilt_between_the_markers():
    summary = {"method": "gopo", "eval_episodes": 256, "iterations": 40, "reference": _block(0.35, 1.8),
               "sft": _block(0.14, 0.4), "gopo": _block(0.30, 1.5),
               "gopo_minus_sft": {"tse": {"mean_diff": 0.16, "lo": 0.14, "hi": 0.18},
                                  "gre": {"mean_diff": 1.1, "lo": 1.0, "hi": 1.2}}}
    block = regen.main_job_block(summary, wall_s=300.0, peak_gb=2.5, command="python -m experiments.mgshop")
    assert block.startswith(regen.BEGIN) and block.endswith(regen.END)
    assert "| GOPO (40 iterations after SFT) | 0.300 [0.290, 0.310] | 0.86 | 1.500 [1.400, 1.600] |" in block
    assert "256 held-out test customers" in block and "TSE +0.160 [+0.140, +0.180], GRE +1.10 [+1.00, +1.20]" in block
    readme = f"intro\n{regen.BEGIN}\nold table\n{regen.END}\nafter\n"
    assert regen.replace_block(readme, block) == f"intro\n{block}\nafter\n"
    with pytest.raises(ValueError, match="has no <!-- main-job: begin -->"):
        regen.replace_block("no markers", block)


def test_a_bad_comparison_config_is_a_message_not_a_traceback(tmp_path):
    """A config error of the comparison (a bad flag, a kept run of another config) ends the command with its message
    and exit status 2, as `experiments.compare` does."""
    done = subprocess.run([sys.executable, "-m", "scripts.regenerate_results", "--what=compare", "--report_only",
                           f"--workdir={tmp_path}", "--records=", "--config.environments=atlantis"],
                          cwd=regen.REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "environment 'atlantis' needs an entry in env_configs" in done.stderr
