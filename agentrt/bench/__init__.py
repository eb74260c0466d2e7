"""Benchmarks behind `agentrt bench`: each module holds one workload, its contestants and its report.

Importing this package stays light; torch and transformers load when a benchmark runs.
"""
