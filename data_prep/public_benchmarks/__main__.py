"""``python -m data_prep.public_benchmarks``: the command line of :mod:`.cli`."""

from data_prep.public_benchmarks import cli

if __name__ == "__main__":
  cli.main()
