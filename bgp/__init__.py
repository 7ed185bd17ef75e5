"""bgp: peer plans, ExaBGP config rendering and API codec, the supervised speaker."""
