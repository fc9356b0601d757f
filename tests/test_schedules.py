"""Schedules as data: builders, validator, dry-run deadlock detection, grid printer (pure, no processes)."""
import pytest

from commtrain.parallel.pipeline.schedules import (
    Action,
    PipelineDeadlock,
    available_schedules,
    build_schedule,
    dry_run,
    gpipe,
    one_f_one_b,
    render_grid,
    simulate_timing,
    validate,
)

SIZES = [(1, 1), (1, 4), (2, 1), (2, 4), (3, 5), (4, 4), (4, 8), (5, 2)]


def test_registry_names_and_unknown():
    assert {"gpipe", "1f1b"} <= set(available_schedules())
    with pytest.raises(ValueError, match="unknown schedule 'zb'.*gpipe"):
        build_schedule("zb", 2, 2)
    with pytest.raises(ValueError, match="n_micro=0"):
        build_schedule("gpipe", 2, 0)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("S,M", SIZES)
def test_builders_validate_and_finish_with_minimal_makespan(name, S, M):
    sched = build_schedule(name, S, M)
    validate(sched, S, M)
    res = dry_run(sched)
    assert res.ok
    # Unit-time F and B: both schedules have the classic bubble of 2(S-1) steps.
    assert res.n_steps == 2 * M + 2 * (S - 1)
    expected_bubble = (S - 1) / (M + S - 1)
    assert res.bubble_fraction() == pytest.approx(expected_bubble)


@pytest.mark.parametrize("S,M", [(2, 4), (4, 8), (3, 2)])
def test_1f1b_bounds_in_flight_activations(S, M):
    """1F1B's point: stage s holds at most S - s microbatches; GPipe holds all M."""
    for name, bound in (("1f1b", lambda s: min(S - s, M)), ("gpipe", lambda s: M)):
        sched = build_schedule(name, S, M)
        for s, acts in sched.items():
            live = peak = 0
            for a in acts:
                live += 1 if a.kind == "F" else -1
                peak = max(peak, live)
            assert peak == bound(s), (name, s)


def test_gpipe_order_is_all_forwards_then_backwards():
    assert [str(a) for a in gpipe(2, 3)[1]] == ["F0", "F1", "F2", "B0", "B1", "B2"]
    assert [str(a) for a in one_f_one_b(3, 4)[0]] == ["F0", "F1", "F2", "B0", "F3", "B1", "B2", "B3"]
    assert [str(a) for a in one_f_one_b(3, 4)[2]] == ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]


def test_action_rejects_bad_fields():
    with pytest.raises(ValueError, match="kind='X'.*F, B"):
        Action(0, "X", 0)
    with pytest.raises(ValueError, match="microbatch=-1"):
        Action(0, "F", -1)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda s: s[1].pop(), "stage 1: missing actions B1"),
        (lambda s: s[0].append(Action(0, "F", 0)), r"stage 0: F0 appears twice"),
        (lambda s: s[1].insert(0, s[1].pop(3)), "B1 runs before F1"),
        (lambda s: s[0].__setitem__(0, Action(1, "F", 0)), "belongs to stage 1"),
        (lambda s: s[0].__setitem__(0, Action(0, "F", 7)), "microbatch 7 out of range"),
        (lambda s: s.pop(1), r"stages \[0\], expected exactly 0..1"),
    ],
)
def test_validator_names_the_problem(mutate, match):
    sched = gpipe(2, 2)
    mutate(sched)
    with pytest.raises(ValueError, match=match):
        validate(sched, 2, 2)


def test_dry_run_finds_deadlock_in_broken_schedule_and_prints_grid():
    # Stage 0 waits for B0 before it sends F1, while stage 1 wants F1 before F0:
    # each waits on the other -> a cycle no single-stage check can see.
    sched = gpipe(2, 2)
    sched[0] = [Action(0, "F", 0), Action(0, "B", 0), Action(0, "F", 1), Action(0, "B", 1)]
    sched[1] = [Action(1, "F", 1), Action(1, "F", 0), Action(1, "B", 0), Action(1, "B", 1)]
    validate(sched, 2, 2)  # locally valid on every stage: only the dry run can see the cycle
    with pytest.raises(PipelineDeadlock) as ei:
        dry_run(sched)
    msg = str(ei.value)
    print(msg)
    assert "DEADLOCK" in msg
    assert "stage 0: B0 waits for B0 on stage 1" in msg
    assert "stage 1: F1 waits for F1 on stage 0" in msg
    assert "stage 0 | F0" in msg  # the partial grid is printed
    res = dry_run(sched, check=False)
    assert not res.ok and set(res.stuck) == {0, 1}
    assert res.n_steps == 1 and str(res.timeline[0][0]) == "F0" and res.timeline[0][1] is None


