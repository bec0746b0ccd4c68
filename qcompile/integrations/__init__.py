"""Integrations with other libraries (diffusers' quantizer API)."""
