"""Networks and the checkpoint format: data only, never code."""

from __future__ import annotations

import copy
import os
import json
import pickle

import pytest
import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from tilesegment.errors import CheckpointError
from tilesegment.model import ModelConfig, build_model, checkpoint_bytes, for_inference, load_checkpoint, read_checkpoint, save_checkpoint


@pytest.mark.parametrize("architecture", ["ssn3d-encdec", "ssn3d-fcn"])
@pytest.mark.parametrize("shape", [(16, 16, 16), (8, 24, 40)])
def test_networks_are_fully_convolutional(architecture, shape):
    config = ModelConfig(architecture=architecture, channels=(4, 8, 8), class_names=("bg", "a", "b"))
    model = build_model(config).eval()
    out = model(torch.zeros(2, 1, *shape))
    assert out.shape == (2, 3, *shape)


@pytest.mark.parametrize("architecture", ["ssn3d-encdec", "ssn3d-fcn"])
def test_inference_form_folds_every_batch_norm_and_computes_the_same(architecture):
    torch.manual_seed(2)
    config = ModelConfig(architecture=architecture, channels=(4, 8, 8), class_names=("bg", "a", "b"))
    model = build_model(config)
    with torch.no_grad():  # trained-looking statistics and affine parameters, so folding has work to do
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.3, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.randn(2, 1, 24, 16, 32)
    with torch.no_grad():
        expected = model(x)
        fused = for_inference(copy.deepcopy(model))
        got = fused(x)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fused.modules())
    # on the CPU the convolutions run channels-last (oneDNN's fast order), from an ordinary input
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) and not m.weight.is_contiguous()
               for m in fused.modules() if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1 and m.kernel_size != (1, 1, 1))
    assert sum(isinstance(m, torch.nn.Conv3d) for m in fused.modules()) == sum(isinstance(m, torch.nn.Conv3d) for m in model.modules())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_inference_form_runs_a_single_tile_through_onednn():
    # PyTorch's own heuristic sends one sample with few channels to its slow native kernels
    torch.manual_seed(1)
    model = build_model(ModelConfig(channels=(4, 8, 8))).eval()
    fused = for_inference(copy.deepcopy(model))
    plain = copy.deepcopy(fused)
    for module in plain.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.__class__ = torch.nn.Conv3d
    one, two = torch.randn(1, 1, 24, 16, 32), torch.randn(2, 1, 24, 16, 32)
    with torch.inference_mode():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as trace:
            got = fused(one)
        kernels = {event.key for event in trace.key_averages()}
        assert "aten::mkldnn_convolution" in kernels and "aten::slow_conv3d_forward" not in kernels
        torch.testing.assert_close(got, model(one), atol=1e-5, rtol=1e-4)
        assert torch.equal(fused(two), plain(two))  # larger batches: PyTorch's own path, same bits
        with torch.autocast("cpu", dtype=torch.bfloat16):  # reduced precision keeps autocast's casts
            assert fused(one).dtype == plain(one).dtype == torch.bfloat16


def test_checkpoint_round_trip_gives_the_same_network():
    torch.manual_seed(0)
    config = ModelConfig(channels=(4, 8, 8), voxel_size=13.5, class_names=("bg", "ribosome"))
    model = build_model(config).eval()
    loaded, loaded_config = load_checkpoint(checkpoint_bytes(model, config))
    assert loaded_config == config
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_a_failed_save_leaves_the_older_checkpoint_whole(tmp_path, monkeypatch):
    import tilesegment.model as model_module

    config = ModelConfig(channels=(4, 8, 8))
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, build_model(config), config)
    before = path.read_bytes()

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_module, "checkpoint_bytes", full_disk)
    with pytest.raises(OSError):
        save_checkpoint(path, build_model(config), config)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.safetensors"]


def test_default_model_ships_with_the_package():
    _, config = load_checkpoint(read_checkpoint(None))
    assert config.architecture in ("ssn3d-encdec", "ssn3d-fcn") and config.voxel_size > 0
    assert config.class_names[0] == "background"


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload(str(marker))}, evil)
    evil_pickle = pickle.dumps(Payload(str(marker)))
    for data in (evil.read_bytes(), evil_pickle):
        with pytest.raises(CheckpointError, match="pickled"):
            load_checkpoint(data)
    assert not marker.exists()


