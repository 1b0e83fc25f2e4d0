"""Measurements: sample quality (ddpm eval) and engine speed (ddpm bench)."""
