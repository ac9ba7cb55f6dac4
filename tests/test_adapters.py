"""Models trained elsewhere (pyrodiff.adapters, analysis/external_bound.py) against independent computations.

Without diffusers: a stand-in network that numbers timesteps from 0 (an embedding table of T rows, so t = T fails)
and returns its output in ``.sample``; its adapted bound must equal that of a hand-written pyrodiff model calling it
with t - 1.  With diffusers: the closed-form betas against diffusers' own, every mean and variance against
``DDPMScheduler.step``, and a randomly initialised ``UNet2DModel`` saved, loaded back and reported end to end.
"""

import json
import math
import runpy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from pyrodiff import DiffusionModel, NoiseSchedule, bound_terms, load_dataset
from pyrodiff.adapters import (
    ZeroIndexedNetwork,
    load_diffusers,
    load_network,
    model_from_diffusers,
    sampler_options,
    schedule_from_config,
    scheduler_config,
)

T = 12
SCRIPT = Path(__file__).parents[1] / "analysis" / "external_bound.py"


class StandIn(nn.Module):
    """diffusers-style: timesteps 0..T-1 index an embedding table (t = T fails), the output is in ``.sample``."""

    def __init__(self, steps, channels=1, out_channels=None):
        super().__init__()
        out_channels = out_channels or channels
        self.embed = nn.Embedding(steps, out_channels)
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, sample, timestep):
        return SimpleNamespace(sample=self.conv(sample) + self.embed(timestep)[:, :, None, None])


#: this module's stand-in by its import path, as a user names their own network (pytest has imported this module)
STAND_IN = f"{__name__}:StandIn"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits").test[:4]


def _stand_in(out_channels=1):
    torch.manual_seed(0)
    net = StandIn(T, 1, out_channels)
    with torch.no_grad():
        net.embed.weight.mul_(3)  # timesteps matter: a wrong offset changes every output
    return net.eval()


