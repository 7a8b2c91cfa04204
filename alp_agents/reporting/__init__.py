"""Reporting: the run directory's metrics log (``runlog``), plots of a run (``plots``) and the
console (``console``: progress bar, summary table)."""
