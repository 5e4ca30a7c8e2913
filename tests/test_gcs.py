"""Run directories, checkpoints and conversions on gs:// (issue 16), against a GCS emulator the tests
start on loopback (tests/gcs_emulator.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gcs_emulator import gcs  # noqa: F401  (the fixture)
from test_checkpoint import cfg, make_state, opt_state, params  # noqa: F401  (fixtures)

from r1jax import paths

REPO = Path(__file__).resolve().parents[1]


def r1jax(*argv, cwd):
    """The CLI in its own one-device process (the emulator's environment is inherited)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", "r1jax.cli", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env=env)


def listing(uri) -> list[str]:
    return sorted(p.name for p in paths.as_path(uri).iterdir())


TOKENIZER_FILES = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]  # beside config.yaml


SFT = ["configs/train/tiny_sft.yaml", "log_every=1", "eval_every=0", "eval_data=null", "progress=false",
       "data.seq_len=64", "data.batch_size=4", "checkpoint.save_interval_steps=2", "checkpoint.async_save=false",
       "optimizer.warmup_steps=1"]


def test_paths_keep_gs_uris_and_local_paths_apart(gcs):
    uri = f"{gcs}/a/b"
    assert paths.is_remote(uri) and not paths.is_remote("runs/gs:/x") and not paths.is_remote(Path("/tmp"))
    assert str(paths.as_path(uri)) == uri  # pathlib would make it gs:/r1jax-test/a/b
    assert isinstance(paths.as_path("runs/x"), Path)
    (paths.as_path(uri) / "f.txt").write_text("hi")
    assert listing(uri) == ["f.txt"] and (paths.as_path(uri) / "f.txt").read_text() == "hi"
    with pytest.raises(Exception, match="s3:// scheme is not supported"):
        paths.as_path("s3://bucket/x")


