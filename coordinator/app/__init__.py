"""The coordinator's use cases, one module per area, for any front end (gRPC today, HTTP later).

Plain Python arguments and results; failures are the domain errors of coordinator/errors.py. Nothing
here knows about gRPC: the servicers in coordinator/services translate messages and map errors.
The caller has been authenticated before a use case runs (coordinator/auth.py).
"""
