"""`r1jax plan`: per-device memory without the hardware. On the 8 local devices the train step is
compiled and XLA's argument bytes check the analytic state bytes; the 671B config on 256 devices is
planned analytically and lowered for an abstract mesh."""

import io

import pytest

from r1jax.errors import ConfigError
from r1jax.plan import HARDWARE, plan_command


def test_tiny_plan_compiles_and_matches_the_analytic_state_bytes():
    out = io.StringIO()
    p = plan_command("configs/train/tiny_pretrain.yaml", ["data.batch_size=16", "data.seq_len=64",
                     "model.moe_dispatch=capacity_ep"], "data=2,expert=4", out=out)
    assert p.mesh == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1} and p.rows_per_device == 2
    args = p.compiled["argument_size_in_bytes"]
    state = p.analytic["params"] + p.analytic["optimizer state (Adam mu, nu)"]
    batch = 5 * p.rows_per_device * 64 * 4  # five int32 [rows, seq] arrays
    # What is left is the step counter, the RNG key and Adam's step counts: a few scalars.
    assert 0 <= args - state - batch < 256, (args, state, batch)
    assert p.compiled["temp_size_in_bytes"] > 0 and p.lowered_for is None
    text = out.getvalue()
    assert "| params |" in text and "XLA memory_analysis" in text and "mesh data=2 fsdp=1 expert=4 tensor=1" in text


def test_671b_on_256_h100_is_planned_analytically_and_lowered():
    out = io.StringIO()
    p = plan_command("configs/model/deepseek_v3_671b.yaml", ["model.moe_dispatch=capacity_ep"],
                     "data=1,fsdp=4,expert=8,tensor=8", devices=256, hardware="h100", out=out)
    assert p.compiled is None and p.lowered_for == "cuda"
    # ~671B fp32 params spread over 256 devices (everything is split: experts, FSDP, tensor).
    assert 10.5e9 < p.analytic["params"] < 11.2e9
    assert p.analytic["optimizer state (Adam mu, nu)"] == pytest.approx(2 * p.analytic["gradients"])
    assert p.analytic["total"] < HARDWARE["h100"].memory and "(fits" in out.getvalue()
    assert p.rows_per_device == 1 and p.seq_len == 4096


def test_dropless_expert_parallel_lowers_for_gpu():
    p = plan_command("configs/model/tiny_v3.yaml", ["model.moe_dispatch=ragged_ep"], "data=1,fsdp=4,expert=8",
                     devices=32, hardware="h100", seq_len=128, out=io.StringIO())
    assert p.lowered_for == "cuda"


@pytest.mark.parametrize("mesh,kw,match", [
    ("data=1,fsdp=-1,expert=3", dict(devices=256), r"mesh.fsdp: -1 cannot fill the mesh"),
    ("data=1,fsdp=-1,expert=8,tensor=3", dict(devices=192), r"mesh.tensor: num_attention_heads=128"),
    ("data=2,expert=4", dict(hardware="a100"), r"--hardware: unknown 'a100'"),
    ("data=2,expert=4", dict(batch_size=12), r"data.batch_size: 12 rows do not split"),
])
def test_bad_plans_are_named(mesh, kw, match):
    with pytest.raises(ConfigError, match=match):
        plan_command("configs/model/deepseek_v3_671b.yaml", [], mesh, out=io.StringIO(), **kw)