def test_broken_checkpoints_get_clear_errors(tmp_path):
    config = ModelConfig(channels=(4, 8, 8))
    good = checkpoint_bytes(build_model(config), config)
    with pytest.raises(CheckpointError, match="without tileseg metadata"):
        load_checkpoint(save_safetensors({"w": torch.zeros(2)}))
    with pytest.raises(CheckpointError):
        load_checkpoint(good[: len(good) // 2])  # truncated
    other = ModelConfig(channels=(8, 8, 8))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(save_safetensors({k: v for k, v in build_model(config).state_dict().items()},
                                         metadata={"format": "tilesegment.checkpoint/1", "tilesegment.config": other.to_json()}))
    for change, message in (({"architecture": "resnet-9000"}, "unknown architecture"), ({"in_channels": 2}, "input channels")):
        meta = json.loads(config.to_json()) | change
        data = save_safetensors({}, metadata={"format": "tilesegment.checkpoint/1", "tilesegment.config": json.dumps(meta)})
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(data)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.safetensors")


def test_predictor_answers_in_numpy_order_what_the_trained_network_computes():
    from tilesegment.predict import Predictor

    data = read_checkpoint(None)
    predictor = Predictor(data, "cpu")
    plain, _ = load_checkpoint(data)
    tiles = np.random.default_rng(0).standard_normal((3, 32, 32, 32)).astype(np.float32)
    got = predictor(tiles)
    assert got.flags.c_contiguous and got.shape == (3, predictor.out_channels, 32, 32, 32)
    with torch.no_grad():
        expected = torch.softmax(plain.eval()(torch.from_numpy(tiles)[:, None]), dim=1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_forward_into_adds_what_numpy_blending_adds():
    """The block path (PyTorch adds into the accumulator) against the numpy reference, tile by tile,
    tiles reaching past the accumulator and one wholly outside it included: the same float32 sums."""
    from tilesegment.blending import accumulate, new_accumulator, placement, window
    from tilesegment.geometry import Box
    from tilesegment.predict import Predictor

    predictor = Predictor(read_checkpoint(None), "cpu")
    tile = (32, 32, 32)
    weights = window(tile, "gaussian")
    acc_box = Box((8, 0, 0), (56, 40, 48))
    boxes = [Box((0, 0, 0), (32, 32, 32)), Box((24, 16, 24), (56, 48, 56)), Box((64, 0, 0), (96, 32, 32))]
    tiles = np.random.default_rng(1).standard_normal((3, *tile)).astype(np.float32)
    assert predictor.out_channels == 2 and predictor.summed == slice(1, None)  # a softmax: class 1 only
    got = new_accumulator(1, acc_box)
    predictor.forward_into(tiles, got, [placement(acc_box, box) for box in boxes], weights)
    expected = new_accumulator(1, acc_box)
    summed = predictor.summed_probabilities(tiles)
    np.testing.assert_allclose(summed, predictor(tiles)[:, predictor.summed], atol=1e-6)  # σ(l1 - l0) = softmax's class 1
    for box, prediction in zip(boxes, summed):
        accumulate(expected, acc_box, prediction, box, weights)
    assert placement(acc_box, boxes[2]) is None and expected.min() == 0 < expected.max()
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="accumulator of 2 channels"):
        predictor.forward_into(tiles, new_accumulator(2, acc_box), [placement(acc_box, box) for box in boxes], weights)
    assert not weights.flags.writeable  # the cached window is left as it was


def test_forward_into_takes_views_of_a_block_as_its_batch():
    """Tiles given as views into a block's input are stacked into a batch buffer the predictor's
    thread reuses: the same sums as the stacked array, batch after batch, smaller batches included."""
    from tilesegment.blending import new_accumulator, placement, window
    from tilesegment.geometry import Box
    from tilesegment.predict import Predictor

    predictor = Predictor(read_checkpoint(None), "cpu")
    weights = window((32, 32, 32), "gaussian")
    block = np.random.default_rng(2).standard_normal((56, 48, 64)).astype(np.float32)
    acc_box = Box.from_shape(block.shape)
    boxes = [Box((z, y, x), (z + 32, y + 32, x + 32)) for z in (0, 24) for y in (0, 16) for x in (0, 16, 32)]
    for batch in (boxes[:5], boxes[5:9], boxes[9:]):  # 5, 4 and 3 tiles: the buffer grows once, then is reused
        views, places = [block[box.slices()] for box in batch], [placement(acc_box, box) for box in batch]
        got, expected = new_accumulator(1, acc_box), new_accumulator(1, acc_box)
        predictor.forward_into(views, got, places, weights)
        predictor.forward_into(np.stack(views), expected, places, weights)
        np.testing.assert_array_equal(got, expected)
        assert got.max() > 0
    np.testing.assert_array_equal(block, np.random.default_rng(2).standard_normal((56, 48, 64)).astype(np.float32))  # input untouched


def test_cudnn_math_sets_float32_convolutions_and_determinism_for_a_forward_only():
    """``fp32`` is IEEE float32 on a GPU too (PyTorch would let cuDNN use TF32), ``tf32`` asks for
    TF32, and both ask for deterministic algorithms; the process-wide flags come back after. The
    flags can be set without a GPU, so this runs everywhere; off CUDA nothing is touched."""
    from tilesegment.predict import cudnn_math

    cudnn = torch.backends.cudnn
    before = cudnn.conv.fp32_precision, cudnn.deterministic
    cudnn.conv.fp32_precision, cudnn.deterministic = "tf32", False
    try:
        with cudnn_math(torch.device("cuda"), "fp32"):
            assert (cudnn.conv.fp32_precision, cudnn.deterministic) == ("ieee", True)
        assert (cudnn.conv.fp32_precision, cudnn.deterministic) == ("tf32", False)
        cudnn.conv.fp32_precision = "ieee"
        with pytest.raises(RuntimeError, match="inside"):
            with cudnn_math(torch.device("cuda:0"), "tf32"):
                assert (cudnn.conv.fp32_precision, cudnn.deterministic) == ("tf32", True)
                raise RuntimeError("inside")
        assert (cudnn.conv.fp32_precision, cudnn.deterministic) == ("ieee", False)
        with cudnn_math(torch.device("cpu"), "fp32"):
            assert (cudnn.conv.fp32_precision, cudnn.deterministic) == ("ieee", False)
    finally:
        cudnn.conv.fp32_precision, cudnn.deterministic = before


@pytest.mark.parametrize("device, message", [("cuda:1", r"sees 1 GPU here \(cuda:0 to cuda:0\)"),
                                             ("cuda:x", "'cuda:x' is not a device"),
                                             ("gpu", "'gpu' is not a device")])
def test_a_gpu_this_machine_lacks_is_refused_before_the_model_moves(monkeypatch, device, message):
    """PyTorch accepts ``cuda:1`` on a one-GPU machine and fails later, in ``model.to``, with a bare
    RuntimeError; tileseg refuses it with one line. The GPU count is what PyTorch reports, so the
    check runs here on a pretend one-GPU machine."""
    from tilesegment.errors import ClusterError
    from tilesegment.predict import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ClusterError, match=message):
        resolve_device(device)


def test_cudnn_math_lets_one_cuda_forward_at_a_time_hold_the_process_wide_flags():
    """Two models in one worker process: the second forward waits for the first one's settings to
    be put back instead of changing them under it."""
    import threading

    from tilesegment.predict import cudnn_math

    cudnn = torch.backends.cudnn
    before = cudnn.conv.fp32_precision, cudnn.deterministic
    inside, second_entered, release = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def first():
        with cudnn_math(torch.device("cuda"), "tf32"):
            inside.set()
            release.wait(10)
            seen.append(cudnn.conv.fp32_precision)

    def second():
        with cudnn_math(torch.device("cuda:0"), "fp32"):
            second_entered.set()

    try:
        a = threading.Thread(target=first)
        a.start()
        assert inside.wait(10)
        b = threading.Thread(target=second)
        b.start()
        assert not second_entered.wait(0.5), "the second forward changed the flags while the first ran"
        release.set()
        a.join(10), b.join(10)
        assert second_entered.is_set() and seen == ["tf32"]
        assert (cudnn.conv.fp32_precision, cudnn.deterministic) == before
    finally:
        release.set()
        cudnn.conv.fp32_precision, cudnn.deterministic = before


PEAK_PROBE = """
import sys, torch
from tilesegment.model import ModelConfig, build_model, for_inference
torch.set_num_threads(1)
def peak():
    return next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmHWM'))
architecture, first, edge, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = for_inference(build_model(ModelConfig(architecture=architecture, channels=(first, 2 * first, 4 * first))).eval())
with torch.inference_mode():
    model(torch.zeros(batch, 1, 16, 16, 16))  # PyTorch's code and the weights' layouts, once: not the forward's memory
x = torch.zeros(batch, 1, edge, edge, edge)
before = peak()
with torch.inference_mode():
    model(x)
print(peak() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak RSS from /proc (Linux)")
@pytest.mark.parametrize("architecture, first, edge, batch", [("ssn3d-encdec", 8, 64, 2), ("ssn3d-encdec", 32, 64, 1), ("ssn3d-fcn", 8, 64, 2)])
def test_forward_memory_estimate_bounds_the_measured_peak(architecture, first, edge, batch):
    """The estimate that refuses a too-large --tile up front must not be below what a forward takes
    (the run would then die in the allocator or the OOM killer instead), nor far above it (it would
    refuse tiles that fit)."""
    import subprocess
    import sys

    grown = int(subprocess.run([sys.executable, "-c", PEAK_PROBE, architecture, str(first), str(edge), str(batch)],
                               capture_output=True, text=True, check=True).stdout)
    config = ModelConfig(architecture=architecture, channels=(first, 2 * first, 4 * first))
    estimate = config.forward_bytes_per_voxel * batch * edge ** 3
    assert 0.6 * estimate <= grown <= estimate, (grown, estimate)


def test_a_batch_too_large_for_the_memory_is_refused_with_a_tile_that_fits():
    from tilesegment.errors import OptionError
    from tilesegment.predict import check_forward_memory

    config = ModelConfig(channels=(8, 16, 32))
    need = 4 * 64 ** 3 * config.forward_bytes_per_voxel
    check_forward_memory(config, (64, 64, 64), 4, "cpu", need)  # exactly enough
    check_forward_memory(config, (1000,) * 3, 4, "cpu", None)  # unknown memory: no refusal
    with pytest.raises(OptionError, match=r"--tile 128 with --batch 4: .* about 1\.8 GiB, more than the 0\.2 GiB .* on cpu") as err:
        check_forward_memory(config, (128, 128, 128), 4, "cpu", need)
    assert "--tile 48 fits at --batch 4" in err.value.fix  # within half the memory, a multiple of 4
    with pytest.raises(OptionError, match="even --tile 4 does not fit"):
        check_forward_memory(config, (64, 64, 64), 4, "cpu", 1000)


def test_a_forward_out_of_memory_names_the_batch_and_resume():
    from tilesegment.errors import OptionError
    from tilesegment.predict import Predictor

    predictor = Predictor(read_checkpoint(None), "cpu")

    class Starved(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 32000000000 bytes.")

    predictor.model = Starved()
    with pytest.raises(OptionError, match="ran out of memory on cpu with a batch of 2 tiles of 16×16×16") as err:
        predictor(np.zeros((2, 16, 16, 16), np.float32))
    assert "--batch" in err.value.fix and "--resume" in err.value.fix
    with pytest.raises(OptionError, match="a batch of 1 tile of 16×16×16") as err:
        predictor(np.zeros((1, 16, 16, 16), np.float32))
    assert "smaller --tile" in err.value.fix and "--batch" not in err.value.fix  # a batch of one is as small as it gets

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("shapes do not match")

    predictor.model = Broken()
    with pytest.raises(RuntimeError, match="shapes do not match"):  # other failures are not called a lack of memory
        predictor(np.zeros((2, 16, 16, 16), np.float32))
