"""The planner (`jaxft compile`): TPU ahead-of-time compiles on CPU, local plans, bad input.

TPU tests need libtpu (`pip install "jax[tpu]==<jax version>"`, in the `test`
extra) and skip, saying so, only where it cannot be installed.
"""
import importlib.util
import json

import jax
import numpy as np
import pytest

from jaxft import chips, cli, config as config_lib, plan, plan_target, roofline, sharding
from jaxft.models import decoder

NO_LIBTPU = importlib.util.find_spec("libtpu") is None
needs_libtpu = pytest.mark.skipif(
    NO_LIBTPU, reason='libtpu is not installed (pip install "jax[tpu]==%s"): '
                      "TPU topologies cannot be compiled for" % jax.__version__)


def tiny(*overrides):
  return config_lib.load("tiny", list(overrides))


def analytic_per_layer(mcfg, tokens):
  """Full fine-tuning FLOPs of one layer: 6 per weight per token + full-square attention x3."""
  d, f, h = mcfg.d_model, mcfg.d_ff, mcfg.head_dim
  weights = d * mcfg.n_heads * h * 2 + d * mcfg.n_kv_heads * h * 2 + 3 * d * f
  attention = 3 * 4 * tokens * 64 * mcfg.n_heads * h  # seq_len 64: QK^T and PV, fwd + 2x bwd
  return 6 * weights * tokens + attention


@needs_libtpu
def test_tiny_compiles_for_v5e_with_consistent_memory_and_flops():
  cfg = tiny()
  rep = plan.plan(cfg, "v5e:2x2", name="tiny")
  assert rep["num_devices"] == rep["num_chips"] == 4 and rep["device_kind"].startswith("TPU v5")
  n = rep_cfg(cfg).num_params()
  assert rep["params"] == {"total": n, "trainable": n}
  # Data parallel: every chip holds the fp32 params and AdamW's two moments (+ 4-byte counts).
  state = rep["state"]["bytes_per_device"]
  assert state["trainable"] == 4 * n and 8 * n <= state["opt_state"] <= 8 * n + 64
  mem = rep["memory"]
  batch_bytes = 5 * 4 * cfg.batch_size * cfg.seq_len // 4
  state_total = sum(state.values()) + 8  # + step and rng
  # (TPU pads small arrays to (8, 128) tiles: a few hundred KiB on this tiny model)
  assert state_total + batch_bytes <= mem["argument"] <= 1.2 * (state_total + batch_bytes)
  assert mem["alias"] >= state_total - 16  # the donated state is updated in place
  assert mem["fits"] and mem["peak"] < 16 * 2**30
  fl = rep["flops"]
  tokens_per_chip = cfg.batch_size * cfg.seq_len / 4
  # cost analysis counts the 2-layer scan once; the corrected count adds the missing layer.
  assert fl["xla_flops"] == pytest.approx(fl["xla_raw"] + fl["xla_per_layer_flops"], rel=1e-6)
  assert fl["xla_per_layer_flops"] == pytest.approx(
      analytic_per_layer(rep_cfg(cfg), tokens_per_chip), rel=0.15)
  assert 1.0 <= fl["xla_flops"] / fl["model_per_device"] <= 1.35
  assert fl["six_n_tokens_total"] == 6 * n * cfg.batch_size * cfg.seq_len
  rl = rep["roofline"]
  assert rl["step_s"] >= rl["compute_s"] > 0 and 0 < rl["mfu"] < 1
  json.dumps(rep)
  assert "fits: yes" in roofline.format_report(rep)


def rep_cfg(cfg):
  return plan.plan_model(cfg).cfg


@needs_libtpu
def test_model_that_does_not_fit_is_reported_not_raised():
  # 1 layer with a 64k-wide MLP: ~1.7B fp32 params + AdamW replicated on each 16 GiB chip.
  cfg = tiny("model.n_layers=1", "model.d_model=8192", "model.d_ff=65536", "model.n_heads=8",
             "model.n_kv_heads=8", "model.head_dim=128", "mesh.data=4")
  rep = plan.plan(cfg, "v5e:2x2", probes=False)
  mem = rep["memory"]
  assert mem["fits"] is False and mem["over_by"] > 4 * 2**30
  assert "memory" in mem["compiler_message"].lower()
  largest = rep["state"]["largest"][0]
  assert "mlp" in largest["array"] and largest["bytes_per_device"] == 8192 * 65536 * 4
  text = roofline.format_report(rep)
  assert "fits: NO (over by" in text and "largest arrays per device" in text and "mlp" in text


