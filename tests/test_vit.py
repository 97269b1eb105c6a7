"""ViT patch encoder and timm weight import: parity with timm, strict key checks, shapes."""

import dataclasses
import functools
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathflip_jax import sharding
from pathflip_jax.convert import safetensors_io, timm_vit
from pathflip_jax.models import layers, vit

TINY = dict(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3, num_classes=0)
# timm option combinations covered by the parity test (added to TINY). Each costs one XLA
# compilation, the bulk of this file's run time, so options are combined.
CASES = {
    "cls": {},
    "registers_layer_scale": dict(reg_tokens=4, no_embed_class=True, init_values=0.1),
    "avg_pool_head_pre_norm": dict(global_pool="avg", num_classes=16, pre_norm=True),
    "no_cls_registers_in_pos": dict(class_token=False, global_pool="avg", reg_tokens=2,
                                    qkv_bias=False),
}


# XLA:CPU compilation dominates these tests; the lowest backend optimisation level halves it and
# does not change float32 results beyond rounding.
@functools.partial(jax.jit, static_argnums=0,
                   compiler_options={"xla_backend_optimization_level": 0})
def _forward(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


def forward(model: nnx.Module, x) -> np.ndarray:
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, jnp.asarray(x)))


@pytest.fixture(scope="module")
def timm_vt():
  pytest.importorskip("torch")
  pytest.importorskip("safetensors")
  from benchmarks.patch_encoder import import_timm  # noqa: PLC0415
  try:
    return import_timm().models.vision_transformer
  except ImportError as e:
    pytest.skip(f"timm is not installed ({e}): bash setup.sh --test")


def make_timm(timm_vt, seed=0, **kwargs):
  """A tiny timm ViT in eval mode with every parameter random (layer scale included)."""
  import torch  # noqa: PLC0415
  torch.manual_seed(seed)
  model = timm_vt.VisionTransformer(**{**TINY, **kwargs}).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  return model


def timm_forward(model, images_nhwc: np.ndarray) -> np.ndarray:
  import torch  # noqa: PLC0415
  with torch.inference_mode():
    return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def numpy_state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def rel_error(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def images(size=64, batch=2, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((batch, size, size, 3), np.float32)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_timm_from_safetensors_and_pth(case, timm_vt, tmp_path):
  import safetensors.torch  # noqa: PLC0415
  import torch  # noqa: PLC0415
  reference = make_timm(timm_vt, **CASES[case])
  st_path, pth_path = tmp_path / "w.safetensors", tmp_path / "w.pth"
  safetensors.torch.save_file(reference.state_dict(), st_path)
  torch.save(reference.state_dict(), pth_path)
  x = images()
  expected = timm_forward(reference, x)

  hashes = []
  for path in (st_path, pth_path):
    model, config, weights_hash = timm_vit.load_timm_vit(str(path), None, num_heads=3)
    out = forward(model, x)
    assert out.shape == expected.shape == (2, model.out_dim)
    assert rel_error(out, expected) <= 1e-4, (case, path.suffix)
    hashes.append(weights_hash)
  # The hash fingerprints the weights, not the file format.
  assert hashes[0] == hashes[1]
  options = CASES[case]
  assert config.num_registers == options.get("reg_tokens", 0)
  assert (config.layer_scale_init is not None) == ("init_values" in options)
  assert config.pool == ("mean" if options.get("global_pool") == "avg" else "cls")
  assert config.use_fc_norm == (config.pool == "mean")
  assert config.head_dim == options.get("num_classes")
  assert config.pre_norm == options.get("pre_norm", False)
  assert config.qkv_bias == options.get("qkv_bias", True)


def test_wrapped_checkpoint_prefix_and_hash(timm_vt, tmp_path):
  """{"state_dict": ...} with module./visual.trunk. prefixes and a text tower (CONCH-like)."""
  import torch  # noqa: PLC0415
  reference = make_timm(timm_vt)
  plain = {k: v for k, v in reference.state_dict().items()}
  wrapped = {f"module.visual.trunk.{k}": v for k, v in plain.items()}
  wrapped["module.text.token_embedding.weight"] = torch.zeros(10, 4)
  wrapped["module.visual.attn_pool.query"] = torch.zeros(3, 48)
  torch.save({"state_dict": wrapped, "epoch": 3}, tmp_path / "wrapped.pt")
  torch.save(plain, tmp_path / "plain.pth")

  base, _, base_hash = timm_vit.load_timm_vit(str(tmp_path / "plain.pth"), None, num_heads=3)
  base_state = nnx.state(base)
  for prefix in (None, "visual.trunk."):
    model, _, weights_hash = timm_vit.load_timm_vit(str(tmp_path / "wrapped.pt"), None,
                                                    num_heads=3, prefix=prefix)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), base_state)
    assert weights_hash == base_hash
  # Keys under the ViT's prefix that it does not use are an error, not silently dropped.
  wrapped["module.visual.trunk.attn_pool.latent"] = torch.zeros(1, 1, 48)
  torch.save({"model": wrapped}, tmp_path / "pooler.pt")
  with pytest.raises(timm_vit.ConversionError,
                     match=r"unexpected key attn_pool\.latent \(shape \(1, 1, 48\)\)"):
    timm_vit.load_timm_vit(str(tmp_path / "pooler.pt"), None, num_heads=3)


