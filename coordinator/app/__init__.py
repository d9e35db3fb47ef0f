"""The coordinator's use cases, one module per area, for any front end (gRPC today, HTTP later).

Plain Python arguments and results (coordinator/model.py); failures are the domain errors of
coordinator/errors.py. Nothing here knows about gRPC: the servicers in coordinator/services translate
messages with coordinator/convert.py and map errors. The one module that keeps dstack.v1 messages is
agent_stream.py, which relays the agent protocol (tests/unit/test_app_layer.py holds the list).
The caller has been authenticated before a use case runs (coordinator/auth.py).
"""
