"""The hub: the central server a fleet of appliances syncs from (HUB-PROTOCOL in the README).

storage.py (devices, targets, rollouts, events, TUF metadata behind `HubStore`), artifacts.py
(model files behind `ArtifactStore`), repository.py (the TUF repository), service.py (the
operations both the HTTP API and the CLI call), server.py (aiohttp), cli.py (`appliance hub`).
"""
