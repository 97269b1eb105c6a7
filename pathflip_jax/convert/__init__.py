"""Weight importers: timm-format ViTs (``timm_vit``) from .safetensors (``safetensors_io``, no
package needed) or torch checkpoints read with ``weights_only=True``; never plain pickle.
Decoders: Hugging Face Gemma (``gemma``), Llama / Qwen3 (``llama``; the shared checkpoint reading
is ``hf_checkpoint``, the tokenizer.json BPE tokenizer and chat templates ``hf_tokenizer``) and
Llama-architecture GGUF files (``gguf``)."""
