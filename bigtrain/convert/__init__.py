"""Conversion: Hugging Face Llama export/import, ZeRO consolidation, layout resharding."""
