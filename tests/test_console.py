"""The console: known library noise filtered at its source, datasets' bars off inside a stage, and the summary every
command ends with."""

import logging

from vlm_recipes import console


def test_deepspeeds_cpu_notice_is_dropped_unless_deepspeed_runs(monkeypatch):
    logger = logging.getLogger("DeepSpeed")  # the logger DeepSpeed creates at import
    notice = logger.makeRecord("DeepSpeed", logging.WARNING, "real_accelerator.py", 213, "Setting accelerator to CPU. "
                               "If you have GPU or other accelerator, we were unable to detect it.", (), None)  # fmt: skip
    other = logger.makeRecord("DeepSpeed", logging.WARNING, "x.py", 1, "ZeRO-3 gathered 12 parameters", (), None)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert not logger.filter(notice) and logger.filter(other)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # a DeepSpeed launch: the notice is worth its line
    assert logger.filter(notice)


def test_quiet_progress_turns_datasets_bars_off_inside_and_restores_them():
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    enable_progress_bars()
    with console.quiet_progress():
        assert are_progress_bars_disabled()
    assert not are_progress_bars_disabled()
    disable_progress_bars()  # a user who turned them off keeps them off
    with console.quiet_progress():
        pass
    assert are_progress_bars_disabled()
    enable_progress_bars()


def test_a_command_ends_with_its_summary_wall_time_and_next_commands(capsys, monkeypatch):
    monkeypatch.setattr(console, "_command_started", console.time.monotonic() - 125)
    console.print_summary(
        "sft", ["Outputs in /x/run", "loss: 2.0 -> 0.5"], ["vlm-recipes evaluate r.yaml --adapter run"]
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == [
        "=== sft: done in 2m 05s ===",
        "Outputs in /x/run",
        "loss: 2.0 -> 0.5",
        "Next:",
        "  vlm-recipes evaluate r.yaml --adapter run",
    ]
    assert [console.wall_time(s) for s in (7, 65, 3725)] == ["7s", "1m 05s", "1h 02m 05s"]
