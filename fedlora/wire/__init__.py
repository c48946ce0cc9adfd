"""What travels between the server and the clients: every message key
(:mod:`~fedlora.wire.protocol`) and the tensor codes (:mod:`~fedlora.wire.transport`: float
dtypes, block int8 / NF4, packing into Flower records)."""
