"""The study reproduce.py runs: its plan, steps, dissolvers, runs, figures, tables and schedule."""
