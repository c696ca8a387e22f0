"""``cellseg.inference.runner``: a test folder to submission.csv, the time budget (on a fake clock: the
run's seconds are the ones the stand-in models declare, so no test depends on this machine's speed),
and failures that cost only their own image."""

import numpy as np
import pytest
import torch
from PIL import Image

from cellseg.config.manifest import load_manifest
from cellseg.data.submission import read_submission, validate_submission
from cellseg.errors import CellsegError
from cellseg.inference.ensemble import Ensemble
from cellseg.inference.runner import plan_within_budget, predict_folder
from inference_helpers import blob_image, make_competition, make_manifest

CPU = torch.device("cpu")


class FakeClock:
    """The run's clock: seconds pass only when a stand-in says so (``advance``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def use_model(monkeypatch, model: torch.nn.Module, weight: float = 1.0) -> None:
    """``Ensemble.load`` gives a one-model ensemble of ``model`` (labels 1..3 = the cell types)."""
    from cellseg.inference.forward import LoadedModel, label_map_for

    def load(cls, manifest, device, fp16=None):
        return cls(manifest, [LoadedModel(model, weight, label_map_for(None, 4))], device)

    monkeypatch.setattr(Ensemble, "load", classmethod(load))


def _odd_images(comp):
    test = comp / "test"
    ids = sorted(p.stem for p in test.glob("*.png"))
    rgb = np.stack([blob_image(5)] * 3, -1)
    Image.fromarray(rgb, "RGB").save(test / f"{ids[0]}.png")
    Image.fromarray(blob_image(6).astype(np.uint16) * 200).save(test / f"{ids[1]}.png")
    (test / f"{ids[2]}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(blob_image(7, 80, 100), "L").save(test / "00000000ffff.png")  # another size
    return ids


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory):
    return make_manifest(
        tmp_path_factory.mktemp("small"), n_models=1, tta=("identity", "hflip"), detections_per_view=30
    )


@pytest.mark.slow
def test_predict_folder_handles_odd_images(small_manifest, tmp_path):
    path = small_manifest
    comp = make_competition(tmp_path / "comp", n_test=4)
    ids = _odd_images(comp)
    logs = []
    res = predict_folder(comp, path, tmp_path / "sub.csv", progress=False, log=logs.append)  # validates
    sub = read_submission(tmp_path / "sub.csv")
    assert set(sub) == set(ids) | {"00000000ffff"}
    assert list(res.failed) == [ids[2]] and sub[ids[2]] == []
    assert any(ids[2] in line and "empty row" in line for line in logs)
    for i in (ids[0], ids[1], ids[3], "00000000ffff"):
        assert len(sub[i]) > 0  # RGB and 16-bit converted, other size handled


def test_missing_test_folder_and_bad_manifest_stop_early(small_manifest, tmp_path):
    path = small_manifest
    with pytest.raises(CellsegError, match="test folder not found"):
        predict_folder(tmp_path / "nowhere", path, tmp_path / "s.csv", progress=False)
    comp = make_competition(tmp_path / "comp", n_test=1)
    bad = tmp_path / "empty.yaml"
    bad.write_text("name: x\nmodels: []\n")
    with pytest.raises(CellsegError, match="no models listed"):
        predict_folder(comp, bad, tmp_path / "s.csv", progress=False)
    assert not (tmp_path / "s.csv").exists()


def test_plan_within_budget_drops_views_then_models():
    views = ["identity", "hflip", "vflip", "hvflip"]
    p = plan_within_budget(views, [0, 1, 2], [1.0, 0.5, 2.0], 1.0, images_left=10, seconds_left=1000)
    assert p.views == views and p.models == [0, 1, 2] and p.decisions == []
    p = plan_within_budget(views, [0, 1, 2], [1.0, 0.5, 2.0], 1.0, images_left=10, seconds_left=65)
    assert p.views == ["identity", "hflip"] and p.models == [0, 1, 2] and len(p.decisions) == 2
    assert "hvflip" in p.decisions[0] and "vflip" in p.decisions[1]
    p = plan_within_budget(views, [0, 1, 2], [1.0, 0.5, 2.0], 1.0, images_left=10, seconds_left=25)
    assert p.views == ["identity"] and p.models == [0, 2] and "model #1" in p.decisions[-1]
    p = plan_within_budget(views, [0, 1, 2], [1.0, 0.5, 2.0], 1.0, images_left=10, seconds_left=1)
    assert p.views == ["identity"] and p.models == [2]


@pytest.mark.slow
def test_time_budget_is_never_overrun(small_manifest, tmp_path, monkeypatch):
    """Every view costs 0.25 s here (on the run's clock, advanced by the forward), so 10 images x 2 views
    cannot fit 3 s: the hflip view must go first, and the run must still end in time."""
    from cellseg.inference import forward

    clock = FakeClock()
    flip = forward.flip_image
    monkeypatch.setattr(forward, "flip_image", lambda t, v: (clock.advance(0.25), flip(t, v))[1])
    comp = make_competition(tmp_path / "comp", n_test=10)
    logs = []
    start = clock()
    res = predict_folder(
        comp, small_manifest, tmp_path / "sub.csv", time_budget=3.0, progress=False, log=logs.append, clock=clock
    )
    assert clock() - start <= 3.0 and res.total_s == clock() - start
    assert validate_submission(tmp_path / "sub.csv", comp / "test") == []
    assert res.decisions and all(line in logs for line in res.decisions)
    assert "dropping TTA view hflip" in res.decisions[0]  # views go before anything else; identity stays
    assert res.views == ["identity"]
    assert len(res.seconds) + len(res.skipped) == 10 and res.skipped  # 10 x 0.25 s cannot fit either


def test_exhausted_budget_writes_all_empty_rows(small_manifest, tmp_path):
    comp = make_competition(tmp_path / "comp", n_test=2)
    res = predict_folder(
        comp, small_manifest, tmp_path / "sub.csv", time_budget=0.01, progress=False, log=lambda s: None
    )
    assert res.skipped == sorted(res.rows) and not res.seconds
    assert read_submission(tmp_path / "sub.csv") == {i: [] for i in res.rows}


@pytest.mark.slow
def test_pipelined_run_matches_sequential(small_manifest, tmp_path):
    comp = make_competition(tmp_path / "comp", n_test=3)
    a = predict_folder(comp, small_manifest, tmp_path / "a.csv", progress=False, log=lambda s: None, pipeline=False)
    b = predict_folder(comp, small_manifest, tmp_path / "b.csv", progress=False, log=lambda s: None, pipeline=True)
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    assert a.cell_types == b.cell_types and len(b.seconds) == 3 and sum(map(len, b.rows.values())) > 0


class _ColdStartModel(torch.nn.Module):
    """A stand-in detector whose first call is 50x slower than the others (cuDNN start-up and lazy
    kernel loading on a real GPU): ``warm`` seconds per image on ``clock``, 50 x that once. It returns three
    fixed detections per image (flipped with the image, so every view agrees) and records the
    number of images of each call."""

    def __init__(self, clock: FakeClock, warm: float = 0.02):
        super().__init__()
        self.clock, self.warm, self.calls = clock, warm, []

    def forward(self, images):
        self.clock.advance(self.warm * (50 if not self.calls else len(images)))
        self.calls.append(len(images))
        out = []
        for img in images:
            h, w = img.shape[-2:]
            col = img[0].mean(0)  # a dark blob's column profile locates it in any flip
            x = float(col.argmin())
            boxes = torch.tensor([[x - 6, 10, x + 6, 22], [5, 40, 19, 52], [w - 30, h - 30, w - 14, h - 16]])
            out.append(
                {
                    "boxes": boxes.float(),
                    "scores": torch.tensor([0.9, 0.8, 0.7]),
                    "labels": torch.tensor([1, 1, 1]),
                    "masks": torch.full((3, 1, 28, 28), 0.9),
                }
            )
        return out


def test_cold_first_forward_does_not_cost_the_tta(small_manifest, tmp_path, monkeypatch):
    """A 50x slower first forward must not make the time budget drop TTA views the warm timing fits;
    the calibration forward's output is used for its image, not run again."""
    import cellseg.inference.runner as runner

    views = ["identity", "hflip", "vflip", "hvflip"]
    manifest = make_manifest(tmp_path / "w", n_models=1, tta=views, detections_per_view=30)
    clock = FakeClock()
    fake = _ColdStartModel(clock)
    use_model(monkeypatch, fake)
    comp = make_competition(tmp_path / "comp", n_test=10)
    logs = []
    # warm: 10 images x 4 views x 0.02 s = 0.8 s fits 6 s; the cold 1 s per unit does not
    res = runner.predict_folder(
        comp, manifest, tmp_path / "sub.csv", time_budget=6.0, progress=False, log=logs.append, clock=clock
    )
    assert not res.skipped and len(res.seconds) == 10
    assert res.views == views and not [d for d in res.decisions if "dropping" in d], res.decisions
    # warm-up and timed calibration (1 view each), the calibration image's 3 other views, then 9 x 4
    assert fake.calls == [1, 1, 3] + [4] * 9
    # the reused calibration output gives the same submission as a run without a budget
    fake.calls.clear()
    runner.predict_folder(comp, manifest, tmp_path / "plain.csv", progress=False, log=lambda s: None)
    assert fake.calls == [4] * 10
    assert (tmp_path / "sub.csv").read_text() == (tmp_path / "plain.csv").read_text()


def test_dropped_views_come_back_when_time_allows(small_manifest, tmp_path, monkeypatch):
    """A transiently slow stretch drops TTA; once the time per unit recovers, every view comes back."""
    import cellseg.inference.runner as runner

    views = ["identity", "hflip", "vflip", "hvflip"]
    manifest = make_manifest(tmp_path / "w", n_models=1, tta=views, detections_per_view=30)
    clock = FakeClock()
    fake = _ColdStartModel(clock, warm=0.01)
    fake.calls = [0]  # no cold start here: the slow stretch comes in the middle
    slow = {3, 4}  # calls 3 and 4 take 0.6 s per image

    base = fake.forward

    def forward(images):
        if len(fake.calls) in slow:
            clock.advance(0.6 * len(images))
        return base(images)

    fake.forward = forward
    use_model(monkeypatch, fake)
    comp = make_competition(tmp_path / "comp", n_test=12)
    res = runner.predict_folder(
        comp, manifest, tmp_path / "sub.csv", time_budget=12.0, progress=False, log=lambda s: None, clock=clock
    )
    per_call = fake.calls[4:]  # after the placeholder, the calibration's two calls and image 0's 3 views
    assert any(n < 4 for n in per_call), per_call  # the slow stretch dropped views...
    assert per_call[-1] == 4 and res.views == views, per_call  # ...and they came back
    assert any("back to views" in d for d in res.decisions)


# ----------------------------------------------------------------------------- one image's failure costs only that image


def _plain_run(comp, manifest, out) -> dict[str, list[str]]:
    """Each id's RLEs from a run with no fault and no budget."""
    predict_folder(comp, manifest, out, progress=False, log=lambda s: None, pipeline=False)
    return _rles(out)


def _rles(path) -> dict[str, list[str]]:
    return {i: [r for _, r in rows] for i, rows in read_submission(path).items()}


@pytest.fixture(scope="module")
def three_images(small_manifest, tmp_path_factory):
    """A competition folder of three test images and each id's RLEs from a run without a fault."""
    tmp = tmp_path_factory.mktemp("three")
    comp = make_competition(tmp / "comp", n_test=3)
    return comp, _plain_run(comp, small_manifest, tmp / "plain.csv")


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, name",
    [
        ("cellseg.inference.ensemble.Ensemble", "forward"),
        ("cellseg.inference.ensemble", "vote_cell_type"),
        ("cellseg.inference.ensemble", "fuse"),
        ("cellseg.inference.ensemble", "postprocess"),
        ("cellseg.inference.runner", "encode_crop"),
    ],
)
@pytest.mark.parametrize("threaded", [False, True])
def test_an_exception_in_one_image_costs_only_that_image(
    small_manifest, three_images, tmp_path, monkeypatch, module, name, threaded
):
    """Any stage raising an arbitrary exception on one image gives that image an empty row, names it in
    ``failed`` and the log, and the others' rows are those of a run without the fault. (The stage
    learns which image it is on from read_gray in the main thread, from the overlap's job in the worker.)"""
    import importlib
    import threading

    import cellseg.inference.runner as runner

    comp, want = three_images
    victim = sorted(want)[1]
    current = threading.local()
    read = runner.read_gray
    monkeypatch.setattr(runner, "read_gray", lambda p: (setattr(current, "id", p.stem), read(p))[1])
    submit = runner.Overlap.submit

    def submit_tagged(self, tag, fn, *args):
        def job(*a):
            current.id = tag[0]
            return fn(*a)

        return submit(self, tag, job, *args)

    monkeypatch.setattr(runner.Overlap, "submit", submit_tagged)
    path, attr = module.rsplit(".", 1) if module.endswith("Ensemble") else (module, None)
    owner = getattr(importlib.import_module(path), attr) if attr else importlib.import_module(module)
    real = getattr(owner, name)

    def faulty(*args, **kwargs):
        if getattr(current, "id", None) == victim:
            raise ZeroDivisionError("a fault injected into " + name)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, faulty)
    logs = []
    res = predict_folder(comp, small_manifest, tmp_path / "sub.csv", progress=False, log=logs.append, pipeline=threaded)
    got = _rles(tmp_path / "sub.csv")
    assert list(res.failed) == [victim] and "ZeroDivisionError: a fault injected into " + name in res.failed[victim]
    assert got[victim] == [] and {i: r for i, r in got.items() if i != victim} == {
        i: r for i, r in want.items() if i != victim
    }
    assert any(victim in line and "writing an empty row" in line for line in logs)
    assert validate_submission(tmp_path / "sub.csv", comp / "test") == []


