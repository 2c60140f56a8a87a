"""Analysis: routing metrics of record, run-directory reading, plots and the HTML report.

Analysis only reads what training wrote (dependencies flow one way); metrics.py
is also imported by the trainer to turn its counts into logged scalars.
"""
