"""Specifications: every mistake is refused when the file is loaded, in one line naming the file, the
``table.key`` and what is allowed; the bundled ones load, by path or by name from any folder."""

import copy
import dataclasses
import json
import pickle
import sys
from pathlib import Path

import pytest

from pyrodiff.training.spec import Spec, SpecError, build, find_spec, load_spec, spec_folders

MODELS = Path(__file__).parents[1] / "models"
TINY = {
    "data": {"name": "gaussians8"},
    "schedule": {"kind": "linear", "num_steps": 10},
    "model": {"decoder": "gaussian"},
    "network": {"kind": "mlp", "hidden": 8, "depth": 1},
    "training": {"steps": 2, "batch_size": 8},
}
DROP = object()


def _toml(spec: dict) -> str:
    """TOML text of a specification given as plain data (JSON's scalars and lists are TOML's)."""
    top = [f"{k} = {json.dumps(v)}" for k, v in spec.items() if not isinstance(v, dict)]
    tables = [
        f"[{t}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
        for t, values in spec.items()
        if isinstance(values, dict)
    ]
    return "\n".join(top + tables)


def _write(tmp_path: Path, changes: dict | None = None, name: str = "tiny.toml") -> Path:
    """TINY with ``changes`` ({"table": {"key": value or DROP}}, or a top-level key) written to a file."""
    spec = {t: dict(v) for t, v in TINY.items()}
    for table, values in (changes or {}).items():
        if not isinstance(values, dict):
            spec[table] = values
            continue
        spec.setdefault(table, {})
        for key, value in values.items():
            if value is DROP:
                spec[table].pop(key, None)
            else:
                spec[table][key] = value
    path = tmp_path / name
    path.write_text(_toml(spec))
    return path


def _refused(path: Path, *fragments: str) -> str:
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


@pytest.mark.parametrize("name", ["digits", "gaussians8"])
def test_the_bundled_specifications_load_and_round_trip(name):
    spec = load_spec(MODELS / f"{name}.toml")
    assert spec.name == name and spec.source == str(MODELS / f"{name}.toml")
    assert Spec.from_dict(spec.to_dict()) == spec
    assert load_spec(name) == spec  # by name too


def test_the_specification_is_typed_frozen_and_filled_with_defaults(tmp_path):
    spec = load_spec(_write(tmp_path))
    assert spec.name == "tiny"  # the file's stem
    assert spec.training.batch_size == 8 and spec.training.lr == 2e-4 and spec.training.subsample_steps == 1
    assert spec.schedule.num_steps == 10 and dict(spec.schedule.params) == {"beta_start": 1e-4, "beta_end": 0.02}
    assert spec.network.kind == "mlp" and dict(spec.network.params) == {
        "hidden": 8,
        "depth": 1,
        "fourier_exponents": (),
    }
    assert spec.model.prediction == "epsilon" and spec.model.levels is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.training.lr = 1.0
    with pytest.raises(TypeError):
        spec.network.params["hidden"] = 9
    assert copy.deepcopy(spec) == spec and pickle.loads(pickle.dumps(spec)) == spec


def test_a_checkpoint_s_plain_specification_loads_as_the_file_does(tmp_path):
    spec = load_spec(_write(tmp_path))
    old = {"name": "tiny", **TINY}  # as older checkpoints hold it: defaults not filled in
    assert Spec.from_dict(old) == spec
    assert Spec.from_dict({**old, "training": {"steps": 2, "batch_size": 8, "lr": 1}}).training.lr == 1.0
    with pytest.raises(SpecError, match=r"^checkpoint c\.pt: name must be a folder name"):
        Spec.from_dict({**old, "name": "../../x"}, source="checkpoint c.pt")


def test_fourier_exponents_are_read_once_and_build_the_network(tmp_path):
    """``fourier_exponents = [0, 3]`` in [network] is a tuple of the spec, kept through the plain form a checkpoint
    holds, and builds a network whose first layer sees the 2-D data's 2 entries and their 4 features each."""
    spec = load_spec(_write(tmp_path, {"network": {"fourier_exponents": [0, 3]}}))
    assert spec.network.params["fourier_exponents"] == (0, 3)
    assert spec.to_dict()["network"]["fourier_exponents"] == [0, 3] and Spec.from_dict(spec.to_dict()) == spec
    network = build(spec).model.network
    assert network.fourier_exponents == (0, 3) and network.inp.in_features == 2 * 5
    assert build(load_spec(_write(tmp_path))).model.network.inp.in_features == 2


