"""AuRA model pieces shared by training and serving.

Nothing in this package imports :mod:`server`: the trainer and the server must agree on the
audio layer, the features and the prompt layout by construction, not by copy.
"""