class Shifted(nn.Module):
    """Written by hand: pyrodiff's math timestep t is the stand-in's t - 1."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x, t - 1).sample


def _config(**kw):
    return {"num_train_timesteps": T, "beta_schedule": "linear", **kw}


# ---------------------------------------------------------------------- the network
def test_adapter_calls_with_t_minus_one():
    net, x = _stand_in(), torch.randn(T, 1, 8, 8)
    t = torch.arange(1, T + 1)
    with torch.no_grad():
        assert torch.equal(ZeroIndexedNetwork(net)(x, t), net(x, t - 1).sample)
        with pytest.raises(IndexError):  # the stand-in catches an offset: it has no timestep T
            net(x, t)


def test_adapter_timestep_scale_and_plain_tensor_output():
    seen = []

    class Record(nn.Module):
        def forward(self, x, t):
            seen.append(t)
            return x

    x, t = torch.randn(3, 2), torch.tensor([1, 5, T])
    assert torch.equal(ZeroIndexedNetwork(Record())(x, t), x)
    assert seen[-1].dtype == torch.long and seen[-1].tolist() == [0, 4, T - 1]
    ZeroIndexedNetwork(Record(), timestep_scale=1000 / T)(x, t)  # improved-diffusion's rescale_timesteps
    assert seen[-1].dtype == torch.float32
    assert torch.allclose(seen[-1], torch.tensor([0.0, 4000 / T, 1000 * (T - 1) / T]))


def test_adapter_refusals():
    class Returns(nn.Module):
        def forward(self, x, t):
            return (x,)

    with pytest.raises(TypeError, match="tensor or an object whose .sample"):
        ZeroIndexedNetwork(Returns())(torch.zeros(1, 2), torch.ones(1, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ZeroIndexedNetwork(lambda x, t: x)
    for bad in (0, -1.0, "1"):
        with pytest.raises(ValueError, match="timestep_scale"):
            ZeroIndexedNetwork(nn.Identity(), timestep_scale=bad)


# ---------------------------------------------------------------------- the bound, against a hand-written model
@pytest.mark.parametrize(
    "prediction_type, variance_type, prediction, variance, out_channels",
    [
        ("epsilon", "fixed_small", "epsilon", "small", 1),
        ("sample", "fixed_large", "x0", "large", 1),
        ("v_prediction", "learned_range", "v", "learned", 2),
    ],
)
def test_bound_equals_native_model_with_shifted_timesteps(
    digits, prediction_type, variance_type, prediction, variance, out_channels
):
    net = _stand_in(out_channels)
    config = _config(prediction_type=prediction_type, variance_type=variance_type)
    adapted = model_from_diffusers(net, config, decoder="discretized", levels=17, data_shape=(1, 8, 8))
    native = DiffusionModel(Shifted(net), NoiseSchedule.linear(T), prediction, variance, "discretized", 17)
    for a, b in ((adapted, native), (adapted.respaced(5), native.respaced(5))):
        torch.manual_seed(1)
        ours = bound_terms(a, digits, num_samples=2)
        torch.manual_seed(1)
        theirs = bound_terms(b, digits, num_samples=2)
        assert torch.isfinite(ours.nats).all()
        assert torch.equal(ours.nats, theirs.nats)
        assert ours.model == theirs.model


# ---------------------------------------------------------------------- the scheduler's settings
@pytest.mark.parametrize("name, ours", [("epsilon", "epsilon"), ("sample", "x0"), ("v_prediction", "v")])
def test_prediction_types(name, ours):
    assert model_from_diffusers(_stand_in(), _config(prediction_type=name)).prediction.name == ours


@pytest.mark.parametrize(
    "name, ours, channels",
    [
        ("fixed_small", "small", 1),
        ("fixed_small_log", "small", 1),
        ("fixed_large", "large", 1),
        ("learned_range", "learned", 2),
    ],
)
def test_variance_types(name, ours, channels):
    assert model_from_diffusers(_stand_in(channels), _config(variance_type=name)).variance.name == ours
    assert model_from_diffusers(_stand_in(), _config(variance_type=name), variance="large").variance.name == "large"


def test_missing_keys_take_ddpm_scheduler_defaults():
    model = model_from_diffusers(_stand_in(), {"beta_schedule": "linear"})
    assert (model.prediction.name, model.variance.name) == ("epsilon", "small")
    assert torch.equal(model.schedule.betas, NoiseSchedule.linear(1000, 1e-4, 0.02).betas)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"prediction_type": "noise"}, "prediction_type must be one of"),
        ({"variance_type": "learned"}, "variance itself"),
        ({"variance_type": "fixed_large_log"}, "square root of log"),
        ({"variance_type": "other"}, "variance_type must be one of"),
        ({"variance_type": ["fixed_small"]}, r"variance_type must be one of .*, got \['fixed_small'\]"),
        ({"prediction_type": {"kind": "epsilon"}}, r"prediction_type must be one of .*, got \{'kind': 'epsilon'\}"),
        ({"rescale_betas_zero_snr": True}, "zero terminal SNR"),
        ({"beta_schedule": None}, "neither beta_schedule nor trained_betas"),
        ({"beta_schedule": "sigmoid"}, "not one of the closed forms"),
        ({"num_train_timesteps": 1}, "num_train_timesteps must be an integer >= 2"),
        ({"num_train_timesteps": "12"}, "num_train_timesteps must be an integer >= 2"),
        ({"num_train_timesteps": True}, "num_train_timesteps must be an integer >= 2"),
        ({"trained_betas": [0.1] * (T - 1)}, "trained_betas has 11 values"),
    ],
)
def test_bad_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        model_from_diffusers(_stand_in(), _config(**changes))


@pytest.mark.parametrize(
    "network_config, variance_type, data_shape, message",
    [
        ({"in_channels": 1, "out_channels": 1}, "learned_range", None, "needs 2"),
        ({"in_channels": 1, "out_channels": 2}, "fixed_small", None, "needs 1"),
        ({"in_channels": 1, "out_channels": 1}, "fixed_small", (3, 8, 8), "takes 1 channels, the data have 3"),
        ({"num_train_timesteps": 50}, "fixed_small", None, "built for 50 timesteps"),
        ({"time_embedding_type": "fourier"}, "fixed_small", None, "score-SDE"),
    ],
)
def test_network_config_contradicting_scheduler_or_data_is_refused(network_config, variance_type, data_shape, message):
    net = _stand_in()
    net.config = network_config
    with pytest.raises(ValueError, match=message):
        model_from_diffusers(net, _config(variance_type=variance_type), data_shape=data_shape)
    net.config = {"in_channels": 1, "out_channels": 1, "num_train_timesteps": T}  # a consistent one passes
    model_from_diffusers(net, _config(), data_shape=(1, 8, 8))


def test_scheduler_config_sources(tmp_path):
    config = _config(clip_sample=True, thresholding=False, timestep_spacing="leading", beta_end=0.03)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    assert scheduler_config(tmp_path) == config  # a pipeline folder
    assert scheduler_config(tmp_path / "scheduler" / "scheduler_config.json") == config
    assert scheduler_config(SimpleNamespace(config=config)) == config
    assert sampler_options(config) == {"clip_sample": True, "thresholding": False, "timestep_spacing": "leading"}
    assert torch.equal(schedule_from_config(tmp_path).betas, NoiseSchedule.linear(T, 1e-4, 0.03).betas)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no scheduler_config.json"):
        scheduler_config(tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot read"):
        scheduler_config(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not hold a JSON object"):
        scheduler_config(tmp_path / "list.json")
    with pytest.raises(TypeError, match="a scheduler must be"):
        scheduler_config(42)


# ---------------------------------------------------------------------- betas in float64
def _cosine_betas(n):
    """diffusers' betas_for_alpha_bar ("squaredcos_cap_v2"), written out in Python floats."""
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return [min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)]


