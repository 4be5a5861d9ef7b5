"""Progress where the output is not a terminal: plain lines on a fake clock, one per interval and one at the end."""

import io

from lora_jax.io.progress import loss_progress, progress


class FakeClock:
    """A clock that moves only when told: ``clock.now += seconds``."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_loss_progress_prints_a_line_per_interval_and_one_at_the_end():
    stream, clock = io.StringIO(), FakeClock()
    with loss_progress(10, "  training", completed=2, stream=stream, clock=clock, interval=5.0) as bar:
        for step, loss in enumerate([3.0, 2.5, 2.0, 1.75, 1.5, 1.25, 1.0, 0.5], start=3):
            clock.now += 2.0
            bar.advance(loss)
            if step == 6:
                bar.print("step 6: evaluated")
    assert stream.getvalue().splitlines() == [
        "training: 5/10, loss 2.0000, 6s",       # 6 s after the start: the first interval of 5 s has passed
        "step 6: evaluated",
        "training: 8/10, loss 1.2500, 12s",      # 5 s and more after the line at 6 s
        "training: 10/10, loss 0.5000, 16s",     # the end
    ]


def test_loss_progress_prints_no_final_line_twice_nor_when_disabled():
    stream, clock = io.StringIO(), FakeClock()
    with loss_progress(2, "training", stream=stream, clock=clock, interval=1.0) as bar:
        clock.now += 1.0
        bar.advance(1.0, steps=2)
    assert stream.getvalue() == "training: 2/2, loss 1.0000, 1s\n"
    quiet = io.StringIO()
    with loss_progress(2, "training", enabled=False, stream=quiet, clock=clock, interval=0.0) as bar:
        bar.advance(1.0, steps=2)
        bar.print("a message is still shown")
    assert quiet.getvalue() == "a message is still shown\n"


def test_progress_over_items_prints_counts_without_a_loss():
    stream, clock = io.StringIO(), FakeClock()
    seen = []
    for item in progress(["a", "b", "c", "d"], "reading", stream=stream, clock=clock, interval=3.0):
        seen.append(item)
        clock.now += 2.0
    assert seen == ["a", "b", "c", "d"]
    assert stream.getvalue().splitlines() == ["reading: 2/4, 4s", "reading: 4/4, 8s"]
    unsized = io.StringIO()
    assert list(progress(iter(range(3)), "counting", stream=unsized, clock=clock, interval=60.0)) == [0, 1, 2]
    assert unsized.getvalue() == "counting: 3, 0s\n"
