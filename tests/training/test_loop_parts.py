"""The training loop's named parts on their own: the epoch clock (a fake clock, no sleeps), the lr
scaled to the global batch, loader workers per rank, and a resume state carried across a change in
the number of processes or GPUs (CUDA generator states as a list per device; no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from cellseg.config.experiment import TrainConfig
from cellseg.errors import CellsegError
from cellseg.training.distributed import DistInfo
from cellseg.training.loop import EpochClock, RunState, check_train_config, loader_workers, restore_state, save_state
from cellseg.training.optim import build_optimizer, lr_factor, scale_to_global_batch
from cellseg.training.rng import restore_cuda_states, rng_state


class FakeClock:
    """Seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_epoch_clock_stops_when_the_longest_epoch_would_pass_the_limit():
    t = FakeClock()
    clock = EpochClock(100.0, clock=t)
    single = DistInfo()
    assert clock.next_fits(first_of_run=True, info=single)  # nothing to project from
    for epoch_seconds, fits in ((30, True), (20, True), (30, False)):
        clock.start_epoch()
        t.now += epoch_seconds
        clock.end_epoch()
        # elapsed 30, 50, 80 s; the longest epoch 30 s: 60 and 80 fit in 100, 110 does not
        assert clock.next_fits(first_of_run=False, info=single) is fits
    assert clock.longest == 30


def test_epoch_clock_refuses_a_resumed_run_whose_recorded_epoch_cannot_fit():
    t = FakeClock()
    with pytest.raises(CellsegError, match="shorter than one epoch of this run \\(50 s"):
        EpochClock(40.0, longest=50.0, clock=t).next_fits(first_of_run=True, info=DistInfo())
    assert EpochClock(None, longest=1e9, clock=t).next_fits(first_of_run=True, info=DistInfo())
    assert EpochClock(0.0, longest=1e9, clock=t).next_fits(first_of_run=False, info=DistInfo())  # 0 = no limit


def test_lr_scales_linearly_to_the_global_batch_and_warmup_inversely():
    tc = TrainConfig(lr=0.02, reference_batch=4, batch_size=2, warmup_iters=500)
    one, line = scale_to_global_batch(tc, world_size=1)
    assert one.lr == pytest.approx(0.01) and one.warmup_iters == 1000
    assert line == "lr 0.02 for global batch 4 -> 0.01 for global batch 2 (1 process x 2), warmup_iters 500 -> 1000"
    two, line = scale_to_global_batch(tc, world_size=2)
    assert two.lr == 0.02 and two.warmup_iters == 500 and "(2 processes x 2)" in line
    eight, _ = scale_to_global_batch(TrainConfig(lr=0.005, reference_batch=4, batch_size=4, warmup_iters=3), 4)
    assert eight.lr == pytest.approx(0.02) and eight.warmup_iters == 1  # 16 images: 4x the lr, a quarter of 3 steps
    assert tc.lr == 0.02 and tc.warmup_iters == 500  # the configured section is left as it is


def test_settings_that_cannot_train_are_refused():
    for bad, key in (({"epochs": 0}, "train.epochs"), ({"reference_batch": 0}, "train.reference_batch")):
        with pytest.raises(CellsegError, match=f"{key} must be >= 1"):
            check_train_config(TrainConfig(**bad))
    with pytest.raises(CellsegError, match="train.time_limit must be >= 0"):
        check_train_config(TrainConfig(time_limit=-5.0))
    check_train_config(TrainConfig(epochs=1, time_limit=0.0))


def test_loader_workers_are_capped_per_local_rank():
    assert loader_workers(4, cores=4, local_world_size=1) == 4
    assert loader_workers(4, cores=4, local_world_size=2) == 2  # Kaggle: 4 vCPUs, 2 GPUs
    assert loader_workers(4, cores=3, local_world_size=2) == 1
    assert loader_workers(2, cores=1, local_world_size=2) == 1  # more ranks than cores: still one each
    assert loader_workers(0, cores=8, local_world_size=1) == 0  # load in the training process