def test_conversion_errors_name_keys_and_shapes(timm_vt):
  sd = numpy_state(make_timm(timm_vt))
  config = timm_vit.infer_config(sd, num_heads=3)

  missing = dict(sd)
  del missing["blocks.1.mlp.fc2.bias"]
  with pytest.raises(timm_vit.ConversionError, match=r"missing key blocks\.1\.mlp\.fc2\.bias "
                     r"\(expected shape \(48,\)\)"):
    timm_vit.vit_from_timm(missing, config)

  extra = dict(sd, **{"blocks.0.attn.q_norm.weight": np.ones(16, np.float32)})
  with pytest.raises(timm_vit.ConversionError,
                     match=r"unexpected key blocks\.0\.attn\.q_norm\.weight \(shape \(16,\)\)"):
    timm_vit.vit_from_timm(extra, config)

  wrong = dict(sd, **{"blocks.0.mlp.fc1.weight": np.zeros((100, 48), np.float32)})
  with pytest.raises(timm_vit.ConversionError, match=r"blocks\.0\.mlp\.fc1\.weight: checkpoint "
                     r"\(100, 48\), model expects \(192, 48\)"):
    timm_vit.vit_from_timm(wrong, config)

  # A config that disagrees with the checkpoint (layer scale expected, absent) lists every key.
  with pytest.raises(timm_vit.ConversionError,
                     match=r"(?s)4 problem.*missing key blocks\.0\.ls1\.gamma") as info:
    timm_vit.vit_from_timm(sd, dataclasses.replace(config, layer_scale_init=1e-5))
  assert "blocks.1.ls2.gamma" in str(info.value)

  # A variant whose sizes differ from the checkpoint's.
  with pytest.raises(timm_vit.ConversionError, match="not a vit_small_patch16: width: variant 384"):
    timm_vit._resolve_config(sd, "vit_small_patch16", None, None)


