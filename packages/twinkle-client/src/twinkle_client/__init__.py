"""Twinkle client SDK."""
