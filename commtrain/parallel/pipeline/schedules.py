"""Pipeline schedules as data: per stage, the ordered list of actions it runs in one step.

A schedule is a plain ``dict[int, list[Action]]`` keyed by stage (= the rank's index in
the pipeline group). Keeping it as data, not as control flow inside the executor, means the
same object can be validated, dry-run for deadlocks without any processes, printed as a
step x stage grid, and then executed unchanged -- the design of
``torch.distributed.pipelining``'s schedule IR.

Dependencies between actions (they are what the executor's sends and receives enforce):

* ``F(s, m)`` needs ``F(s-1, m)`` (its input activation comes from the previous stage);
* ``B(s, m)`` needs ``F(s, m)`` (the saved graph) and ``B(s+1, m)`` (the output gradient).

Sends are asynchronous (a stage never waits for its consumer), receives block, and a
receiver stashes messages that arrive before it asks for them, so these two rules are the
*only* waits: the dry-run below models exactly the executor in ``executor.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ...registry import Registry

KINDS = ("F", "B")


@dataclass(frozen=True)
class Action:
    """One unit of work: forward (``"F"``) or backward (``"B"``) of ``microbatch`` on ``stage``."""

    stage: int
    kind: str
    microbatch: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Action kind={self.kind!r} is invalid; allowed: {', '.join(KINDS)}")
        for name in ("stage", "microbatch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"Action {name}={v!r} is invalid; allowed: an integer >= 0")

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


Schedule = dict[int, list[Action]]

# Schedule builders ``fn(n_stages, n_micro) -> Schedule``, registered by name.
_SCHEDULES: Registry[Callable[[int, int], Schedule]] = Registry("schedule")
register_schedule = _SCHEDULES.register
available_schedules = _SCHEDULES.names


def _check_sizes(n_stages: int, n_micro: int) -> None:
    for name, v in (("n_stages", n_stages), ("n_micro", n_micro)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} is invalid; allowed: an integer >= 1")


def build_schedule(name: str, n_stages: int, n_micro: int) -> Schedule:
    """Build the registered schedule ``name``, validated."""
    builder = _SCHEDULES.get(name)
    _check_sizes(n_stages, n_micro)
    sched = builder(n_stages, n_micro)
    validate(sched, n_stages, n_micro)
    return sched


@register_schedule("gpipe")
def gpipe(n_stages: int, n_micro: int) -> Schedule:
    """All forwards, then all backwards (Huang et al. 2019). Keeps n_micro activations alive."""
    _check_sizes(n_stages, n_micro)
    return {
        s: [Action(s, "F", m) for m in range(n_micro)] + [Action(s, "B", m) for m in range(n_micro)]
        for s in range(n_stages)
    }


@register_schedule("1f1b")
def one_f_one_b(n_stages: int, n_micro: int) -> Schedule:
    """PipeDream-flush / 1F1B (Narayanan et al. 2021): same bubble as GPipe, but stage s
    keeps at most ``n_stages - s`` microbatches of activations alive instead of n_micro.

    Stage s runs ``n_stages - s - 1`` warm-up forwards, then alternates one forward and one
    backward, then drains the remaining backwards.
    """
    _check_sizes(n_stages, n_micro)
    sched: Schedule = {}
    for s in range(n_stages):
        warm = min(n_stages - s - 1, n_micro)
        acts = [Action(s, "F", m) for m in range(warm)]
        for i in range(n_micro - warm):
            acts += [Action(s, "F", warm + i), Action(s, "B", i)]
        acts += [Action(s, "B", m) for m in range(n_micro - warm, n_micro)]
        sched[s] = acts
    return sched


def validate(schedule: Schedule, n_stages: int, n_micro: int) -> None:
    """Raise ValueError naming the first problem: missing/extra stages, an action filed under
    the wrong stage, a microbatch out of range, an F or B missing or repeated, or a B before
    its F on the same stage. Deadlocks across stages are :func:`dry_run`'s job."""
    _check_sizes(n_stages, n_micro)
    if not isinstance(schedule, dict):
        raise TypeError(f"schedule must be a dict stage -> list[Action], got {type(schedule).__name__}")
    if sorted(schedule) != list(range(n_stages)):
        raise ValueError(f"schedule has stages {sorted(schedule)}, expected exactly 0..{n_stages - 1}")
    for s in range(n_stages):
        seen: dict[tuple[str, int], int] = {}
        for pos, a in enumerate(schedule[s]):
            if not isinstance(a, Action):
                raise TypeError(f"stage {s}, position {pos}: expected an Action, got {a!r}")
            if a.stage != s:
                raise ValueError(f"stage {s}, position {pos}: action {a} belongs to stage {a.stage}")
            if a.microbatch >= n_micro:
                raise ValueError(
                    f"stage {s}, position {pos}: microbatch {a.microbatch} out of range 0..{n_micro - 1}"
                )
            key = (a.kind, a.microbatch)
            if key in seen:
                raise ValueError(f"stage {s}: {a} appears twice (positions {seen[key]} and {pos})")
            if a.kind == "B" and ("F", a.microbatch) not in seen:
                raise ValueError(f"stage {s}, position {pos}: B{a.microbatch} runs before F{a.microbatch}")
            seen[key] = pos
        missing = [f"{k}{m}" for k in KINDS for m in range(n_micro) if (k, m) not in seen]
        if missing:
            raise ValueError(f"stage {s}: missing actions {' '.join(missing)}")


