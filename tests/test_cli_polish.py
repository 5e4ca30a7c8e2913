"""The command line's rough edges (issue 16): --version, `config show`, the hint for `--key value`,
plan's device count from --mesh, a missing --ckpt, and every checkpoint reader taking a training run's
directory, its checkpoints/ or one step in it."""

import dataclasses
import tomllib
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from test_checkpoint import cfg, make_state, opt_state, params  # noqa: F401  (fixtures)

from r1jax import api
from r1jax import config as config_lib
from r1jax.checkpoint.kind import checkpoint_kind
from r1jax.checkpoint.manager import CheckpointConfig, CheckpointManager
from r1jax.checkpoint.orbax_io import load_model
from r1jax.cli import main
from r1jax.train.run import write_run_config

REPO = Path(__file__).resolve().parents[1]
SFT = str(REPO / "configs/train/tiny_sft.yaml")


def test_version_is_the_packages(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out == f"r1jax {version}\n"


def _leaves(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("rope_scaling", "hf_extra", "weights"):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_config_show_prints_every_field_with_its_default_and_loads_back(capsys):
    assert main(["config", "show", SFT, "steps=3", "optimizer.learning_rate=0.01"]) == 0
    text = capsys.readouterr().out
    expected = config_lib.load_stage(SFT, ["steps=3", "optimizer.learning_rate=0.01"])
    shown = yaml.safe_load(text)
    assert config_lib.from_dict(config_lib.TrainConfig, shown) == expected  # the resolved config, whole
    assert _leaves(shown).keys() == _leaves(config_lib.to_dict(expected)).keys()  # every field
    lines = dict(l.strip().split(": ", 1) for l in text.splitlines() if ": " in l and not l.startswith(" "))
    default_steps = {f.name: f.default for f in dataclasses.fields(config_lib.TrainConfig)}["steps"]
    assert lines["steps"] == f"3  # default: {default_steps}"
    assert lines["seed"] == "0  # (default)"
    assert "  learning_rate: 0.01  # default: 0.0003" in text.splitlines()


def test_config_show_takes_model_and_eval_configs(capsys):
    assert main(["config", "show", str(REPO / "configs/model/tiny_v3.yaml"), "hidden_size=32"]) == 0
    model = yaml.safe_load(capsys.readouterr().out)
    assert model["hidden_size"] == 32 and model["num_hidden_layers"] == 3
    assert main(["config", "show", str(REPO / "configs/eval/task_pass_at_k.yaml"), "model=somewhere"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"] == "somewhere"


def test_config_show_of_a_pipeline_shows_each_stage_resolved(capsys):
    from r1jax.pipeline import load_pipeline, resolve_stage

    path = str(REPO / "configs/pipeline/r1_tiny.yaml")
    assert main(["config", "show", path]) == 0
    blocks = capsys.readouterr().out.split("\n# stages[")
    pipeline = load_pipeline(path)
    assert len(blocks) == 1 + len(pipeline.stages)
    for i, block in enumerate(blocks[1:]):
        header, body = block.split("\n", 1)
        stage = resolve_stage(pipeline, i)
        assert header == f"{i}]: {pipeline.stages[i].name} ({pipeline.stages[i].kind}), resolved"
        assert config_lib.from_dict(type(stage), yaml.safe_load(body)) == stage


@pytest.mark.parametrize("argv, hint", [
    (["train", SFT, "--steps", "5"], "--steps 5: overrides are written key=value, without dashes: steps=5"),
    (["train", SFT, "--optimizer.learning_rate=1e-3"], "without dashes: optimizer.learning_rate=1e-3"),
    (["eval", "x.yaml", "--num-samples", "4"], "without dashes: num_samples=4"),
])
def test_a_flag_for_an_override_is_answered_with_how_to_write_it(capsys, argv, hint):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert hint in capsys.readouterr().err


def test_unknown_flags_of_commands_without_overrides_stay_argparse_errors(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", "m", "--prompts", "p", "--out", "o", "--bogus", "1"])
    assert "unrecognized arguments: --bogus 1" in capsys.readouterr().err


def test_plan_with_a_mesh_and_no_devices_uses_the_mesh(capsys):
    from r1jax.plan import load_plan_config

    _, n = load_plan_config(REPO / "configs/model/tiny_v3.yaml", mesh_spec="fsdp=2,expert=4")
    assert n == 8
    _, n = load_plan_config(REPO / "configs/model/tiny_v3.yaml", mesh_spec="expert=2")
    assert n == 2  # not the 8 simulated devices of this process
    _, n = load_plan_config(REPO / "configs/model/tiny_v3.yaml", mesh_spec="data=-1,expert=2")
    assert n == jax.device_count()  # -1 asks to fill the devices there are


def test_sample_on_a_missing_checkpoint_says_so(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt_ids": [1, 2]}\n')
    argv = ["sample", "--ckpt", str(tmp_path / "nope"), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"r1jax sample: error: --ckpt {tmp_path}/nope: does not exist")


@pytest.fixture
def run_dir(tmp_path, cfg, make_state):
    """A training run's directory as `r1jax train` leaves it: RUN/config.yaml is the whole stage config
    (with keys no ModelConfig has), RUN/checkpoints/ the CheckpointManager's steps 1 and 2."""
    run = tmp_path / "run"
    ckpt = CheckpointConfig(directory=str(run / "checkpoints"), save_interval_steps=1, async_save=False)
    with CheckpointManager(ckpt, model_config=cfg) as mngr:
        for step in (1, 2):
            state = make_state(step=step)
            state = state.replace(params=jax.tree.map(lambda p, s=step: p * s, state.params))
            mngr.save(step, state, None)
    write_run_config(run, config_lib.load_stage(SFT), cfg)
    assert "balance_loss_alpha" in (run / "config.yaml").read_text()  # not a model config
    return run


def test_every_checkpoint_reader_takes_a_run_dir_its_checkpoints_or_one_step(run_dir, params):
    for where, step in ((run_dir, 2), (run_dir / "checkpoints", 2), (run_dir / "checkpoints" / "1", 1)):
        assert checkpoint_kind(where) == "orbax"
        assert api.read_config(where).hidden_size == params["embed"].shape[1]
        for _, loaded in (load_model(where), api.load_pretrained(where)):  # load_pretrained: init_from, eval, sample
            np.testing.assert_array_equal(np.asarray(loaded["embed"]), np.asarray(params["embed"]) * step)


def test_convert_orbax_to_hf_of_a_run_dir(run_dir, tmp_path, params):
    from safetensors.numpy import load_file

    for src, step in ((run_dir, 2), (run_dir / "checkpoints" / "1", 1)):
        dst = tmp_path / f"hf-{step}"
        assert main(["convert", "orbax-to-hf", str(src), str(dst)]) == 0
        tensors = {k: v for f in dst.glob("*.safetensors") for k, v in load_file(f).items()}
        np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], np.asarray(params["embed"]) * step)
        assert not (dst / "metrics.jsonl").exists() and not (dst / "config.yaml").exists()


def test_overwrite_is_named_as_the_flag(tmp_path, capsys):
    from convert_fixtures import moe_config, write_random_hf

    write_random_hf(tmp_path / "hf", moe_config())
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "x").write_text("")
    assert main(["convert", "hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "dst")]) == 2
    assert "(pass --overwrite to replace it" in capsys.readouterr().err