def test_betas_are_the_closed_forms_in_float64():
    n, b0, b1 = 1000, 0.00085, 0.012
    linear = schedule_from_config(
        {"num_train_timesteps": n, "beta_schedule": "linear", "beta_start": b0, "beta_end": b1}
    )
    assert linear.betas.dtype == torch.float64
    assert torch.equal(linear.betas, torch.linspace(b0, b1, n, dtype=torch.float64))
    assert not torch.equal(linear.betas, torch.linspace(b0, b1, n).double())  # not diffusers' float32, cast
    scaled = schedule_from_config(
        {"num_train_timesteps": n, "beta_schedule": "scaled_linear", "beta_start": b0, "beta_end": b1}
    )
    expected = np.linspace(b0**0.5, b1**0.5, n) ** 2
    np.testing.assert_allclose(scaled.betas.numpy(), expected, rtol=1e-14, atol=0)
    cosine = schedule_from_config({"num_train_timesteps": n, "beta_schedule": "squaredcos_cap_v2"})
    np.testing.assert_allclose(cosine.betas.numpy(), _cosine_betas(n), rtol=1e-12, atol=0)
    trained = [0.1, 0.2, 0.3]
    assert schedule_from_config({"num_train_timesteps": 3, "trained_betas": trained}).betas.tolist() == trained
    other = SimpleNamespace(
        config={"num_train_timesteps": 3, "beta_schedule": "sigmoid"}, betas=torch.tensor([0.1, 0.2, 0.3])
    )
    assert torch.equal(schedule_from_config(other).betas, other.betas.double())


