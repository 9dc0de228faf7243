"""progress.part: a sub-task's share of the whole, the one helper every long function uses."""

from opstudio.core.progress import part


def test_a_part_maps_its_fractions_into_its_share_held_to_it():
    heard: list[tuple[float, str]] = []
    sub = part(lambda f, m: heard.append((f, m)), 0.2, 0.6)
    sub(0.0, "start")
    sub(0.5, "half")
    sub(1.5, "over")  # a sub-task that overshoots stays inside its share
    assert heard == [(0.2, "start"), (0.4, "half"), (0.6, "over")]


def test_a_part_names_its_task_and_of_nothing_is_nothing():
    heard: list[tuple[float, str]] = []
    inner = part(part(lambda f, m: heard.append((f, m)), 0.5, 1.0), 0.0, 0.5, "lowrank")
    inner(1.0, "factorizing")
    assert heard == [(0.75, "lowrank: factorizing")]
    assert part(None, 0.0, 0.5) is None
