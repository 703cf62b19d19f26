"""The checks of the ``data`` section that take more than a line (``launcher.config.validate`` calls them): token
budgets, weight schedules and sequence-length stages, each problem naming its key and the numbers."""

from __future__ import annotations

import math

from .schema import DataConfig, Recipe

KEY = "data.seq_len_stages"


def weight_at(weight: float | dict[int, float], step: int) -> float:
    """A source's ``weight`` at optimizer step ``step`` (counted from 0): the number itself, or the schedule
    ``{step: weight}`` (in increasing steps) read linearly between its steps and held flat outside them."""
    if not isinstance(weight, dict):
        return weight
    points = list(weight.items())
    if step <= points[0][0]:
        return points[0][1]
    for (s0, w0), (s1, w1) in zip(points, points[1:]):
        if step <= s1:
            return w0 + (w1 - w0) * (step - s0) / (s1 - s0)
    return points[-1][1]


def check_seq_len_stages(r: Recipe) -> list[str]:
    """Every stage has a positive seq_len that divides ``data.seq_len`` (so that the micro-batch of a stage is a
    whole number of blocks) and, with ``parallel.sequence_parallel`` N > 1, is a multiple of N; ``data.seq_len`` is
    the longest stage's; every stage but the last ends at an ``until_step`` >= 1, in increasing order, and the last
    has none."""
    stages = r.data.seq_len_stages
    if not stages:
        return []
    problems: list[str] = []
    longest = r.data.seq_len
    sp = r.parallel.sequence_parallel
    lengths = []
    for i, stage in enumerate(stages):
        key = f"{KEY}[{i}].seq_len"
        s = stage.seq_len
        if s is None:
            problems.append(f"{key}: required: the tokens per block of this stage")
        elif s <= 0:
            problems.append(f"{key}: must be positive, got {s}")
        elif longest > 0 and s > longest:
            problems.append(
                f"{key}: {s} is longer than data.seq_len {longest}; data.seq_len must be the longest stage's seq_len "
                "(train.micro_batch_size and train.global_batch_size are counted at it)"
            )
        elif longest > 0 and longest % s:
            problems.append(
                f"{key}: {s} does not divide data.seq_len {longest}: a stage's micro-batch is "
                f"train.micro_batch_size x data.seq_len / seq_len blocks, a whole number"
            )
        elif sp > 1 and s % sp:
            problems.append(
                f"{key}: {s} is not a multiple of parallel.sequence_parallel {sp} (the {sp} ranks of a sequence "
                "each hold an equal part of it)"
            )
        else:
            lengths.append(s)
    if lengths and len(lengths) == len(stages) and max(lengths) != longest:
        problems.append(
            f"data.seq_len: {longest} is not the longest seq_len of {KEY} ({max(lengths)}): train.micro_batch_size "
            f"and train.global_batch_size are counted at data.seq_len; set data.seq_len to {max(lengths)} (and the "
            "batch sizes for it)"
        )
    previous: int | None = None
    for i, stage in enumerate(stages):
        key = f"{KEY}[{i}].until_step"
        until = stage.until_step
        if i == len(stages) - 1:
            if until is not None:
                problems.append(f"{key}: the last stage runs to the end of training: remove its until_step ({until})")
        elif until is None:
            problems.append(f"{key}: required on every stage but the last: the last optimizer step of the stage")
        elif until < 1:
            problems.append(f"{key}: must be >= 1 (optimizer steps are counted from 1), got {until}")
        elif previous is not None and until <= previous:
            problems.append(
                f"{key}: must be greater than {KEY}[{i - 1}].until_step {previous} (stages follow each other), "
                f"got {until}"
            )
        if until is not None:
            previous = until
    return problems


def schedule_problems(schedule: dict[int, float], key: str) -> list[str]:
    """What is wrong with a weight schedule ``{step: weight}``: steps >= 0 in increasing order, weights >= 0."""
    if not schedule:
        return [f"{key}: an empty schedule; give a number or {{step: weight, ...}}"]
    problems = [f"{key}: step {step} must be >= 0" for step in schedule if step < 0]
    steps = list(schedule)
    problems += [f"{key}: steps must increase: {a} then {b}" for a, b in zip(steps, steps[1:]) if b <= a]
    problems += [
        f"{key}: the weight at step {step} must be a number >= 0, got {w}"
        for step, w in schedule.items()
        if not (w >= 0 and math.isfinite(w))
    ]
    return problems


def check_weights(d: DataConfig, problems: list[str]) -> None:
    """With weight schedules, the training sources' weights add up to more than 0 at every step: the sum is linear
    between the steps any schedule names and flat outside them, so those steps are where it is smallest."""
    weights = [s.weight for s in d.train]
    schedules = [w for w in weights if isinstance(w, dict)]
    if not schedules or any(schedule_problems(w, "") for w in schedules):
        return
    for step in sorted({step for w in schedules for step in w}):
        if sum(weight_at(w, step) for w in weights) <= 0:
            problems.append(
                f"data.train: the weights of all training sources are 0 at step {step}; at every step some source "
                "needs a weight above 0"
            )
            return


def check_budgets(d: DataConfig, problems: list[str]) -> None:
    """Token budgets are set in exactly one way, and only under ``stopping: token_budget``, where the weights are
    numbers (the budgets of a pass are fixed for the pass)."""
    own = [i for i, s in enumerate(d.train) if s.token_budget is not None]
    if d.token_budget is not None and d.token_budget <= 0:
        problems.append(f"data.token_budget: must be positive, got {d.token_budget}")
    if d.stopping != "token_budget":
        if d.token_budget is not None:
            problems.append(f"data.token_budget: only used with data.stopping=token_budget (it is {d.stopping!r})")
        for i in own:
            problems.append(
                f"data.train[{i}].token_budget: only used with data.stopping=token_budget (it is {d.stopping!r})"
            )
        return
    if d.token_budget is not None and own:
        problems.append(
            "data.token_budget: set either data.token_budget (split by weight) or token_budget on every "
            f"training source, not both (data.train[{own[0]}] sets one)"
        )
    elif d.token_budget is None and d.train and len(own) < len(d.train):
        missing = ", ".join(f"data.train[{i}]" for i in range(len(d.train)) if i not in own)
        problems.append(
            f"data.stopping: token_budget needs data.token_budget, or token_budget on every source ({missing} has none)"
        )
    for i, s in enumerate(d.train):
        if isinstance(s.weight, dict):
            problems.append(
                f"data.train[{i}].weight: a schedule does not work with data.stopping=token_budget, where each pass "
                "draws fixed token budgets (data.token_budget is split by the weights); give a number, or choose "
                "another data.stopping"
            )
