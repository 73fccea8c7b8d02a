"""`quantbench history`: a baseline figure's recordings in the git history of its file."""

import subprocess

from harness.baselines import BaselineStore
from harness.cli import main
from harness.figure import Figure
from harness.results import CellResult

CELL = "fp16-compiled|m|b1"


def record(store, decode, spread, measured_at, uuid="GPU-c37ffd22-ad69-d0c4-c4f7-dbe0905c201e", runs=1):
    result = CellResult("fp16-compiled", "m", 1, figures={"decode_tokens_per_s": Figure(decode, spread, 5)},
                        details={"measured_at": measured_at, "pooled_runs": runs},
                        environment={"quantbench_revision": "abc123"},
                        hardware={"cpu_count": 16, "gpu": {"uuid": uuid}})
    store.merge("gpu-a", [result])


def test_every_recording_is_listed_with_how_far_apart_they_lie(tmp_path, capsys):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=q", "-c", "user.email=q@example.org", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    store = BaselineStore(tmp_path / "baselines")
    for decode, when in ((138.9, "2026-11-28T10:00:00+00:00"), (130.1, "2026-11-28T20:00:00+00:00")):
        record(store, decode, decode * 0.01, when)
        git("add", ".")
        git("commit", "-qm", f"record {when}")
    git("commit", "-q", "--allow-empty", "-m", "a commit that does not touch the figure")
    record(store, 124.2, 1.242, "2026-11-29T01:00:00+00:00",  # on another card, in 2 processes, not committed
           uuid="GPU-be79431d-799f-0a79-d1fe-60a2543bc9b7", runs=2)
    code = main(["--baselines-dir", str(tmp_path / "baselines"), "history", "gpu-a", CELL])
    out = capsys.readouterr().out
    assert code == 0
    assert "3 recording(s)" in out
    rows = [line for line in out.splitlines() if "+00:00" in line]
    assert [row.split()[-7] for row in rows] == ["138.9", "130.1", "124.2"]  # the value column
    assert [row.split()[-4] for row in rows] == ["1", "1", "2"]  # the processes pooled
    assert [row.split()[-2] for row in rows] == ["c37ffd22", "c37ffd22", "be79431d"]  # which card
    assert rows[-1].startswith("(working tree)")
    assert "range 124.2-138.9" in out and "median spread ±1.0%" in out
    assert "further apart than their own spreads" in out and "--processes 2" in out and "--pool-baselines" in out

    assert main(["--baselines-dir", str(tmp_path / "baselines"), "history", "gpu-a", "fp16|m|b1"]) == 1
    assert "no recording of decode_tokens_per_s of fp16|m|b1" in capsys.readouterr().out


def test_bad_input_is_named(tmp_path, capsys):
    record(BaselineStore(tmp_path / "baselines"), 100.0, 1.0, "2026-11-28T10:00:00+00:00")  # outside any git checkout
    assert main(["--baselines-dir", str(tmp_path / "baselines"), "history", "gpu-a", CELL]) == 2
    assert "git rev-parse" in capsys.readouterr().err
    assert main(["--baselines-dir", str(tmp_path / "baselines"), "history", "gpu-a", "fp16-compiled"]) == 2
    assert "expected METHOD|MODEL or METHOD|MODEL|bN" in capsys.readouterr().err