class _Flaky(torch.nn.Module):
    """Wraps a model: raises ``error`` on the calls whose (0-based) numbers are in ``fail``."""

    def __init__(self, model: torch.nn.Module, fail: set[int], error: Exception):
        super().__init__()
        self.model, self.fail, self.error, self.calls = model, fail, error, 0

    def forward(self, images):
        self.calls += 1
        if self.calls - 1 in self.fail:
            raise self.error
        return self.model(images)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fail, lost",
    [
        ({0}, 0),  # the warm-up fails once: the retry calibrates, nothing is lost
        ({0, 1}, 1),  # fails twice: that image's row is empty, the next image calibrates
        ({0, 1, 2, 3}, 2),  # the next one fails twice too: two images lost, the third calibrates
    ],
)
def test_a_failing_calibration_costs_at_most_its_image(small_manifest, tmp_path, monkeypatch, fail, lost):
    from cellseg.inference.forward import load_ensemble

    comp = make_competition(tmp_path / "comp", n_test=4)
    want = _plain_run(comp, small_manifest, tmp_path / "plain.csv")
    real = load_ensemble(load_manifest(small_manifest), CPU)[0].model
    flaky = _Flaky(real, fail, ValueError("calibration went wrong"))
    use_model(monkeypatch, flaky)
    logs = []
    res = predict_folder(comp, small_manifest, tmp_path / "sub.csv", time_budget="1h", progress=False, log=logs.append)
    ids = sorted(want)
    got = _rles(tmp_path / "sub.csv")
    assert sorted(res.failed) == ids[:lost] and all("calibration went wrong" in r for r in res.failed.values())
    assert all(got[i] == [] for i in ids[:lost]) and {i: got[i] for i in ids[lost:]} == {i: want[i] for i in ids[lost:]}
    assert any("one model x one view takes" in line for line in logs)  # a later image calibrated the budget
    assert not res.skipped and len(res.seconds) == 4 - lost