def test_all_timesteps_is_the_full_chain(tmp_path):
    spec = load_spec(_write(tmp_path, {"training": {"subsample_steps": "all"}}))
    assert spec.training.subsample_steps is None
    assert spec.to_dict()["training"]["subsample_steps"] == "all"
    assert Spec.from_dict(spec.to_dict()) == spec


BAD = [
    # types and ranges of [training]
    ({"training": {"batch_size": 2.5}}, ["training.batch_size", "integer >= 1", "2.5 (float)"]),
    ({"training": {"batch_size": "64"}}, ["training.batch_size", "integer >= 1", '"64" (str)']),
    ({"training": {"batch_size": 0}}, ["training.batch_size", "integer >= 1"]),
    ({"training": {"steps": -5}}, ["training.steps", "integer >= 1", "-5"]),
    ({"training": {"seed": 10**20}}, ["training.seed", "integer in 0..9223372036854775807"]),
    ({"training": {"grad_clip": -1}}, ["training.grad_clip", "> 0"]),
    ({"training": {"lr": 0}}, ["training.lr", "> 0"]),
    ({"training": {"ema_decay": 1}}, ["training.ema_decay", "a number in [0, 1)", "1 (int)"]),
    ({"training": {"checkpoint_every": 0}}, ["training.checkpoint_every", "integer >= 1"]),
    ({"training": {"compile": 1}}, ["training.compile", "true or false"]),
    ({"training": {"amp": True}}, ["training.amp", 'false, "bf16"', "true (bool)"]),
    ({"training": {"timestep_sampler": "imp"}}, ["training.timestep_sampler", '"uniform", "importance"']),
    ({"training": {"estimator": "elbo"}}, ["training.estimator", '"mean_field", "trace"']),
    ({"training": {"objective": "simpel"}}, ["training.objective", "'elbo', 'simple', 'min_snr'"]),
    ({"training": {"micro_batches": 3}}, ["training.micro_batches", "must divide batch_size = 8"]),
    # options that depend on each other
    ({"training": {"subsample_steps": 50}}, ["training.subsample_steps", "1..T = 1..10", "50"]),
    ({"training": {"subsample_steps": 0}}, ["training.subsample_steps", "'all'"]),
    (
        {"training": {"subsample_steps": "all", "objective": "simple"}},
        ["training.subsample_steps", "objective = 'elbo'"],
    ),
    ({"model": {"variance": "learned"}, "training": {"objective": "simple"}}, ["training.objective", "learned"]),
    # [model], [data]
    ({"model": {"prediction": "eps"}}, ["model.prediction", "'epsilon', 'x0', 'v'"]),
    ({"model": {"variance": "fixed"}}, ["model.variance", "'small', 'large', 'learned'"]),
    ({"model": {"decoder": "bernoulli"}}, ["model.decoder", "'gaussian', 'discretized'"]),
    ({"model": {"levels": 17}}, ["model.decoder", "levels belong to the discretized decoder"]),
    ({"model": {"decoder": "discretized", "levels": 1}}, ["model.levels", "integer >= 2"]),
    ({"data": {"name": "mnist8"}}, ["data.name", '"digits", "gaussians8"']),
    ({"data": {"name": DROP}}, ["data.name", "required"]),
    # [schedule]: keys of the chosen kind, values checked by the schedule
    ({"schedule": {"kind": "betas", "num_steps": DROP}}, ["schedule.betas", "required"]),
    ({"schedule": {"kind": "quadratic"}}, ["schedule.kind", '"linear", "cosine", "sigmoid", "betas"']),
    ({"schedule": {"num_steps": DROP}}, ["schedule.num_steps", "required"]),
    ({"schedule": {"num_steps": 10.0}}, ["schedule.num_steps", "integer in 1..1000000"]),
    # refused before the tables are made (80 GB of them for 10^10 steps)
    ({"schedule": {"num_steps": 10**10}}, ["schedule.num_steps", "integer in 1..1000000", "10000000000"]),
    (
        {"schedule": {"kind": "cosine", "beta_start": 0.1}},
        ["unknown key schedule.beta_start", "max_beta, num_steps, s"],
    ),
    ({"schedule": {"beta_end": 2.0}}, ["[schedule]", "not strictly inside (0, 1)"]),
    (
        {"schedule": {"kind": "betas", "num_steps": 3, "betas": [0.1, 0.2]}},
        ["schedule.num_steps: must be the number of betas, 2, got 3"],
    ),
    # [network]: keys and types of the chosen kind's constructor
    (
        {"network": {"channels": 8}},
        ["unknown key network.channels", "network keys: depth, fourier_exponents, hidden, kind"],
    ),
    ({"network": {"hidden": 2.5}}, ["network.hidden", "integer"]),
    ({"network": {"kind": "resnet"}}, ["network.kind", '"unet", "mlp"']),
    # [network]: values the network cannot be built from (a zero-width MLP trained without a word before)
    ({"network": {"hidden": 0}}, ["network.hidden", "an even integer >= 2", "0"]),
    ({"network": {"hidden": 7}}, ["network.hidden", "an even integer >= 2", "7"]),
    ({"network": {"kind": "unet", "hidden": DROP, "depth": DROP, "channels": 0}}, ["network.channels", "even", "0"]),
    (
        {"network": {"kind": "unet", "hidden": DROP, "depth": DROP, "channel_mult": []}},
        ["network.channel_mult", "at least one"],
    ),
    (
        {"network": {"kind": "unet", "hidden": DROP, "depth": DROP, "channel_mult": [1, 0]}},
        ["network.channel_mult", "integer >= 1", "0"],
    ),
    ({"network": {"kind": "unet", "hidden": DROP, "depth": DROP, "num_heads": 0}}, ["network.num_heads", ">= 1"]),
    (
        {"network": {"kind": "unet", "hidden": DROP, "depth": DROP, "channels": 8, "num_heads": 3}},
        ["network.num_heads", "divides the width 16", "3"],
    ),
    (
        {"network": {"kind": "unet", "hidden": DROP, "depth": DROP, "attention_levels": [5]}},
        ["network.attention_levels", "0..2"],
    ),
    ({"network": {"kind": "unet", "hidden": DROP, "depth": DROP, "dropout": 1.0}}, ["network.dropout", "[0, 1)"]),
    (
        {"network": {"kind": "unet", "hidden": DROP, "depth": DROP, "channel_mult": [1, "2"]}},
        ["network.channel_mult", "list of integers"],
    ),
    # [network]: Fourier features' exponents, distinct integers in 0..16
    (
        {"network": {"fourier_exponents": [3, 3]}},
        ["network.fourier_exponents", "distinct integers in 0..16", "[3, 3] (list)"],
    ),
    ({"network": {"fourier_exponents": [4, 17]}}, ["network.fourier_exponents", "distinct integers in 0..16", "17"]),
    ({"network": {"fourier_exponents": [-1]}}, ["network.fourier_exponents", "integer >= 0", "[-1]"]),
    ({"network": {"fourier_exponents": [2.5]}}, ["network.fourier_exponents", "list of integers", "2.5"]),
    ({"network": {"fourier_exponents": 3}}, ["network.fourier_exponents", "list of integers", "3 (int)"]),
    # unknown keys in every table, with a suggestion
    ({"data": {"nmae": "digits"}}, ["unknown key data.nmae", "did you mean name?", "data keys: name, root"]),
    ({"model": {"levls": 17}}, ["unknown key model.levls", "did you mean levels?"]),
    ({"training": {"stpes": 3}}, ["unknown key training.stpes", "did you mean steps?", "batch_size"]),
    ({"trainig": {"steps": 3}}, ["unknown table 'trainig'", "did you mean training?", "[training]"]),
    ({"steps": 3}, ["unknown key 'steps'", "name and the tables"]),
    # the name sets the output folder runs/NAME
    ({"name": "../../../../tmp/x"}, ["name must be a folder name", '"../../../../tmp/x"']),
    ({"name": ".hidden"}, ["name must be a folder name", "not starting with '.'"]),
    ({"name": 7}, ["name must be a folder name", "7 (int)"]),
]