def test_cuda_states_restore_on_fewer_and_more_devices():
    states = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]
    got: list[tuple[int, int]] = []

    def put(s, i):
        got.append((i, int(s[0])))

    assert restore_cuda_states(states, 2, put) is None and got == [(0, 1), (1, 2)]
    got.clear()
    warning = restore_cuda_states(states, 1, put)  # saved on 2 GPUs, resumed on 1
    assert got == [(0, 1)] and "2 device(s), 1 here: restored 1" in warning
    got.clear()
    warning = restore_cuda_states(states[:1], 2, put)  # saved on 1 GPU, resumed on 2
    assert got == [(0, 1)] and "1 device(s), 2 here: restored 1" in warning
    got.clear()
    assert "0 device(s), 1 here" in restore_cuda_states([], 1, put) and got == []


def _optimiser(tc: TrainConfig, world_size: int, total: int):
    scaled, _ = scale_to_global_batch(tc, world_size)
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, scaled)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, scaled))
    return opt, sched, torch.amp.GradScaler("cuda", enabled=False)


@pytest.mark.parametrize("saved_world,resumed_world", [(2, 1), (1, 2)])
def test_resume_state_crosses_a_change_in_processes(saved_world, resumed_world):
    """A state saved by ``saved_world`` processes (4 steps per epoch with 2, 8 with 1: 16 images at
    batch 2) resumes with ``resumed_world``: the schedule continues at the epoch reached, from the lr
    scaled to the new global batch, with a warning."""
    tc = TrainConfig(lr=0.02, reference_batch=4, batch_size=2, warmup_iters=0, schedule="cosine", min_lr_ratio=0.0)
    steps = {1: 8, 2: 4}
    opt, sched, scaler = _optimiser(tc, saved_world, steps[saved_world] * 4)
    for _ in range(steps[saved_world] * 2):  # two epochs of four
        opt.step()
        sched.step()
    rngs = [rng_state() for _ in range(saved_world)]
    run = RunState(epoch=2, step=steps[saved_world] * 2, history=[{"epoch": 1}, {"epoch": 2}], epoch_seconds=7.0)
    state = save_state(run, opt, sched, scaler, rngs)

    lines: list[str] = []
    opt2, sched2, scaler2 = _optimiser(tc, resumed_world, steps[resumed_world] * 4)
    info = DistInfo(rank=resumed_world - 1, world_size=resumed_world)
    back = restore_state(
        state, opt2, sched2, scaler2, info, steps[resumed_world], 0.01 * resumed_world, 0, lines.append
    )
    assert back.epoch == 2 and back.step == steps[resumed_world] * 2 and back.epoch_seconds == 7.0
    assert len(back.history) == 2
    assert any(f"saved by {saved_world} process(es), resumed with {resumed_world}" in x for x in lines)
    # half-way through a cosine schedule: half the lr of the new global batch (0.01 per process of 2 images)
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([0.005 * resumed_world] * 2)
    sched2.step()  # and it goes on from there
    t = (steps[resumed_world] * 2 + 1) / (steps[resumed_world] * 4)
    expected = 0.01 * resumed_world * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * t)).item())
    assert opt2.param_groups[0]["lr"] == pytest.approx(expected)


def test_resume_state_with_the_same_processes_is_exact():
    tc = TrainConfig(lr=0.02, reference_batch=2, batch_size=2, warmup_iters=2)
    opt, sched, scaler = _optimiser(tc, 1, 12)
    for _ in range(5):
        opt.step()
        sched.step()
    state = save_state(RunState(epoch=1, step=5), opt, sched, scaler, [rng_state()])
    a = torch.rand(3)
    opt2, sched2, scaler2 = _optimiser(tc, 1, 12)
    lines: list[str] = []
    restore_state(state, opt2, sched2, scaler2, DistInfo(), 5, 0.02, 0, lines.append)
    assert lines == [] and torch.equal(torch.rand(3), a)  # the generator continues where it was saved
    assert sched2.last_epoch == 5 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
