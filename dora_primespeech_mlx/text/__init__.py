"""Text frontend: text → phone symbols → ids, equal to upstream GPT-SoVITS v2.

Pure functions, no model needed: ``clean_text(text, language)`` gives the phones, per-character
phone counts and normalised text of one single-language segment; ``cleaned_text_to_sequence``
maps phones to the ids the checkpoints were trained with.
"""

from .cleaner import SUPPORTED_LANGUAGES, clean_text
from .symbols import cleaned_text_to_sequence, symbols, symbols_v1

__all__ = ["clean_text", "cleaned_text_to_sequence", "symbols", "symbols_v1", "SUPPORTED_LANGUAGES"]
