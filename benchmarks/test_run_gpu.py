"""benchmarks/run_gpu.sh's time budget without running it: its worst-case schedule (SAGE_PLAN_ONLY=1)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().with_name("run_gpu.sh")
COMMAND_LIMIT_S = 600  # the one command the GPU run is sized for: 10 minutes


def plan(**env) -> tuple[list[dict], dict]:
    out = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "SAGE_PLAN_ONLY": "1", **env},
                         capture_output=True, text=True, timeout=60, check=True).stdout
    stages, report = [], {}
    for line in out.splitlines():
        words = line.split()
        if words[:1] != ["plan"]:
            continue
        fields = dict(zip(words[2::2], words[3::2]))
        if words[1] == "report":
            report = {k: int(v) for k, v in fields.items()}
        else:
            stages.append({"name": words[1], **{k: int(v) for k, v in fields.items()}, "skipped": "skipped" in words})
    return stages, report


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.parametrize("setup_s", [0, 25, 60])
def test_worst_case_schedule_fits_the_command_and_guarantees_each_reserve(setup_s):
    """Every stage running to its limit plus the grace: the report still starts inside the budget, the
    budget fits the 10-minute command with room for the report, and with the setup taking up to 25 s
    (expected: about 20 s) each stage with a reserve gets it; with a slower setup, all but the last."""
    stages, report = plan(SAGE_PLAN_SETUP_S=str(setup_s))
    names = [s["name"] for s in stages]
    assert names == ["parity", "adapter", "loss", "tune", "train", "encoder", "input", "adapter_compile",
                     "train_compile", "loss_compile"]
    assert report["start"] <= report["budget"] - report["report_s"] + 10
    assert report["budget"] + 45 <= COMMAND_LIMIT_S
    for s in stages if setup_s <= 25 else stages[:-4]:
        if s["reserve"]:
            assert s["limit"] >= s["reserve"], s
    ends = [s["end"] for s in stages]
    assert ends == sorted(ends)


def test_stages_pass_unused_time_on_and_can_be_selected():
    stages, _ = plan(SAGE_PLAN_SETUP_S="0", SAGE_NO_COMPILE="1")
    assert [s["name"] for s in stages] == ["parity", "adapter", "loss", "tune", "train", "encoder", "input"]
    tune = next(s for s in stages if s["name"] == "tune")
    assert tune["limit"] > tune["reserve"]  # no compile stages to keep time for
    stages, _ = plan(SAGE_STAGES="tune,train")
    assert [(s["name"], s["limit"]) for s in stages] == [("tune", 170), ("train", 100)]
    bad = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "SAGE_PLAN_ONLY": "1", "SAGE_STAGES": "tune,nope"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown stage 'nope'" in bad.stderr


def test_a_short_budget_loses_the_last_stages_first():
    stages, report = plan(SAGE_BUDGET_S="240", SAGE_PLAN_SETUP_S="20")
    got = {s["name"]: s["limit"] for s in stages}
    assert got["parity"] == 75 and got["adapter"] == 50 and got["loss"] == 25  # their own guarantees
    assert got["tune"] > 0
    assert all(got[n] == 0 for n in ("train_compile", "loss_compile"))
    assert report["start"] <= 240 - 15 + 10


def test_parity_and_the_kernel_timings_come_first_and_the_new_stages_have_their_time():
    """The order of value: parity, then the kernel timings and the tuning, the training step, then the
    encoder's attention comparison; with the expected setup (25 s) the encoder and the input stages
    get their guarantee, and a budget that cannot hold them all loses the encoder before the train step."""
    stages, _ = plan(SAGE_PLAN_SETUP_S="25")
    names = [s["name"] for s in stages]
    assert names[:5] == ["parity", "adapter", "loss", "tune", "train"]
    assert names.index("encoder") < names.index("input") < names.index("adapter_compile")
    got = {s["name"]: s for s in stages}
    assert got["encoder"]["limit"] >= got["encoder"]["reserve"] >= 30
    stages, _ = plan(SAGE_BUDGET_S="400", SAGE_PLAN_SETUP_S="25")
    got = {s["name"]: s["limit"] for s in stages}
    assert got["train"] >= 70 and got["encoder"] < 30


def test_the_plan_counts_simulated_time_only(tmp_path):
    """The printed schedule does not depend on how fast the shell computes it (on a loaded machine the
    wall-clock second that passed once shifted a limit): the script slowed down prints the same plan."""
    env = {**os.environ, "SAGE_PLAN_ONLY": "1", "SAGE_PLAN_SETUP_S": "25"}
    row = 'read -r name max reserve <<< "$row"\n'
    script = SCRIPT.read_text()
    assert script.count(row) == 3
    slowed = tmp_path / "benchmarks" / "run_gpu.sh"
    slowed.parent.mkdir()
    slowed.write_text(script.replace(row, row + "sleep 0.02\n"))  # a few seconds in all
    runs = [subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=120,
                           check=True).stdout for path in (SCRIPT, slowed)]
    assert runs[0].count("plan ") == 11 and runs[1] == runs[0]