@needs_libtpu
@pytest.mark.parametrize("overrides, message", [
    (["mesh.data=3"], "product is 4"),                      # 3 devices asked of 4 chips
    (["mesh.data=-1", "mesh.tensor=3"], "do not divide the 4 devices"),
])
def test_mesh_that_does_not_divide_the_topology(overrides, message):
  with pytest.raises(sharding.MeshError, match=message):
    plan.plan(tiny(*overrides), "v5e:2x2")


@needs_libtpu
def test_batch_that_does_not_divide_the_topology():
  with pytest.raises(sharding.MeshError, match="data\\*fsdp = 16 devices of v5p:2x2x4"):
    plan.plan(tiny(), "v5p-32")  # 16 chips, batch 8


@pytest.mark.parametrize("text, why", [
    ("v5x:2x2", "not a known accelerator"),
    ("v5p:4x4", "3-D torus"),
    ("v5e:2x2x2", "2-D torus"),
    ("v5p-7", "no standard v5p slice"),
    ("tpu", "not a known accelerator"),
])
def test_unknown_topology_lists_the_valid_forms(text, why):
  with pytest.raises(plan_target.TopologyError, match=why) as e:
    plan_target.parse(text)
  for form in ("local", "v5e:AxB", "v5p:AxBxC", "v5p-N"):
    assert form in str(e.value)


def test_topology_names():
  assert plan_target.parse("v5p-256") == ("v5p", "4x4x8")   # Cloud TPU names count cores
  assert plan_target.parse("v5e-8") == ("v5e", "2x4")       # ... except on v5e / v6e
  assert plan_target.parse("V5P:4x4x4") == ("v5p", "4x4x4")
  assert plan_target.parse("local") == ("local", "")


