"""Entry points, one per job (`pocl-ray <job>` or `python -m jobs.<job>`)."""
