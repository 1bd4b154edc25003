"""Fleet sync: the only code that talks to the hub (TUF-verified updates, telemetry outbox).

Offline is the normal case: everything here runs beside serving and never blocks it.
"""
