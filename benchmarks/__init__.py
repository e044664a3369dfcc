"""Side-by-side checkpoint benchmark: dcp-plugin against torch.save, Lightning, Accelerate and plain DCP.

Run ``python benchmarks/run.py --help``. Each contender runs in a fresh process; results are reported as
medians with min-max and as ratios to ``torch.save`` and to the raw disk measured in the same run.
"""