def dependencies(a: Action, n_stages: int) -> list[Action]:
    """The actions on *other or same* stages that must finish before ``a`` can start."""
    if a.kind == "F":
        return [Action(a.stage - 1, "F", a.microbatch)] if a.stage > 0 else []
    deps = [Action(a.stage, "F", a.microbatch)]
    if a.stage < n_stages - 1:
        deps.append(Action(a.stage + 1, "B", a.microbatch))
    return deps


class PipelineDeadlock(RuntimeError):
    """Raised by :func:`dry_run` (``check=True``); ``.result`` holds the partial timeline."""

    def __init__(self, result: "DryRun"):
        self.result = result
        super().__init__(result.report())


@dataclass
class DryRun:
    """The simulated execution: ``timeline[t][stage]`` is the action run at step t (or None),
    ``stuck`` maps each blocked stage to (its next action, the unfinished dependencies)."""

    n_stages: int
    timeline: list[dict[int, Action | None]] = field(default_factory=list)
    stuck: dict[int, tuple[Action, list[Action]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.stuck

    @property
    def n_steps(self) -> int:
        return len(self.timeline)

    def bubble_fraction(self) -> float:
        """Idle slots / all slots of the grid (the pipeline bubble, unit-time actions)."""
        slots = self.n_steps * self.n_stages
        busy = sum(a is not None for row in self.timeline for a in row.values())
        return 1.0 - busy / slots if slots else 0.0

    def report(self) -> str:
        grid = render_grid(self.timeline, self.n_stages)
        if self.ok:
            return f"schedule completes in {self.n_steps} steps\n{grid}"
        lines = [f"DEADLOCK after {self.n_steps} steps; stuck actions:"]
        for s, (a, waits) in sorted(self.stuck.items()):
            lines.append(f"  stage {s}: {a} waits for " + ", ".join(f"{w} on stage {w.stage}" for w in waits))
        return "\n".join(lines) + "\n" + grid


def dry_run(schedule: Schedule, check: bool = True) -> DryRun:
    """Simulate ``schedule`` in lock-step unit-time steps, without processes.

    At every step each stage runs its next action if all its dependencies finished in an
    *earlier* step (a message sent at step t is received at t+1). If no stage can move but
    actions remain, the schedule deadlocks: with ``check`` a :class:`PipelineDeadlock` is
    raised whose message names the stuck actions and prints the grid; otherwise the
    returned :class:`DryRun` has a non-empty ``stuck``.
    """
    n_stages = len(schedule)
    if sorted(schedule) != list(range(n_stages)):
        raise ValueError(f"schedule has stages {sorted(schedule)}, expected exactly 0..{n_stages - 1}")
    pos = {s: 0 for s in schedule}
    done: set[Action] = set()
    result = DryRun(n_stages)
    while any(pos[s] < len(schedule[s]) for s in schedule):
        row: dict[int, Action | None] = {}
        for s in range(n_stages):
            acts = schedule[s]
            a = acts[pos[s]] if pos[s] < len(acts) else None
            row[s] = a if a is not None and all(d in done for d in dependencies(a, n_stages)) else None
        if all(a is None for a in row.values()):
            for s in range(n_stages):
                if pos[s] < len(schedule[s]):
                    a = schedule[s][pos[s]]
                    result.stuck[s] = (a, [d for d in dependencies(a, n_stages) if d not in done])
            if check:
                raise PipelineDeadlock(result)
            return result
        for s, a in row.items():
            if a is not None:
                done.add(a)
                pos[s] += 1
        result.timeline.append(row)
    return result


def render_grid(timeline: list[dict[int, Action | None]], n_stages: int | None = None) -> str:
    """Step x stage grid, one row per stage: ``stage 0 | F0 F1 B0 .. B1``  (``..`` = idle)."""
    if n_stages is None:
        n_stages = max((len(r) for r in timeline), default=0)
    cells = [[str(row.get(s)) if row.get(s) is not None else ".." for row in timeline] for s in range(n_stages)]
    width = max([len(c) for r in cells for c in r] + [2])
    header = "step    | " + " ".join(f"{t:>{width}}" for t in range(len(timeline)))
    body = [f"stage {s:<2}| " + " ".join(f"{c:>{width}}" for c in r) for s, r in enumerate(cells)]
    return "\n".join([header] + body)


# -- timing: the schedule's critical path over a link ----------------------------------------------
@dataclass
class Timing:
    """Event times of one step of a schedule (seconds from the step's start).

    ``start``/``end``: of every action; ``arrive``: when the message an action sends (its
    output activation forward, its input gradient backward) has crossed the link;
    ``egress_free``: when each stage's outgoing link finishes its last message;
    ``step_s``: when the last action ends."""

    start: dict[Action, float] = field(default_factory=dict)
    end: dict[Action, float] = field(default_factory=dict)
    arrive: dict[Action, float] = field(default_factory=dict)
    egress_free: dict[int, float] = field(default_factory=dict)

    @property
    def step_s(self) -> float:
        return max(self.end.values(), default=0.0)

    def last_backward(self, stage: int) -> Action:
        return max((a for a in self.end if a.stage == stage and a.kind == "B"), key=lambda a: self.end[a])


def sends_message(a: Action, n_stages: int) -> bool:
    """Does ``a`` send a message when it ends (F: its activation to stage+1; B: the input's
    gradient to stage-1)?"""
    return a.stage < n_stages - 1 if a.kind == "F" else a.stage > 0


def simulate_timing(schedule: Schedule, compute_s: Callable[[Action], float],
                    message_s: Callable[[Action], float]) -> Timing:
    """Time one step of ``schedule`` as the executor runs it, event by event.

    Each stage runs its actions in order, one at a time, an action starting when the stage is
    free and its :func:`dependencies` have *arrived*; ``compute_s(a)`` is its duration. When
    an action ends it hands its message (see :func:`sends_message`) to its stage's egress link,
    one FIFO resource per stage (as :class:`commtrain.comm.LinkModel`, and as a ``tc``
    egress queue): the message occupies the link for ``message_s(a)`` seconds (latency +
    bytes / bandwidth) starting when both it and the link are ready, and arrives when that
    ends. Nothing else costs time (no codec, no buffer, no framework overhead), so with
    durations that are lower bounds on the real ones, ``step_s`` is a lower bound on the
    real step: a critical-path bound of the schedule over the link. Unlike ``C + max(link
    seconds)`` it knows that a 1F1B step cannot overlap the last microbatch's gradient with
    its activation. Raises :class:`PipelineDeadlock` if the schedule cannot complete.
    """
    n_stages = len(schedule)
    dry_run(schedule)  # deadlocks are reported with the grid, before any timing
    t = Timing(egress_free={s: 0.0 for s in schedule})
    pos = {s: 0 for s in schedule}
    free = {s: 0.0 for s in schedule}
    while any(pos[s] < len(schedule[s]) for s in schedule):
        for s in range(n_stages):
            while pos[s] < len(schedule[s]):
                a = schedule[s][pos[s]]
                deps = dependencies(a, n_stages)
                if any(d not in t.end for d in deps):
                    break
                ready = [t.end[d] if d.stage == s else t.arrive[d] for d in deps]
                t.start[a] = max([free[s], *ready])
                t.end[a] = free[s] = t.start[a] + float(compute_s(a))
                if sends_message(a, n_stages):
                    go = max(t.end[a], t.egress_free[s])
                    t.arrive[a] = t.egress_free[s] = go + float(message_s(a))
                pos[s] += 1
    return t
