"""The privacy officer's tools: the ``clinfuse audit`` commands and the empirical audit.

This layer sits above :mod:`clinfuse.privacy` (accounting, ledgers, plans, canary statistics)
and :mod:`clinfuse.training` (the DP engine): the empirical audit *runs* clinfuse's own DP-SGD
code, which ``privacy/`` may not import.
"""
