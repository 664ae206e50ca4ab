"""PACS integration: receiving instances (STOW-RS, DIMSE, pull), durable jobs, routing, results and delivery.

Modules: ``intake`` (the one entry point every receiver calls), ``results`` (the result objects and the sink
interface delivery implements), ``store`` (the SQLAlchemy job store), ``spool`` (durable instance files),
``routing`` (which models an instance goes to), ``worker`` (runs jobs through the models' batchers),
``pull`` (QIDO-RS + WADO-RS from the archive), ``stow`` and ``jobs`` (the HTTP routes).
"""
