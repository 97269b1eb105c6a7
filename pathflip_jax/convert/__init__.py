"""Weight importers: timm-format ViTs (``timm_vit``) from .safetensors (``safetensors_io``, no
package needed) or torch checkpoints read with ``weights_only=True``; never plain pickle."""
