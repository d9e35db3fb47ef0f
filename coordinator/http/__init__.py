"""The coordinator's HTTP front end: a JSON API (api.py), its OpenAPI document (openapi.py) and
Prometheus metrics (metrics.py), served by aiohttp in the coordinator's own asyncio loop (server.py).

It is a second front end beside coordinator/services/ (gRPC): the same tokens and the same role per
operation (coordinator/auth.py's PERMISSIONS, looked up by the gRPC method each endpoint mirrors), and
the same use cases (coordinator/app/); it never touches the store itself.
"""