def test_pos_embed_resampled_like_timm_dynamic_size(timm_vt):
  """64-px weights run at 96 px: 6x6 grid, same result as timm's dynamic_img_size forward."""
  # Class and register tokens have position embeddings here (no_embed_class=False): those rows
  # are kept, only the 4x4 patch grid is resampled to 6x6.
  reference = make_timm(timm_vt, dynamic_img_size=True, reg_tokens=2)
  sd = numpy_state(reference)
  model = timm_vit.vit_from_timm(sd, timm_vit.infer_config(sd, num_heads=3), image_size=96)
  assert model.config.num_patches == 36 and model.config.num_tokens == 3 + 36
  np.testing.assert_array_equal(model.pos_embed[...][:3], sd["pos_embed"][0, :3])
  tokens = nnx.eval_shape(lambda m: m.forward_features(jnp.zeros((2, 96, 96, 3))), model)
  assert tokens.shape == (2, 3 + 36, 48)
  assert rel_error(forward(model, images(96)), timm_forward(reference, images(96))) <= 1e-4
  # Downsampling (antialiased) is timm's too.
  model = timm_vit.vit_from_timm(sd, timm_vit.infer_config(sd, num_heads=3), image_size=48)
  resampled = timm_vt.resample_abs_pos_embed(
      reference.pos_embed, new_size=(3, 3), num_prefix_tokens=3).detach().numpy()[0]
  np.testing.assert_allclose(model.pos_embed[...], resampled, atol=1e-6)


def test_wrong_image_size_is_an_error():
  model = nnx.eval_shape(lambda: vit.VisionTransformer(vit.get_config("vit_tiny_test"),
                                                       rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"96x96 px .* 64x64"):
    nnx.eval_shape(lambda m: m(jnp.zeros((1, 96, 96, 3))), model)


@pytest.mark.parametrize("name,expected", [
    ("vit_small_patch16", 21_665_664),   # timm vit_small_patch16_224, num_classes=0
    ("vit_base_patch16", 85_798_656),
    ("vit_large_patch16", 303_301_632),
])
def test_full_size_param_counts(name, expected):
  config = vit.get_config(name)
  model = nnx.eval_shape(lambda: vit.VisionTransformer(config, rngs=nnx.Rngs(0)))
  assert layers.count_params(model) == expected
  assert model.out_dim == config.width
  out = nnx.eval_shape(lambda m: m(jnp.zeros((2, 224, 224, 3))), model)
  assert out.shape == (2, config.width)


def test_config_helpers():
  with pytest.raises(ValueError, match="vit_base_patch16"):
    vit.get_config("vit_huge")
  config = vit.get_config("vit_small_patch16", image_size=256, pool="mean", head_dim=512)
  assert (config.grid_size, config.use_fc_norm, config.mlp_hidden, config.out_dim) == \
      (16, True, 1536, 512)
  assert vit.get_config("vit_tiny_test", width=64).mlp_hidden == 256
  with pytest.raises(ValueError, match="class_token"):
    vit.get_config("vit_tiny_test", class_token=False)  # pool "cls" needs it


def test_normalize():
  pixels = np.array([[[0, 128, 255]]], np.uint8)
  out = vit.normalize(pixels, vit.IMAGENET_MEAN, vit.IMAGENET_STD, jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  expected = (np.array([0, 128, 255]) / 255 - np.array(vit.IMAGENET_MEAN)) / vit.IMAGENET_STD
  np.testing.assert_allclose(np.asarray(out, np.float32)[0, 0], expected, rtol=1e-2)


def test_bf16_compute_keeps_float32_params(timm_vt):
  reference = make_timm(timm_vt, reg_tokens=2, init_values=0.5, global_pool="avg")
  sd = numpy_state(reference)
  model = timm_vit.vit_from_timm(sd, timm_vit.infer_config(sd, num_heads=3), dtype=jnp.bfloat16)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert {x.dtype for x in params} == {jnp.dtype("float32")}
  out = forward(model, images())
  assert out.dtype == jnp.bfloat16
  assert rel_error(out.astype(np.float32), timm_forward(reference, images())) < 3e-2


def test_logical_axes_shard_over_a_mesh(timm_vt):
  """Annotated parameters place on a (data, fsdp, model) mesh; the result is still timm's."""
  reference = make_timm(timm_vt, num_heads=4, num_classes=8)  # 4 heads split over model=2
  sd = numpy_state(reference)
  model = timm_vit.vit_from_timm(sd, timm_vit.infer_config(sd, num_heads=4))
  specs = nnx.get_partition_spec(nnx.state(model))
  assert specs["blocks"][0]["attn"]["qkv_kernel"].get_value() == \
      jax.sharding.PartitionSpec("embed", None, "heads", "kv")
  assert specs["blocks"][0]["mlp"]["fc1"]["kernel"].get_value() == \
      jax.sharding.PartitionSpec("embed", "mlp")
  mesh = sharding.make_mesh(data=2, fsdp=2, model=2)
  sharded = sharding.shard_module(model, mesh)
  kernel = sharded.blocks[0].mlp.fc1.kernel.get_value()
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
  graphdef, state = nnx.split(sharded)
  # batch 8: on CPU the attention core then runs in chunks of 4 images (lax.map)
  x = images(batch=8)
  out = _forward(graphdef, state, jax.device_put(x, sharding.batch_sharding(mesh, 4)))
  assert rel_error(out, timm_forward(reference, x)) <= 1e-4


# ------------------------------------------------------------------------------- safetensors


def test_safetensors_reader_dtypes(tmp_path):
  torch = pytest.importorskip("torch")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  g = torch.Generator().manual_seed(0)
  tensors = {
      "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
      "f16": torch.randn(4, generator=g).to(torch.float16),
      "f32": torch.randn(2, 2, 2, generator=g),
      "i64": torch.arange(-3, 3, dtype=torch.int64),
      "u8": torch.arange(7, dtype=torch.uint8),
      "scalar": torch.tensor(2.5),
      "empty": torch.zeros(0, 4),
  }
  path = tmp_path / "t.safetensors"
  safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})
  loaded = safetensors_io.load_file(str(path))
  assert set(loaded) == set(tensors)
  for name, t in tensors.items():
    want = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    assert loaded[name].dtype == want.dtype and loaded[name].shape == want.shape, name
    np.testing.assert_array_equal(loaded[name], want)  # bf16 -> f32 is exact