def test_cli_bad_topology_is_one_clear_error(capsys):
  assert cli.main(["compile", "tiny", "--topology", "v9:2x2"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("jaxft: error: unknown topology 'v9:2x2'") and "v5p:AxBxC" in err


def test_remat_policies_keep_the_gradient():
  """Every remat policy computes the same gradient (only memory and FLOPs differ)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  base = decoder.DecoderConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2,
                               head_dim=16, d_ff=64)
  params = decoder.init(jax.random.PRNGKey(0), base)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 64)

  def grad(remat):
    cfg = base.__class__(**{**base.__dict__, "remat": remat})
    loss = lambda p: jnp.mean(decoder.apply(p, tokens, cfg) ** 2)
    return jax.jit(jax.grad(loss))(params)

  want = grad("none")
  for remat in ("full", "dots", "dots_all"):
    got = grad(remat)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
  with pytest.raises(ValueError, match="dots_all"):
    decoder.DecoderConfig(remat="dot")


def test_model_flops_closed_form():
  cfg = decoder.DecoderConfig(vocab_size=100, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1,
                              head_dim=4, d_ff=16)
  n = 2 * (8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16) + 100 * 8
  assert roofline.matmul_params(cfg) == n
  full = roofline.model_flops(cfg, batch=3, seq_len=5, adapter_params=0, full=True)
  attn = 2 * 2 * 5 * 2 * 4  # per token, causal half of 2 matmuls of 2 * S * H * Dh
  assert full["train"] == 3 * 5 * (6 * n + 3 * attn)
  assert full["hardware"] == full["train"] + 3 * 5 * 3 * attn   # the masked half, computed anyway
  lora = roofline.model_flops(cfg, batch=3, seq_len=5, adapter_params=10, full=False)
  assert lora["train"] == 3 * 5 * (4 * n + 6 * 10 + 3 * attn)   # no weight grads of the base


HLO = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = bf16[64,32]{1,0} all-gather(bf16[16,32]{1,0} %x), replica_groups=[2,4]<=[8], dimensions={0}
  ROOT %t = (s32[], f32[8]) tuple(%i, %y)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %c = s32[] constant(10)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  %ar = f32[1024]{0} all-reduce(f32[1024]{0} %g), replica_groups=mesh['x'=4,'y'=2] {'x'}, to_apply=%add
  ROOT %r = f32[8] get-tuple-element(%w), index=1
}
"""


def test_collective_bytes_counts_loop_trips_and_group_sizes():
  out = roofline.collective_bytes(HLO)
  assert out["all-gather"] == 10 * 64 * 32 * 2            # 10 trips of the loop body
  assert out["all-reduce"] == 1024 * 4 * 2 * 3 / 4        # ring: 2 (g - 1) / g, g = 4


def test_chip_table():
  assert chips.lookup("TPU v5 lite") is chips.CHIPS["v5e"]
  assert chips.lookup("h100").peak_flops == 989e12
  assert all(c.source.startswith("https://") for c in chips.CHIPS.values())
  with pytest.raises(KeyError, match="valid: h100, h200, v4, v5e, v5p, v6e"):
    chips.lookup("v7x")


@pytest.mark.slow  # parsing the GGUF headers takes ~20-70 s (Gemma's 262k-token vocabulary)
@pytest.mark.parametrize("config, arch", [("smollm2_full_v5e", "smollm2-135m-instruct"),
                                          ("gemma3_270m_full_v5e", "gemma3-270m")])
def test_real_scale_shapes_match_the_checkpoints(config, arch):
  """The planner configs' hand-written shapes are the real models' (from GGUF metadata only)."""
  from jaxft.models import pretrained  # pylint: disable=g-import-not-at-top
  entry = pretrained.PRETRAINED[arch]
  if importlib.util.find_spec(entry.package) is None:
    pytest.skip(f"{arch} is not installed: {entry.install}")
  cfg = config_lib.load(config)
  mine = plan.plan_model(cfg).cfg
  with cfg.unlocked():
    cfg.model.pretrained = arch
  theirs = plan.plan_model(cfg).cfg
  for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                "mlp", "tie_embeddings", "sliding_window", "global_every", "qk_norm", "post_norms"):
    assert getattr(mine, field) == getattr(theirs, field), field
  assert mine.num_params() == theirs.num_params()


@pytest.mark.parametrize("name, topology_chips", [
    ("smollm2_full_v5e", 8), ("gemma3_270m_full_v5e", 8), ("llama3_8b_v5p:lora", 32),
    ("llama3_8b_v5p:full", 32), ("llama2_70b_fsdp_tp_v5p", 128)])
def test_real_scale_configs_load_and_divide_their_topology(name, topology_chips):
  cfg = config_lib.load(name)
  data, fsdp, tensor = sharding.mesh_shape(cfg.mesh, topology_chips)
  assert (cfg.batch_size // cfg.grad_accum) % (data * fsdp) == 0
  assert plan.plan_model(cfg).cfg.num_params() > 1e8   # shapes only: nothing is allocated


def test_local_plan_compares_remat_policies_and_measures(capsys):
  """`--topology local` on the 8 fake CPU devices: the same report for each remat policy,
  plus a measured step beside the prediction; full remat needs fewer temporaries."""
  argv = ["compile", "tiny", "--topology", "local", "--remat", "none,full", "--json",
          "--measure", "1", "--config.seq_len=128", "--config.mesh.data=4",
          "--config.mesh.fsdp=2"]
  assert cli.main(argv) == 0
  reports = json.loads(capsys.readouterr().out)["remat_sweep"]
  assert [r["remat"] for r in reports] == ["none", "full"]
  none, full = (r["memory"]["temp"] for r in reports)
  assert 0 < full < none
  for rep in reports:
    assert rep["num_devices"] == 8 and rep["num_chips"] == 1 and rep["chip"]["peak_flops"] > 0
    assert rep["memory"]["fits"] and rep["flops"]["xla_flops"] > rep["flops"]["xla_raw"] > 0
    ms = rep["measured"]
    assert ms["step_s"] > 0 and np.isfinite(ms["loss"]) and ms["predicted_over_measured"] > 0
  assert reports[1]["flops"]["xla_flops"] > reports[0]["flops"]["xla_flops"]  # recomputation
  assert "measured here" in roofline.format_report(reports[0])
