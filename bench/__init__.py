"""Measurement scripts and their results: engine speed (ddpm bench), sample quality against network calls
(sweep.py, scored by ddpm.evaluation), the editing modes, threads, start-up time."""
