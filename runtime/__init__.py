"""What every part needs at run time and the core must not hold (it does I/O): the Kubernetes
connection, its one error type, the list-watch reflector, the Event format, and the HTTP probe and
metrics listener.

The layers: the core (pure) < this package < the parts (scheduler, webhook, device plugin), which
still never import each other.
"""
