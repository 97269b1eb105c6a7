"""pathflip_jax: PathFLIP (fine-grained language-image pretraining for computational pathology)
in JAX/Flax, from slide files to heatmaps and answers."""

from pathflip_jax import _absl_flags

# grain 0.2.18 reads an absl flag inside its worker processes; with JAX installed and no
# absl.app.run, that read raises UnparsedFlagAccessError and kills every worker (google/grain#1355,
# fixed after 0.2.18). Importing this package marks the flags parsed, once, in every process that
# unpickles our data sources.
_absl_flags.ensure_parsed()

__version__ = "0.1.0"
