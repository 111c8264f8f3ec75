"""klal: teach vision-language models where to look.

LoRA fine-tuning of vision-language models (Qwen2.5-VL, Qwen2-VL, Qwen3-VL, Qwen3.5, LLaVA-OneVision, Gemma 3; one
seam, :mod:`klal.models.family`) with next-token loss plus a KL attention loss (KLAL) that aligns the answer
tokens' attention over image tokens with a target map built from evidence geometry.
"""

__version__ = "0.1.0"
