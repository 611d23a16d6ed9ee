"""Entry points: `python -m launch.train`, and cluster scripts."""