# ---------------------------------------------------------------------- state dicts and import paths
def test_load_network(tmp_path):
    net = _stand_in()
    state = {"ema": {**{f"model.{k}": v for k, v in net.state_dict().items()}, "other.w": torch.zeros(1)}, "step": 3}
    torch.save(state, tmp_path / "ckpt.pt")
    loaded = load_network(STAND_IN, tmp_path / "ckpt.pt", {"steps": T}, key="ema", prefix="model.")
    assert not loaded.training
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    with pytest.raises(ValueError, match="does not fit"):
        load_network(STAND_IN, tmp_path / "ckpt.pt", {"steps": T + 1}, key="ema", prefix="model.")
    with pytest.raises(KeyError, match="no entry 'ema.nothing'"):
        load_network(STAND_IN, tmp_path / "ckpt.pt", {"steps": T}, key="ema.nothing")
    with pytest.raises(ValueError, match="starts with 'net.'"):
        load_network(STAND_IN, tmp_path / "ckpt.pt", {"steps": T}, key="ema", prefix="net.")
    with pytest.raises(ValueError, match="'package.module:Class'"):
        load_network(STAND_IN.replace(":", "."), tmp_path / "ckpt.pt")
    torch.save({"w": SimpleNamespace(a=1)}, tmp_path / "code.pt")  # unpickling it would call a global
    with pytest.raises(ValueError, match="could run code"):
        load_network(STAND_IN, tmp_path / "code.pt", {"steps": T})
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(dict(net.state_dict()), tmp_path / "w.safetensors")
    loaded = load_network(STAND_IN, tmp_path / "w.safetensors", {"steps": T})
    assert torch.equal(loaded.embed.weight, net.embed.weight)


# ---------------------------------------------------------------------- the script, without diffusers
def _script(argv):
    return runpy.run_path(str(SCRIPT))["main"](argv)


def test_script_with_import_path_and_data_files(tmp_path, digits, capsys):
    torch.save(_stand_in().state_dict(), tmp_path / "net.pt")
    np.save(tmp_path / "digits.npy", ((digits + 1) * 8).round().long().numpy())  # levels 0..16
    common = ["--network", STAND_IN, "--kwargs", json.dumps({"steps": T}), "--state-dict", str(tmp_path / "net.pt")]
    common += ["--beta-schedule", "linear", "--num-train-timesteps", str(T), "--prediction-type", "v_prediction"]
    assert _script([*common, "--dataset", "digits", "--max-examples", "4", "--out", str(tmp_path / "a")]) == 0
    assert (
        _script([*common, "--data", str(tmp_path / "digits.npy"), "--levels", "17", "--out", str(tmp_path / "b")]) == 0
    )
    a, b = (json.loads((tmp_path / f / "bound.json").read_text()) for f in "ab")
    assert a["terms_nats"] == b["terms_nats"]  # the integer file, scaled to the grid, is the same data
    assert (a["num_steps"], a["num_examples"], a["levels"], a["model"]["prediction"]) == (T, 4, 17, "v")
    config = _config(prediction_type="v_prediction")
    model = model_from_diffusers(_stand_in(), config, decoder="discretized", levels=17).eval()
    torch.manual_seed(0)  # the script's --seed
    direct = bound_terms(model, digits)
    np.testing.assert_allclose(a["terms_nats"], direct.mean().double().numpy(), rtol=1e-12)
    assert a["scheduler"] == config and a["sampler_options_not_in_bound"] == {}
    np.save(tmp_path / "bad.npy", np.full((2, 1, 8, 8), 17))
    assert _script([*common, "--data", str(tmp_path / "bad.npy"), "--levels", "17", "--out", str(tmp_path / "c")]) == 2
    assert "integer data must lie in 0..16" in capsys.readouterr().err
    assert _script(common[:4] + ["--dataset", "digits", "--out", str(tmp_path / "d")]) == 2
    assert "--network needs --state-dict" in capsys.readouterr().err


