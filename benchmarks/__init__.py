"""Benchmark scripts (run from the repository root) and what they share (:mod:`benchmarks.harness`).

A regular package: Opacus installs a top-level ``benchmarks`` package of its own, which would
otherwise shadow this folder."""