@pytest.mark.parametrize(("changes", "fragments"), BAD, ids=[json.dumps(c, default=str)[:60] for c, _ in BAD])
def test_a_bad_specification_is_refused_in_one_line(tmp_path, changes, fragments):
    _refused(_write(tmp_path, changes), *fragments)


def test_a_missing_table_and_invalid_toml_are_refused(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(_toml({t: v for t, v in TINY.items() if t != "network"}))
    _refused(path, "missing table(s) [network]")
    path.write_text("[data\nname = 1")
    _refused(path, "not valid TOML", "line 1")
    path.write_bytes(b"\x80\x02}q\x00\xff\xfe binary")
    _refused(path, "not valid TOML", "not UTF-8 text")
    path.write_text('data = "digits"\n' + _toml({t: v for t, v in TINY.items() if t != "data"}))
    _refused(path, "[data] must be a table")


def test_levels_other_than_the_data_s_are_refused(tmp_path):
    digits = {"data": {"name": "digits"}, "model": {"decoder": "discretized"}}
    unet = {"kind": "unet", "hidden": DROP, "depth": DROP, "channels": 8, "channel_mult": [1]}
    assert build(load_spec(_write(tmp_path, {**digits, "network": unet}))).model.levels == 17
    spec = load_spec(_write(tmp_path, {**digits, "model": {"decoder": "discretized", "levels": 17}, "network": unet}))
    assert build(spec).model.levels == 17
    spec = load_spec(_write(tmp_path, {**digits, "model": {"decoder": "discretized", "levels": 33}, "network": unet}))
    with pytest.raises(SpecError, match=r"tiny\.toml: model\.levels: the data 'digits' have 17 levels, got 33"):
        build(spec)
    with pytest.raises(SpecError, match=r"model\.decoder: 'discretized' needs integer-valued data"):
        build(load_spec(_write(tmp_path, {"model": {"decoder": "discretized"}})))
    with pytest.raises(SpecError, match=r"network\.kind: 'mlp' needs data of shape \(D,\)"):
        build(load_spec(_write(tmp_path, {"data": {"name": "digits"}})))


def test_changes_are_validated_and_differences_named(tmp_path):
    spec = load_spec(_write(tmp_path))
    faster = spec.with_changes({"training": {"lr": 1e-3}})
    assert faster.training.lr == 1e-3 and faster.source == spec.source
    assert spec.differences(faster) == {"training.lr": (2e-4, 1e-3)}
    assert spec.with_changes({"schedule": {"kind": "cosine", "num_steps": 10}}).schedule.params["s"] == 0.008
    with pytest.raises(SpecError, match="training.steps: must be an integer >= 1"):
        spec.with_changes({"training": {"steps": 0}})


def test_a_specification_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_spec("digits") == MODELS / "digits.toml"
    assert find_spec("gaussians8.toml") == MODELS / "gaussians8.toml"
    own = _write(tmp_path, name="digits.toml")
    assert find_spec("digits.toml") == Path("digits.toml") and load_spec("digits.toml").network.kind == "mlp"
    own.unlink()
    with pytest.raises(FileNotFoundError, match="no model specification at nothing, nor a bundled one.*digits"):
        find_spec("nothing")
    with pytest.raises(FileNotFoundError, match="no model specification at models/nothing.toml"):
        find_spec("models/nothing.toml")
    # a non-editable install finds them in its data files, sys.prefix/share/pyrodiff/models
    installed = tmp_path / "prefix" / "share" / "pyrodiff" / "models"
    installed.mkdir(parents=True)
    _write(installed, name="bundled.toml")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    assert spec_folders()[-1] == installed
    assert find_spec("bundled") == installed / "bundled.toml" and load_spec("bundled").name == "bundled"