# ---------------------------------------------------------------------- with diffusers
def test_closed_forms_match_diffusers_and_step_agrees():
    diffusers = pytest.importorskip("diffusers")
    for kind in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        scheduler = diffusers.DDPMScheduler(
            num_train_timesteps=1000, beta_schedule=kind, beta_start=0.00085, beta_end=0.012
        )
        ours = schedule_from_config(scheduler).betas
        torch.testing.assert_close(ours, scheduler.betas.double(), rtol=4 * 2**-23, atol=0)  # float32 rounding
    sigmoid = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="sigmoid")
    assert torch.equal(schedule_from_config(sigmoid).betas, sigmoid.betas.double())

    x = torch.randn(3, 1, 8, 8)
    for prediction_type in ("epsilon", "sample", "v_prediction"):
        for variance_type in ("fixed_small", "fixed_small_log", "fixed_large", "learned_range"):
            scheduler = diffusers.DDPMScheduler(
                num_train_timesteps=T, prediction_type=prediction_type, variance_type=variance_type, clip_sample=False
            )
            net = _stand_in(2 if variance_type == "learned_range" else 1)
            model = model_from_diffusers(net, scheduler)
            for t in (1, 2, T // 2, T):
                with torch.no_grad():
                    step = model.predict(x, torch.full((3,), t))
                    out = net(x, torch.full((3,), t - 1)).sample
                prev = scheduler.step(out, t - 1, x, generator=torch.Generator().manual_seed(t)).prev_sample
                noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
                # at t = 1 diffusers returns the mean (no noise): pyrodiff's decoder mean
                expected = step.mean if t == 1 else step.mean + step.variance.sqrt() * noise
                torch.testing.assert_close(prev, expected, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("layout", ["pipeline", "model"])
def test_diffusers_unet_saved_loaded_and_reported(tmp_path, digits, layout):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        time_embedding_type="learned",  # an embedding table of T rows: timestep T fails
        num_train_timesteps=T,
    ).eval()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T)
    folder = tmp_path / "saved"
    unet.save_pretrained(folder / "unet" if layout == "pipeline" else folder)
    scheduler.save_pretrained(folder / "scheduler" if layout == "pipeline" else folder)

    network, config = load_diffusers(folder)
    assert (config["_class_name"], config["num_train_timesteps"]) == ("DDPMScheduler", T)
    x, t = torch.randn(T, 1, 8, 8), torch.arange(1, T + 1)
    model = model_from_diffusers(network, config, decoder="discretized", levels=17, data_shape=(1, 8, 8)).eval()
    with torch.no_grad():
        assert torch.equal(model.network(x, t), unet(x, t - 1).sample)
        with pytest.raises(IndexError):
            unet(x, t)
    if layout == "model":
        return
    out = tmp_path / "report"
    assert _script(["--diffusers", str(folder), "--dataset", "digits", "--max-examples", "4", "--out", str(out)]) == 0
    summary = json.loads((out / "bound.json").read_text())
    torch.manual_seed(0)
    direct = bound_terms(model, digits)
    np.testing.assert_allclose(summary["terms_nats"], direct.mean().double().numpy(), rtol=1e-12)
    assert (summary["num_steps"], summary["num_examples"], summary["levels"]) == (T, 4, 17)
    assert summary["sampler_options_not_in_bound"]["clip_sample"] is True
    assert summary["scheduler"]["_class_name"] == "DDPMScheduler"


@pytest.mark.parametrize(
    ("import_path", "kwargs", "message"),
    [
        ("os:system", {"command": "touch {marker}"}, "os:system is not a class"),
        ("subprocess:Popen", {"args": ["touch", "{marker}"]}, "subprocess:Popen is not a torch.nn.Module class"),
        ("torch.nn:functional", {}, "torch.nn:functional is not a class"),
    ],
)
def test_load_network_refuses_what_is_not_a_network_class_before_calling_it(tmp_path, import_path, kwargs, message):
    """``--network MOD:CLASS`` is trusted code by design, but a name that is not an ``nn.Module`` class (a function
    such as ``os.system``, another class such as ``subprocess.Popen``) is refused before it is called."""
    marker = tmp_path / "MARKER"
    kwargs = {
        k: [a.format(marker=marker) for a in v] if isinstance(v, list) else v.format(marker=marker)
        for k, v in kwargs.items()
    }
    torch.save({}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match=message):
        load_network(import_path, tmp_path / "weights.pt", kwargs)
    assert not marker.exists()
