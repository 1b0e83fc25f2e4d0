"""The light inference side: schedule tables, samplers, engines. Never imports ddpm.train."""
