import ml_collections
import pytest

from pathflip_jax import config_args


def test_parse_arg_types_flags_and_defaults():
  config = config_args.parse_arg("size=64,lr=0.5,name=vit,bf16", size=32, lr=0.1, name="x",
                                 bf16=False, other=3)
  assert config.size == 64 and isinstance(config.size, int)
  assert config.lr == 0.5 and config.name == "vit" and config.bf16 is True
  assert config.other == 3


def test_parse_arg_rejects_unknown_and_bad_values():
  with pytest.raises(ValueError, match="unknown config arg 'sise'"):
    config_args.parse_arg("sise=3", size=1)
  with pytest.raises(ValueError, match="'size'"):
    config_args.parse_arg("size=big", size=1)
  with pytest.raises(ValueError, match="boolean"):
    config_args.parse_arg("flag=maybe", flag=False)


def test_tiling_config_loads_with_args_and_is_locked():
  config = config_args.load_config("configs/tiling.py:target_mpp=0.25,passthrough=false")
  assert config.target_mpp == 0.25 and config.passthrough is False and config.patch_size == 256
  with pytest.raises(AttributeError):
    config.not_a_key = 1  # locked: typos are errors, not new keys
  assert isinstance(config, ml_collections.ConfigDict)


def test_load_config_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.py"):
    config_args.load_config(str(tmp_path / "nope.py"))
  bad = tmp_path / "bad.py"
  bad.write_text("x = 1\n")
  with pytest.raises(AttributeError, match="bad.py.*get_config"):
    config_args.load_config(str(bad))


def test_eight_fake_devices():
  import jax
  assert jax.device_count() == 8
