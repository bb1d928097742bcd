"""hpcml.progress: a bar only on a terminal; in a batch job (not a tty) about ten plain lines
per run (every tenth of the steps, or 60 s after the last line), each with step, loss, rate."""

import io
import re

from hpcml.progress import Progress

LINE = re.compile(r"^train: step (\d+)/600 \(\d+%\), loss [0-9.]+, [0-9.]+ steps/s$")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run(total=600, initial=0, seconds_per_step=0.01, tty=False, enabled=True):
    out, clock = io.StringIO(), Clock()
    bar = Progress(total, initial=initial, stream=out, tty=tty, clock=clock, enabled=enabled)
    for step in range(initial + 1, total + 1):
        clock.now += seconds_per_step
        bar.update(1, loss=10.0 / step)
        if step % 100 == 0:
            bar.write(f"step {step}: valid loss 1.0")
    bar.close()
    return out.getvalue()


def test_batch_mode_prints_a_line_every_tenth_with_step_loss_and_rate():
    text = run()
    assert "\r" not in text
    progress = [ln for ln in text.splitlines() if ln.startswith("train:")]
    assert [int(LINE.match(ln).group(1)) for ln in progress] == list(range(60, 601, 60))
    assert progress[-1] == "train: step 600/600 (100%), loss 0.01667, 100 steps/s"
    assert sum(ln.startswith("step ") for ln in text.splitlines()) == 6


def test_batch_mode_adds_a_line_every_60_s_on_a_slow_run_and_counts_from_a_resume():
    slow = [ln for ln in run(seconds_per_step=2.0).splitlines() if ln.startswith("train:")]
    # 600 steps of 2 s: a line each 30 steps (60 s) -- the tenth marks coincide with some of them
    assert len(slow) == 20 and slow[0].startswith("train: step 30/600 (5%)")
    resumed = [ln for ln in run(initial=250).splitlines() if ln.startswith("train:")]
    assert [int(LINE.match(ln).group(1)) for ln in resumed] == [300, 360, 420, 480, 540, 600]


def test_terminal_mode_is_a_tqdm_bar_and_disabled_ranks_print_nothing():
    text = run(tty=True)
    assert "\r" in text and "step 600: valid loss" in text and "train: step" not in text
    assert run(enabled=False) == "" and run(enabled=False, tty=True) == ""
