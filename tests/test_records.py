import numpy as np
import pytest

from pathflip_jax.data import records


def _patch(**overrides):
  patch = {"schema_version": records.SCHEMA_VERSION, "slide_id": "s1", "x": 512, "y": 256,
           "col": 2, "row": 1, "patch_size": 256, "patch_size_level0": 256, "mpp": 0.5,
           "patch_mpp": 0.5, "jpeg": b"\xff\xd8fake\xff\xd9"}
  patch.update(overrides)
  return patch


def test_round_trip_keeps_values_and_arrays():
  features = np.arange(12, dtype=np.float16).reshape(3, 4)
  data = records.encode({"a": 1, "features": features, "nested": {"coords": np.ones((2, 2), np.int64)}})
  back = records.decode(data)
  assert back["a"] == 1
  np.testing.assert_array_equal(back["features"], features)
  assert back["features"].dtype == np.float16
  np.testing.assert_array_equal(back["nested"]["coords"], np.ones((2, 2)))


def test_patch_schema_accepts_a_patch():
  back = records.decode(records.encode(_patch(), records.PATCH), records.PATCH)
  assert back["x"] == 512 and back["jpeg"].startswith(b"\xff\xd8")


@pytest.mark.parametrize("field", ["slide_id", "x", "jpeg", "mpp"])
def test_missing_field_is_named(field):
  patch = _patch()
  del patch[field]
  with pytest.raises(records.RecordError, match=repr(field)):
    records.encode(patch, records.PATCH)


def test_wrong_type_is_named():
  with pytest.raises(records.RecordError, match="'x' must be int, got str"):
    records.encode(_patch(x="12"), records.PATCH)
  with pytest.raises(records.RecordError, match="'y'.*bool"):
    records.encode(_patch(y=True), records.PATCH)


def test_newer_schema_is_refused_with_location():
  data = records.encode(_patch(schema_version=records.SCHEMA_VERSION + 1))
  with pytest.raises(records.RecordError, match="shard.array_record\\[3\\].*newer"):
    records.decode(data, records.PATCH, where="shard.array_record[3]")


def test_garbage_bytes_are_an_error():
  with pytest.raises(records.RecordError, match="where: not a valid msgpack record"):
    records.decode(b"\xc1\xc1\xc1", where="where")
