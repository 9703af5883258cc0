"""Battery analysis of ``maps`` stores: weight fractions, virtual unrolling, ROIs,
lithiation regions and the campaign report."""