class _GpuThatFails(Ensemble):
    """An ensemble on a CUDA device whose every forward fails with a CUDA error (the models are real,
    on the CPU: only the device's failure is faked)."""

    def forward(self, image, known=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.mark.slow
@pytest.mark.parametrize("budget", [None, "1h"])
def test_a_cuda_error_moves_the_run_to_the_cpu(small_manifest, tmp_path, monkeypatch, budget):
    """A CUDA error (in the calibration with a budget, in the first image's forward without) reloads the
    models on the CPU with one loud line, and every image is predicted as a CPU run predicts it."""
    import cellseg.inference.runner as runner

    comp = make_competition(tmp_path / "comp", n_test=3)
    _plain_run(comp, small_manifest, tmp_path / "plain.csv")
    want = (tmp_path / "plain.csv").read_text()
    real_load = Ensemble.load.__func__
    loads = []

    def load(cls, manifest, device, fp16=None):
        loads.append(device.type)
        ens = real_load(Ensemble, manifest, CPU)
        return _GpuThatFails(manifest, ens.models, device) if device.type == "cuda" else ens

    monkeypatch.setattr(Ensemble, "load", classmethod(load))
    monkeypatch.setattr(runner, "resolve_device", lambda device, log=None: torch.device("cuda", 0))
    logs = []
    res = predict_folder(
        comp, small_manifest, tmp_path / "sub.csv", time_budget=budget, progress=False, log=logs.append
    )
    assert loads == ["cuda", "cpu"] and res.device == "cpu" and not res.failed
    assert [line for line in logs if "FALLING BACK TO THE CPU" in line and "illegal memory access" in line]
    assert (tmp_path / "sub.csv").read_text() == want


def test_cuda_errors_are_told_from_other_failures():
    from cellseg.inference.ensemble import OutOfMemoryError
    from cellseg.inference.runner import is_cuda_error

    assert is_cuda_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert is_cuda_error(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"))
    assert is_cuda_error(OutOfMemoryError("CUDA out of memory"))
    assert not is_cuda_error(RuntimeError("shape '[2, 3]' is invalid for input of size 5"))
    assert not is_cuda_error(ValueError("CUDA"))  # only a RuntimeError's message is read


def test_budget_controller_plans_on_its_clock_alone():
    """The controller reads time only from its clock: views drop when the measured pace cannot fit,
    come back only with a margin, and the run stops before the time left is spent."""
    from cellseg.inference.runner import SAFETY, BudgetController

    clock, logs = FakeClock(), []
    views = ["identity", "hflip", "vflip", "hvflip"]
    b = BudgetController(100.0, views, [1.0], clock(), clock, logs.append)
    assert b.reserve == 2.0 + 1.0 and b.wants_calibration() and b.admit(10, 0)  # no measurement: no plan yet
    b.measured(4 * 1.0)  # one image, 4 units, 1 s each
    assert b.admit(10, 0) and b.views == views  # 10 x 4 x 1.3 s = 52 s fit 97 s
    clock.advance(60.0)  # 37 s left: 10 x 4 x 1.3 = 52 s does not fit, 10 x 2 x 1.3 = 26 s does
    assert b.admit(10, 0) and b.views == ["identity", "hflip"] and len(logs) == 2
    b.forget()
    b.measured(2 * 0.5)  # faster now: 4 views fit 0.85 x 37 s (10 x 4 x 0.65 = 26 s)
    assert b.admit(10, 0) and b.views == views and "back to views" in logs[-1]
    clock.advance(36.0)  # 1 s left: not even one unit of 0.65 s x (1 + 1 in flight)
    assert b.per_unit() == SAFETY * 0.5 and not b.admit(3, 1)
    assert "nearly spent" in b.decisions[-1] and "3 image(s) left" in b.decisions[-1]
    assert not BudgetController(None, views, [1.0], clock(), clock, logs.append).wants_calibration()