def test_safetensors_writer_round_trip(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, -2], np.int32),
            "c": np.ones((2, 3), np.float16)}
  path = str(tmp_path / "w.safetensors")
  safetensors_io.save_file(arrays, path, metadata={"source": "test"})
  for loaded in (safetensors_numpy.load_file(path), safetensors_io.load_file(path)):
    for name, a in arrays.items():
      np.testing.assert_array_equal(loaded[name], a)
      assert loaded[name].dtype == a.dtype
  assert safetensors_io.read_header(path)[1] == {"source": "test"}


def test_safetensors_reader_rejects_corrupt_files(tmp_path):
  good = tmp_path / "good.safetensors"
  safetensors_io.save_file({"w": np.ones((4, 4), np.float32)}, str(good))
  data = good.read_bytes()

  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(data[:-8])
  with pytest.raises(safetensors_io.SafetensorsError, match=r"truncated.safetensors: tensor 'w' "
                     r"has data_offsets \[0, 64\] outside the data section of 56 bytes"):
    safetensors_io.load_file(str(truncated))

  bad_length = tmp_path / "bad_length.safetensors"
  bad_length.write_bytes(struct.pack("<Q", 10**9) + data[8:])
  with pytest.raises(safetensors_io.SafetensorsError,
                     match="bad_length.safetensors: header length"):
    safetensors_io.load_file(str(bad_length))

  header = json.dumps({"w": {"dtype": "F32", "shape": [4, 5], "data_offsets": [0, 64]}}).encode()
  bad_size = tmp_path / "bad_size.safetensors"
  bad_size.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
  with pytest.raises(safetensors_io.SafetensorsError, match=r"'w' \(F32 \[4, 5\]\) needs 80 bytes"):
    safetensors_io.load_file(str(bad_size))

  header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
  fp8 = tmp_path / "fp8.safetensors"
  fp8.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
  with pytest.raises(safetensors_io.SafetensorsError, match="'w' has unsupported dtype F8_E4M3"):
    safetensors_io.load_file(str(fp8))