def test_dry_run_on_1f1b_with_swapped_stage_deadlocks():
    sched = one_f_one_b(4, 4)
    # Stage 1 alternates F/B with no warm-up: its B0 needs B0 from stage 2, which (in its
    # 1F1B order) first needs F1 that stage 1 only sends after B0 -> a cycle.
    sched[1] = [a for m in range(4) for a in (Action(1, "F", m), Action(1, "B", m))]
    validate(sched, 4, 4)
    res = dry_run(sched, check=False)
    assert not res.ok
    assert res.stuck[1][0] == Action(1, "B", 0)
    assert 2 in res.stuck and res.stuck[2][0] == Action(2, "F", 1)


def test_render_grid_exact():
    res = dry_run(gpipe(2, 2))
    grid = render_grid(res.timeline)
    assert grid.splitlines() == [
        "step    |  0  1  2  3  4  5",
        "stage 0 | F0 F1 .. .. B0 B1",
        "stage 1 | .. F0 F1 B0 B1 ..",
    ]


# -- critical-path timing (benchmarks/pipeline_speed.py's bound) -------------------------------------


def test_timing_compute_only_matches_hand_trace():
    """1F1B, 2 stages, 4 microbatches, F = 1 s, B = 2 s, free link: traced by hand
    (stage 0: F0 F1 . . B0 F2 B1 F3 B2 . B3 -> ends at 15)."""
    t = simulate_timing(build_schedule("1f1b", 2, 4), lambda a: 1.0 if a.kind == "F" else 2.0, lambda a: 0.0)
    assert t.step_s == 15.0
    assert t.start[Action(0, "B", 0)] == 4.0 and t.end[Action(1, "B", 3)] == 13.0 and t.end[Action(0, "B", 3)] == 15.0


@pytest.mark.parametrize("n_micro", [1, 2, 4, 8])
def test_timing_link_bound_step_is_not_the_busiest_link(n_micro):
    """Free compute, every message 1 s each way: the forward link is busy n_micro s and the
    backward link n_micro s, so ``max(link seconds)`` says n_micro; but the last gradient can
    only leave after the last activation arrived: the step takes n_micro + 1."""
    t = simulate_timing(build_schedule("1f1b", 2, n_micro), lambda a: 0.0, lambda a: 1.0)
    assert t.step_s == n_micro + 1
    assert t.egress_free == {0: n_micro, 1: n_micro + 1}


def test_timing_is_a_lower_bound_of_its_parts():
    """The step is at least each stage's compute, and at least the sum along any chain."""
    f, b, msg = 0.3, 0.5, 0.2
    for name in ("gpipe", "1f1b"):
        for S, M in [(2, 4), (3, 6), (4, 8)]:
            t = simulate_timing(build_schedule(name, S, M), lambda a: f if a.kind == "F" else b, lambda a: msg)
            assert t.step_s >= M * (f + b) - 1e-9
            chain = S * f + (S - 1) * msg + S * b + (S - 1) * msg  # microbatch 0 down and back
            assert t.step_s >= chain - 1e-9
            free = simulate_timing(build_schedule(name, S, M), lambda a: f if a.kind == "F" else b, lambda a: 0.0)
            assert free.step_s <= t.step_s


def test_timing_refuses_a_deadlocking_schedule():
    bad = {0: [Action(0, "F", 0), Action(0, "B", 0)], 1: [Action(1, "B", 0), Action(1, "F", 0)]}
    with pytest.raises(PipelineDeadlock):
        simulate_timing(bad, lambda a: 1.0, lambda a: 0.0)
