"""Evaluation of checkpoints: offline stand-ins for GLUE / XTREME / MTEB, throughput, optional online tasks."""
