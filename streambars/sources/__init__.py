"""Sources: where records come from, each giving numpy record batches.

* :mod:`.dbnfile` — DBN files (v1/v2/v3, plain or zstd) -> ``RecordBatch`` chunks.
* :mod:`.historical` — the Databento Historical API (``HistoricalSource``): cost, monthly
  downloads into the raw archive, retries.
* :mod:`.live` — the Databento Live API (``LiveSession``): an async iterator of record
  batches and control events.

Modules are imported on demand (``from streambars.sources import dbnfile``) so that reading
DBN files never pulls in the network clients.
"""
