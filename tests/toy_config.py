"""Trainer config of the toy stage (tests/toy_task.py), loadable with --config."""

from tests import toy_task


def get_config(arg=None):
  return toy_task.get_config(arg)
