"""`jaxft train tiny --config.adapter.name=NAME` with each member's defaults (slow: ~5-30 s
each; `experiments/cli_sweep.py` runs the same sweep in subprocesses and records a table)."""
import math

import pytest

from jaxft import adapters


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(adapters.ADAPTERS))
def test_tiny_trains_with_the_member_defaults(name, tmp_path):
  from jaxft import cli, logbook  # pylint: disable=g-import-not-at-top
  assert cli.main(["train", "tiny", "--workdir", str(tmp_path), "--config.steps=4",
                   "--config.eval_every=0", f"--config.adapter.name={name}", "--no_progress"]) == 0
  losses = [r["loss"] for r in logbook.read_metrics(tmp_path / "metrics.jsonl")
            if "loss" in r and "split" not in r]
  assert len(losses) >= 2 and all(math.isfinite(x) for x in losses)