@pytest.mark.slow
def test_sft_writes_its_run_to_gs_and_resumes_from_it(gcs, tmp_path):
    run = f"{gcs}/sft-run"
    first = r1jax("train", *SFT, "steps=2", f"out_dir={run}", cwd=REPO)
    assert first.returncode == 0, first.stderr[-4000:]
    assert f"completed at step 2; run directory {run}" in first.stdout
    assert not (REPO / "gs:").exists()  # the old bug: a local ./gs:/bucket/...
    assert listing(run) == ["checkpoints", "config.yaml", "metrics.jsonl", "result.json", "tensorboard"]
    assert listing(f"{run}/checkpoints") == ["2", "config.yaml"] + TOKENIZER_FILES
    rows = [json.loads(l) for l in paths.as_path(f"{run}/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert listing(f"{run}/tensorboard")  # the event file was copied up

    again = r1jax("train", *SFT, "steps=4", f"out_dir={run}", cwd=REPO)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "completed at step 4" in again.stdout
    assert listing(f"{run}/checkpoints") == ["2", "4", "config.yaml"] + TOKENIZER_FILES
    rows2 = [json.loads(l) for l in paths.as_path(f"{run}/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows2] == [1, 2, 3, 4]
    assert rows2[:2] == rows  # resumed at step 2: the first run's rows are kept, not re-run

    # The same two runs locally, for the losses of the resumed steps: the bucket changes nothing.
    local = tmp_path / "run"
    assert r1jax("train", *SFT, "steps=4", f"out_dir={local}", cwd=REPO).returncode == 0
    local_rows = [json.loads(l) for l in (local / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows2] == [r["loss"] for r in local_rows]

    # The run directory on gs:// exported to gs:// (its config.yaml is the run's, not a model's): the same
    # tensors and tokenizer files as the local run's export.
    exported = r1jax("convert", "orbax-to-hf", run, f"{gcs}/sft-hf", cwd=REPO)
    assert exported.returncode == 0, exported.stderr[-4000:]
    assert r1jax("convert", "orbax-to-hf", local, tmp_path / "local-hf", cwd=REPO).returncode == 0
    remote_hf = paths.download_tree(f"{gcs}/sft-hf", tmp_path / "remote-hf")
    assert sorted(p.name for p in remote_hf.iterdir()) == sorted(p.name for p in (tmp_path / "local-hf").iterdir())
    assert "tokenizer.json" in listing(f"{gcs}/sft-hf")
    import numpy as np

    ours, theirs = _tensors(remote_hf), _tensors(tmp_path / "local-hf")
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def _tensors(hf_dir: Path) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_convert_both_ways_from_and_to_gs(gcs, tmp_path, capsys):
    """HF (local) -> orbax on gs:// -> HF on gs:// -> orbax (local): every tensor comes back bit for bit,
    the orbax checkpoint on gs:// loads with load_model, and an existing gs:// destination is refused
    without --overwrite before any work."""
    import numpy as np
    from convert_fixtures import moe_config, write_random_hf

    from r1jax.checkpoint.orbax_io import load_model
    from r1jax.cli import main

    cfg = moe_config()
    src = tmp_path / "hf"
    write_random_hf(src, cfg)
    (src / "tokenizer.json").write_text("{}")  # an asset: travels with the weights both ways
    orbax_uri, hf_uri = f"{gcs}/conv/orbax", f"{gcs}/conv/hf"
    assert main(["convert", "hf-to-orbax", str(src), orbax_uri]) == 0
    assert listing(orbax_uri) == ["config.yaml", "generation_config.json", "params", "tokenizer.json"]
    loaded_cfg, params = load_model(orbax_uri)  # tensorstore reads gs:// itself
    assert loaded_cfg.hidden_size == cfg.hidden_size
    np.testing.assert_array_equal(np.asarray(params["embed"]), _tensors(src)["model.embed_tokens.weight"])

    assert main(["convert", "orbax-to-hf", orbax_uri, hf_uri]) == 0
    assert "model.safetensors" in listing(hf_uri) and "tokenizer.json" in listing(hf_uri)
    back = paths.download_tree(hf_uri, tmp_path / "hf_back")
    original = _tensors(src)
    again = _tensors(back)
    assert sorted(again) == sorted(original)
    for name in original:
        np.testing.assert_array_equal(again[name], original[name], err_msg=name)

    local = tmp_path / "orbax_back"
    assert main(["convert", "hf-to-orbax", hf_uri, str(local)]) == 0
    _, params_back = load_model(local)
    np.testing.assert_array_equal(np.asarray(params_back["embed"]), np.asarray(params["embed"]))

    capsys.readouterr()
    assert main(["convert", "orbax-to-hf", orbax_uri, hf_uri]) == 2  # exists: refused, untouched
    assert f"{hf_uri}: already exists and is not empty" in capsys.readouterr().err
    assert main(["convert", "orbax-to-hf", orbax_uri, hf_uri, "--overwrite"]) == 0


GRPO = ["configs/train/tiny_grpo.yaml", "eval_prompts=null", "samples_every=1", "progress=false", "max_new_tokens=8",
        "prompts.batch_size=2", "num_generations=4", "checkpoint.save_interval_steps=1", "checkpoint.async_save=false"]


@pytest.mark.slow
def test_grpo_writes_its_run_to_gs_and_resumes_from_it(gcs):
    run = f"{gcs}/grpo-run"
    first = r1jax("train", *GRPO, "steps=1", f"out_dir={run}", cwd=REPO)
    assert first.returncode == 0, first.stderr[-4000:]
    assert listing(f"{run}/checkpoints") == ["1", "config.yaml"] + TOKENIZER_FILES
    again = r1jax("train", *GRPO, "steps=2", f"out_dir={run}", cwd=REPO)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "completed at step 2" in again.stdout
    assert listing(f"{run}/checkpoints") == ["1", "2", "config.yaml"] + TOKENIZER_FILES
    assert listing(f"{run}/samples") == ["step_000001.jsonl", "step_000002.jsonl"]
    rows = [json.loads(l) for l in paths.as_path(f"{run}/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert json.loads(paths.as_path(f"{run}/result.json").read_text())["step"] == 2


def test_data_files_are_read_from_gs(gcs, tmp_path):
    """A jsonl and a parquet file on gs://, named by path and by glob, give the rows a local copy gives."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from r1jax.data.sources import open_source
    from r1jax.errors import DataError

    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(5)]
    local = tmp_path / "d.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.parquet"):
        paths.copy_file(tmp_path / name, f"{gcs}/data/{name}")
    (jsonl,) = open_source(f"{gcs}/data/d.jsonl")
    assert [json.loads(jsonl[i].record) for i in range(len(jsonl))] == rows
    sources = open_source(f"{gcs}/data/*.parquet")
    assert len(sources) == 1 and len(sources[0]) == 5
    assert [dict(sources[0][i].record) for i in range(5)] == rows
    # a `datasets.save_to_disk` directory on the bucket: its Arrow files, in its own order
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"), num_shards=2)
    paths.upload_tree(tmp_path / "saved", f"{gcs}/data/saved")
    saved = open_source(f"{gcs}/data/saved")
    assert [dict(s[i].record) for s in saved for i in range(len(s))] == rows
    with pytest.raises(DataError, match=f"{gcs}/data: a directory, but not one `datasets.save_to_disk` wrote"):
        open_source(f"{gcs}/data")
    with pytest.raises(DataError, match=f"{gcs}/data/missing.jsonl: no such file"):
        open_source(f"{gcs}/data/missing.jsonl")
    with pytest.raises(DataError, match="no files match"):
        open_source(f"{gcs}/nothing/*.jsonl")


def test_save_and_load_pretrained_on_gs(gcs, tmp_path):
    """save_pretrained to gs:// in both formats; load_pretrained and read_config read them back exactly."""
    import jax
    import numpy as np

    import r1jax
    from r1jax.demo import tiny_config
    from r1jax.model.params import init_params

    cfg = tiny_config()
    params = init_params(cfg, jax.random.key(0))
    for fmt in ("orbax", "hf"):
        uri = f"{gcs}/pretrained/{fmt}"
        r1jax.save_pretrained(uri, cfg, params, format=fmt)
        assert r1jax.api.read_config(uri).hidden_size == cfg.hidden_size
        loaded_cfg, loaded = r1jax.load_pretrained(uri)
        assert loaded_cfg.num_hidden_layers == cfg.num_hidden_layers
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sample_reads_and_writes_gs(gcs, tmp_path):
    """`r1jax sample` with --ckpt, --prompts and --out on gs:// writes the rows it writes locally."""
    import jax

    import r1jax
    from r1jax.cli import main
    from r1jax.demo import tiny_config
    from r1jax.model.params import init_params

    cfg = tiny_config()
    local_model = tmp_path / "m"
    r1jax.save_pretrained(local_model, cfg, init_params(cfg, jax.random.key(1)), format="orbax")
    paths.upload_tree(local_model, f"{gcs}/sample/m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt_ids": [1, 5, 7]}\n{"prompt_ids": [2, 3]}\n')
    paths.copy_file(prompts, f"{gcs}/sample/p.jsonl")
    flags = ["--max-new-tokens", "4", "--temperature", "0.7", "--num-samples", "2"]
    assert main(["sample", "--ckpt", str(local_model), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
                 *flags]) == 0
    assert main(["sample", "--ckpt", f"{gcs}/sample/m", "--prompts", f"{gcs}/sample/p.jsonl",
                 "--out", f"{gcs}/sample/out/o.jsonl", *flags]) == 0
    remote = [json.loads(l) for l in paths.as_path(f"{gcs}/sample/out/o.jsonl").read_text().splitlines()]
    local = [json.loads(l) for l in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(remote) == 4 and remote == local


@pytest.mark.slow
def test_resume_on_gs_sets_a_damaged_step_aside(gcs, make_state):
    """The fallback of issue 17 on a bucket: a corrupt newest step is moved to `<step>.damaged` (a copy
    and a delete there: nothing renames) and the run resumes from the one before. Slow on the emulator
    (~50 s): it lacks GCS's server-side copy, which gcsfs tries first and retries."""
    import jax
    from test_checkpoint import assert_states_equal

    from r1jax.checkpoint.manager import CheckpointConfig, CheckpointManager

    config = CheckpointConfig(directory=f"{gcs}/damaged/ckpt", save_interval_steps=1, max_to_keep=3, async_save=False)
    with CheckpointManager(config) as mngr:
        for step in (1, 2, 3):
            mngr.save(step, make_state(step=step, seed=step), {"i": step})
    (paths.as_path(config.directory) / "3" / "data_state" / "process_0-of-1.json").write_text("{not json")
    with CheckpointManager(config) as mngr:
        step, state, data = mngr.resume(abstract_state=jax.eval_shape(lambda: make_state()))
        assert step == 2 and data == {"i": 2}
        assert_states_equal(state, make_state(step=2, seed=2))
        assert mngr.all_steps() == [1, 2]
    assert listing(config.directory) == ["1", "2", "3.damaged"]
    assert "process_0-of-1.json" in listing(f"{config.directory}/3.damaged/data_state")


def test_killed_rejection_run_on_gs_resumes_to_the_local_result(gcs, tmp_path, monkeypatch):
    """Rejection sampling into gs:// (a pipeline's rejection stage with out_dir on a bucket): killed at
    its third batch, started again, it samples only that batch and ends with the local run's dataset."""
    import jax

    from r1jax.data.tokenizer import load_tokenizer
    from r1jax.demo import tiny_config
    from r1jax.infer import sampler
    from r1jax.model.params import init_params
    from r1jax.rl import rejection
    from test_rejection import Killed, rcfg

    cfg = tiny_config()
    model = (init_params(cfg, jax.random.key(0)), cfg)
    monkeypatch.setattr(rejection, "_keep", lambda prompt, text, *a: None if len(text) % 2 else "incorrect")
    monkeypatch.setattr(rejection, "SYNC_EVERY_S", 0.0)  # every batch reaches the bucket
    tok = load_tokenizer("builtin")
    ref = rejection.rejection_sample(*model, rcfg(), tok, tmp_path / "ref" / "data.jsonl")

    real, calls = sampler.sample, []

    def dies_on_third_batch(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return real(*a, **k)

    out = f"{gcs}/rejection/data.jsonl"
    monkeypatch.setattr(sampler, "sample", dies_on_third_batch)
    with pytest.raises(Killed):
        rejection.rejection_sample(*model, rcfg(), tok, out)
    assert listing(f"{gcs}/rejection") == ["data.jsonl.progress.json", "data.jsonl.tmp"]
    calls.clear()
    monkeypatch.setattr(sampler, "sample", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert rejection.rejection_sample(*model, rcfg(), tok, out) == ref
    assert len(calls) == 1  # only the third batch was sampled again
    assert paths.as_path(out).read_text() == (tmp_path / "ref" / "data.jsonl").read_text()
    assert listing(f"{gcs}/rejection") == ["data.jsonl", "data.jsonl.stats.json"]


def test_a_bucket_without_credentials_is_one_line(gcs, tmp_path, capsys, monkeypatch):
    """A gs:// failure of the GCS client (here google-auth finding no credentials, as on a machine
    without them) ends the command with one line naming the cause, exit 2, like a local disk's."""
    from google.auth.exceptions import DefaultCredentialsError

    import r1jax.sample
    from r1jax.cli import main

    def no_credentials(*a, **k):
        raise DefaultCredentialsError("Your default credentials were not found.")

    monkeypatch.setattr(r1jax.sample, "sample_file", no_credentials)
    monkeypatch.delenv("R1JAX_DEBUG", raising=False)
    out = f"{gcs}/x/o.jsonl"
    assert main(["sample", "--ckpt", "m", "--prompts", "p", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"r1jax sample: error: {out}: not written (") and "credentials were not found" in err
    assert len(err.strip().splitlines()) == 1


def test_tokenizer_files_on_gs(gcs):
    """Tokenizer.save to gs:// and load_tokenizer from there (as `data.tokenizer` or found beside a
    model's checkpoints) give the same ids and chat template."""
    from r1jax.data.tokenizer import builtin_tokenizer, load_tokenizer, model_tokenizer_dir

    tok = builtin_tokenizer()
    tok.save(f"{gcs}/tok/run/checkpoints")
    assert str(model_tokenizer_dir(f"{gcs}/tok/run")) == f"{gcs}/tok/run/checkpoints"
    back = load_tokenizer(f"{gcs}/tok/run/checkpoints")
    text = "<think>1+2=3</think> <answer>3</answer>"
    assert back.encode(text) == tok.encode(text) and back.template.source == tok.template.source

